"""GGUF export through llama.cpp's converter on a tiny run: template inside, same generations, same token ids."""

import json
from pathlib import Path

import pytest

from loraforge.export.gguf import chat_template_of, compare_generations, converter_dir, run_export_gguf

pytestmark = pytest.mark.skipif(not (converter_dir() / "convert_hf_to_gguf.py").is_file(),
                                reason="llama.cpp converter not installed; `make setup` fetches it")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Echo red"},
                {"role": "assistant", "content": "red red"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    from loraforge.config import load_config
    from loraforge.training.run import run_training
    from tests.conftest import write_tiny_config

    work = tmp_path_factory.mktemp("export")
    config_path = write_tiny_config(work, tiny_model_dir, "{max_steps: 3, batch_size: 4, learning_rate: 0.01, "
                                    "save_every: null}", val_fraction=0.05)
    config = load_config(config_path, [f"output_dir={work / 'run'}"])
    run_training(config)
    return config, run_export_gguf(config.output_dir, "f16")


def test_gguf_holds_the_chat_template(exported):
    config, gguf = exported
    template = (Path(config.output_dir) / "merged" / "chat_template.jinja").read_text()
    assert chat_template_of(gguf) == template
    assert json.loads(gguf.with_suffix(".json").read_text())["converter"] == "llama-cpp-python==0.3.36"


def test_gguf_generates_like_the_merged_model_from_one_parse_of_the_file(exported, monkeypatch):
    from gguf import GGUFReader

    config, gguf = exported
    parsed = []
    parse = GGUFReader.__init__
    monkeypatch.setattr(GGUFReader, "__init__", lambda reader, path, *a, **k: (parsed.append(path),
                                                                                parse(reader, path, *a, **k))[1])
    rows = compare_generations(gguf, Path(config.output_dir) / "merged", ["Echo red", "Echo blue", "hello"], 8)
    assert all(r["model"] == r["gguf"] for r in rows), rows
    assert parsed == [str(gguf)], "one parse, for the config and the weights both"


def test_same_token_ids_through_training_merged_and_gguf_tokenizers(exported, tokenizer):
    from transformers import AutoTokenizer

    from loraforge.data.formats import from_messages
    from loraforge.data.render import render, stop_token_ids

    config, gguf = exported
    training_ids, _ = render(from_messages({"messages": CONVERSATION}, "t:1"), tokenizer, stop_token_ids(tokenizer))
    merged = AutoTokenizer.from_pretrained(Path(config.output_dir) / "merged")
    from_gguf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert merged.apply_chat_template(CONVERSATION, return_dict=False) == training_ids
    assert from_gguf.apply_chat_template(CONVERSATION, return_dict=False) == training_ids


def test_ollama_modelfile(exported, capsys):
    from loraforge.cli import main

    config, gguf = exported
    assert main(["export", "ollama", config.output_dir, "--type", "f16"]) == 0
    text = (gguf.parent / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{gguf.name}\n")
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text


def test_a_second_export_rewrites_its_own_files_only_and_redoes_a_damaged_merge(exported, capsys):
    from loraforge.cli import main
    from loraforge import ledger

    config, gguf = exported
    run = Path(config.output_dir)
    assert main(["export", "ollama", config.output_dir, "--type", "f16"]) == 0
    modelfile = gguf.parent / "Modelfile"
    modelfile.write_text(modelfile.read_text() + "PARAMETER temperature 0.2\n")
    edited = modelfile.read_bytes()
    assert main(["export", "ollama", config.output_dir, "--type", "f16"]) == 2
    assert "changed since it wrote them (Modelfile)" in capsys.readouterr().err
    assert modelfile.read_bytes() == edited, "a hand-edited Modelfile is kept"

    (run / "merged" / "model.safetensors").unlink()  # the state a merge stopped before its weights leaves
    assert run_export_gguf(config.output_dir, "f16") == gguf
    assert ledger.written(run / "merged", "merge.json") and (run / "merged" / "model.safetensors").is_file()
    from gguf import GGUFReader

    assert len(GGUFReader(str(gguf)).tensors) > 0, "converted from the merge redone, not from an empty folder"


def test_export_refuses_what_it_cannot_write_before_it_merges(train_tiny):
    from loraforge.errors import ExportError
    from loraforge.export.ollama import run_export_ollama

    config, _ = train_tiny("train.max_steps=1")
    run = Path(config.output_dir)
    (run / "export").mkdir()
    (run / "export" / "model-f16.gguf").write_text("my own file")
    with pytest.raises(ExportError, match=r"did not write.*\(model-f16.gguf\); move them away: loraforge never"):
        run_export_gguf(run, "f16")
    assert not (run / "merged").exists(), "nothing merged for an export that is refused"

    quoted, _ = train_tiny("train.max_steps=1", "data.system_prompt='Say \"\"\"hi\"\"\"'")
    with pytest.raises(ExportError, match='the system prompt holds """'):
        run_export_ollama(quoted.output_dir, "f16")
    assert not (Path(quoted.output_dir) / "merged").exists() and not (Path(quoted.output_dir) / "export").exists()


@pytest.mark.slow
def test_ollama_export_converts_again_after_the_run_trained_further(train_tiny):
    from loraforge.config import load_config
    from loraforge.export.gguf import gguf_is_current
    from loraforge.export.merge import run_digest
    from loraforge.export.ollama import run_export_ollama
    from loraforge.training.run import run_training

    config, _ = train_tiny("train.max_steps=2", "train.save_every=2")
    run = Path(config.output_dir)
    run_export_ollama(run, "f16")
    gguf = run / "export" / "model-f16.gguf"
    first = gguf.read_bytes()
    assert gguf_is_current(run, "f16", run_digest(run))
    run_training(load_config(run / "resolved.yaml", ["train.max_steps=4"]), resume="auto", allow_changes=True)
    assert not gguf_is_current(run, "f16", run_digest(run))
    run_export_ollama(run, "f16")
    assert gguf.read_bytes() != first and gguf_is_current(run, "f16", run_digest(run))


def test_a_signal_during_the_conversion_stops_the_converter_and_leaves_no_file(exported):
    """SIGTERM to loraforge left llama.cpp's converter running on its own and a cut-short GGUF under the final
    name, with no word said."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config, gguf = exported
    out = gguf.parent / "model-q8_0.gguf"
    export = subprocess.Popen([sys.executable, "-m", "loraforge", "export", "gguf", config.output_dir, "--type", "q8_0"],
                              stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{export.pid}/task/{export.pid}/children")
    converter, deadline = None, time.monotonic() + 120
    while converter is None and export.poll() is None and time.monotonic() < deadline:
        found = children.read_text().split() if children.exists() else []
        converter = int(found[0]) if found else None
        time.sleep(0.05)
    assert converter is not None, "the converter started"
    time.sleep(0.5)
    export.send_signal(signal.SIGTERM)
    _, err = export.communicate(timeout=60)
    assert export.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"error: stopped by SIGTERM while llama.cpp's converter wrote {out.name}: "
                                            f"it is stopped too and nothing was written to {out}; run the export again")
    assert not Path(f"/proc/{converter}").exists() or "zombie" in Path(f"/proc/{converter}/status").read_text()
    assert not out.exists() and not list(gguf.parent.glob(".*partial"))
