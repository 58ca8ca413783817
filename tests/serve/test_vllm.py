"""`loraforge serve --engine vllm|auto`: the `vllm serve` command built from real run directories, the runs vLLM
could not answer for as they trained refused with the reason, auto falling back to loraforge's engine here (no
CUDA), and the command started in loraforge's place (a stand-in `vllm` program records what it was given)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.model.sources import resolve_model
from loraforge.serve import vllm_server
from loraforge.serve.vllm_server import Unfit, choose, command, machine_lacks


def option(args: list[str], name: str) -> list[str]:
    """The values after `name`, up to the next option."""
    start = args.index(name) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def test_runs_on_one_base_become_lora_modules_of_one_vllm_server_under_the_names_loraforge_serves(runs, tiny_model_dir):
    args = command([str(r) for r in runs], "127.0.0.1", 8011, 16)
    assert args[:2] == ["serve", resolve_model(str(tiny_model_dir))]
    assert option(args, "--served-model-name") == [str(tiny_model_dir)], "the base answers under its model name"
    modules = {m["name"]: m["path"] for m in map(json.loads, option(args, "--lora-modules"))}
    assert list(modules) == ["echo-a", "echo-b"]
    for run in runs:
        adapter = Path(modules[run.name])
        assert adapter == run.resolve() / "adapter" and (adapter / "adapter_config.json").is_file()
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert option(args, "--max-lora-rank") == ["8"], "the smallest rank vLLM takes that holds r=4"
    assert option(args, "--max-loras") == ["2"] and "--enable-lora" in args
    assert option(args, "--tokenizer") == [str(runs[0].resolve() / "tokenizer")]
    assert option(args, "--host") == ["127.0.0.1"] and option(args, "--port") == ["8011"]
    assert option(args, "--max-num-seqs") == ["16"] and option(args, "--generation-config") == ["vllm"]
    assert "--quantization" not in args and "--revision" not in args


def test_a_full_fine_tune_alone_is_served_as_its_own_model(odd_runs):
    args = command([str(odd_runs["full"])], "127.0.0.1", 8011, 4)
    assert args[:2] == ["serve", str(odd_runs["full"].resolve() / "model")]
    assert option(args, "--served-model-name") == ["full"] and "--enable-lora" not in args


@pytest.mark.parametrize("odd, expected", [
    ("dora", "run dora is a DoRA run (lora.use_dora), which vLLM does not serve"),
    ("system", "run system has a system prompt (data.system_prompt)"),
    ("on-other-base", "the runs are on different bases"),
    ("other-template", "the runs' tokenizers or chat templates differ"),
    ("full", "run full trained every weight, so it is a model of its own"),
    ("biases", "run biases trained biases (lora.bias all)"),
    ("layers-dropped", "run layers-dropped trained on its base with layers removed (model.variant drop_layers)"),
])
def test_runs_vllm_would_not_answer_as_they_trained_are_refused_with_the_reason(runs, odd_runs, odd, expected):
    with pytest.raises(Unfit, match="use --engine hf|start one `loraforge serve") as refused:
        command([str(runs[0]), str(odd_runs[odd])], "127.0.0.1", 8011, 4)
    assert expected in str(refused.value)


def test_auto_on_a_machine_with_cuda_and_vllm_still_serves_runs_vllm_cannot_with_loraforge_engine(
        runs, odd_runs, monkeypatch, caplog):
    monkeypatch.setattr(vllm_server, "machine_lacks", lambda: None)
    with caplog.at_level("INFO", logger="loraforge.serve"):
        assert choose("auto", [str(runs[0]), str(odd_runs["dora"])], "127.0.0.1", 8011) == ("hf", None)
        assert choose("auto", [str(r) for r in runs], "127.0.0.1", 8011)[0] == "vllm"
    assert "engine auto -> hf: run dora is a DoRA run" in caplog.text
    assert "engine auto -> vllm: CUDA and vLLM are here" in caplog.text


def test_runs_on_one_model_loaded_as_several_bases_are_served_together_and_the_base_answers_once(
        runs, odd_runs, tiny_model_dir):
    """loraforge's engine: a run with layers removed gets a base of its own (it shared the whole one before), a
    DoRA run too (PEFT cannot mix DoRA rows in a batch), and the model answers under its name once, whole."""
    from loraforge.serve.models import load_served

    served = load_served([str(odd_runs["layers-dropped"]), str(runs[0]), str(odd_runs["dora"])])
    assert list(served) == ["layers-dropped", "echo-a", "dora", str(tiny_model_dir)]
    assert len({id(s.base) for s in served.values()}) == 3
    assert len(served["layers-dropped"].base.model.base_model.model.model.layers) == 1
    assert served[str(tiny_model_dir)].base is served["echo-a"].base and served[str(tiny_model_dir)].adapter is None


@pytest.mark.skipif(machine_lacks() is None, reason="CUDA and vLLM are here: auto picks vLLM")
def test_without_cuda_or_vllm_auto_serves_with_loraforge_engine_and_vllm_is_refused(runs, caplog, capsys):
    lacks = machine_lacks()
    with caplog.at_level("INFO", logger="loraforge.serve"):
        assert choose("auto", [str(r) for r in runs], "127.0.0.1", 8011, 4) == ("hf", None)
    assert f"engine auto -> hf: {lacks}" in caplog.text
    with pytest.raises(LoraforgeError, match="--engine vllm: .*use --engine hf"):
        choose("vllm", [str(r) for r in runs], "127.0.0.1", 8011, 4)
    assert main(["serve", "--engine", "vllm", str(runs[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --engine vllm: {lacks}") and "Traceback" not in err


def test_serve_engine_vllm_starts_vllm_in_its_place_with_the_key_in_its_environment(runs, tmp_path):
    """A machine with CUDA and vLLM, as far as loraforge can tell: torch reports a CUDA device and a `vllm` program
    (this stand-in, as vLLM installed in an environment of its own would be) is on PATH."""
    stand_in = tmp_path / "bin" / "vllm"
    stand_in.parent.mkdir()
    stand_in.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        json.dump({{"argv": sys.argv[1:], "key": os.environ.get("VLLM_API_KEY")}}, open({str(tmp_path / "got.json")!r}, "w"))
        sys.exit(7)
        """))
    stand_in.chmod(0o755)
    script = ("import sys, torch, loraforge.serve.run; torch.cuda.is_available = lambda: True; "
              "from loraforge.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PATH": f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(sys.path), "LORAFORGE_API_KEY": "secret"}
    done = subprocess.run([sys.executable, "-c", script, "serve", *map(str, runs), "--port", "8012"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 7, done.stderr
    got = json.loads((tmp_path / "got.json").read_text())
    assert got["argv"] == command([str(r) for r in runs], "127.0.0.1", 8012)
    assert "--max-num-seqs" not in got["argv"], "vLLM batches as many as it sees fit unless --max-batch says"
    assert [json.loads(m)["name"] for m in option(got["argv"], "--lora-modules")] == ["echo-a", "echo-b"]
    assert got["key"] == "secret" and "secret" not in " ".join(got["argv"])
    assert "engine auto -> vllm" in done.stderr and "engine vllm: vllm serve " in done.stderr
