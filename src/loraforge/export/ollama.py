"""`loraforge export ollama`: a Modelfile next to the GGUF with the run's template, system prompt and stop tokens."""

from pathlib import Path

from loraforge import rundir
from loraforge.errors import ExportError
from loraforge.export import ledger
from loraforge.export.gguf import gguf_path, run_export_gguf
from loraforge.model.load import load_model_config, load_tokenizer
from loraforge.model.sources import resolve_model
from loraforge.model.template import apply_template
from loraforge.training.prepare import model_stop_ids

# Ollama passes the Modelfile's SYSTEM as the first of .Messages when a chat brings no system message, and every
# system message stays in .Messages besides being joined into .System: the template renders .Messages alone, as
# Ollama's own chatml template does, or the system text would appear twice.
CHATML_GO_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def default_system(tokenizer) -> str | None:
    """The system text a ChatML template adds when the chat has none (SmolLM2's does), found by rendering."""
    text = apply_template(tokenizer, [{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    if not text.startswith(head):
        return None
    return text[len(head) : text.index("<|im_end|>")]


def modelfile(gguf_name: str, tokenizer, system_prompt: str | None, stop_tokens: list[str]) -> str:
    probe = apply_template(
        tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
        tokenize=False,
    )
    if probe != "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n":
        raise ExportError(
            "the run's chat template is not ChatML, the one format loraforge translates to an Ollama TEMPLATE; "
            "write the Modelfile's TEMPLATE by hand (the GGUF carries the Jinja template)"
        )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{CHATML_GO_TEMPLATE}"""']
    system = system_prompt if system_prompt is not None else default_system(tokenizer)
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    return "\n".join(lines) + "\n"


def run_export_ollama(run_dir: str | Path, kind: str = "q8_0") -> Path:
    run_dir = Path(run_dir)
    config = rundir.read_config(run_dir)
    gguf = gguf_path(run_dir, kind)
    if not ledger.written(gguf.parent, gguf.name):
        gguf = run_export_gguf(run_dir, kind)
    tokenizer = load_tokenizer(str(run_dir / rundir.TOKENIZER))
    base = resolve_model(config.model.name)
    stop_ids = model_stop_ids(tokenizer, base, load_model_config(base, config.model.revision), config.model.revision)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)]
    path = gguf.parent / "Modelfile"
    ledger.claim(path.parent, [path.name], "export")
    path.write_text(modelfile(gguf.name, tokenizer, config.data.system_prompt, stops), encoding="utf-8")
    ledger.record(path.parent, [path.name])
    return path
