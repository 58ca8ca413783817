"""`loraforge export ollama`: a Modelfile next to the GGUF with the run's template, system prompt and stop tokens."""

from pathlib import Path

from loraforge import rundir
from loraforge.errors import ExportError
from loraforge import ledger
from loraforge.export.gguf import gguf_is_current, gguf_path, refuse_other_tasks, run_export_gguf
from loraforge.export.merge import run_digest
from loraforge.model.load import load_model_config, load_tokenizer
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
    if system is not None and '"""' in system:
        raise ExportError('the system prompt holds """, which ends a Modelfile\'s SYSTEM text early and which a '
                          "Modelfile cannot escape; write its SYSTEM line by hand")
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    return "\n".join(lines) + "\n"


def run_export_ollama(run_dir: str | Path, kind: str = "q8_0") -> Path:
    """The Modelfile is checked (ChatML template, a SYSTEM text it can hold, no file of someone else's in its place)
    before the GGUF it names is written; a GGUF made from the run as it is now is reused."""
    run_dir = Path(run_dir)
    refuse_other_tasks(run_dir)
    config = rundir.read_config(run_dir)
    tokenizer = load_tokenizer(str(run_dir / rundir.TOKENIZER))
    base = rundir.base_model(run_dir, config)
    stop_ids = model_stop_ids(tokenizer, base, load_model_config(base, config.model.revision), config.model.revision)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)]
    gguf = gguf_path(run_dir, kind)
    text = modelfile(gguf.name, tokenizer, config.data.system_prompt, stops)
    path = gguf.parent / "Modelfile"
    ledger.check(path.parent, [path.name], "export")
    digest = run_digest(run_dir)
    if not gguf_is_current(run_dir, kind, digest):
        run_export_gguf(run_dir, kind, digest)
    ledger.claim(path.parent, [path.name], "export")
    path.write_text(text, encoding="utf-8")
    ledger.record(path.parent, [path.name])
    return path
