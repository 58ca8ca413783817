"""Chat with a fine-tuned run: one-shot with --prompt, or an interactive streaming REPL."""

import sys
from pathlib import Path

from loraforge import rundir

HELP = "Type a message; /reset clears the conversation, /exit (or Ctrl-D) leaves."


def load_model_from_run(run_dir: Path, config, labels: list[str] | None = None):
    """The trained model of a run, rebuilt as it was trained: same base, dtype, quantization and variant."""
    from peft import PeftModel

    from loraforge.model.load import load_for_run
    from loraforge.model.sources import resolve_model

    if (run_dir / rundir.MODEL / "config.json").is_file():
        from loraforge.model.load import load_model

        return load_model(str(run_dir / rundir.MODEL), task=config.task, labels=labels)
    base = load_for_run(config, resolve_model(config.model.name), labels=labels)
    return PeftModel.from_pretrained(base, str(run_dir / rundir.ADAPTER))


def load_run(run_dir: str | Path):
    """(config, trained model, tokenizer, stop ids) rebuilt from what the run directory recorded."""
    from loraforge.data.render import stop_token_ids
    from loraforge.errors import RunDirError
    from loraforge.model.load import load_tokenizer

    run_dir = Path(run_dir)
    config = rundir.read_config(run_dir)
    if config.task != "causal_lm":
        raise RunDirError(f"{run_dir} is a {config.task} run; use `loraforge predict {run_dir} --text ...`")
    tokenizer = load_tokenizer(str(run_dir / rundir.TOKENIZER))
    model = load_model_from_run(run_dir, config)
    model.eval()
    return config, model, tokenizer, stop_token_ids(tokenizer, model.generation_config)


def run_chat(run_dir: str | Path, prompt: str | None = None, max_new_tokens: int | None = None) -> None:
    from transformers import TextStreamer

    from loraforge.eval.generate import generate, prompt_messages

    config, model, tokenizer, stop_ids = load_run(run_dir)
    limit = max_new_tokens or config.eval.max_new_tokens
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if prompt is not None:
        generate(model, tokenizer, prompt_messages(prompt, config.data.system_prompt), limit, stop_ids, streamer)
        return
    print(HELP, file=sys.stderr)
    history = prompt_messages("", config.data.system_prompt)[:-1]
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if history and history[0]["role"] == "system" else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        answer = generate(model, tokenizer, history, limit, stop_ids, streamer)
        history.append({"role": "assistant", "content": answer})
