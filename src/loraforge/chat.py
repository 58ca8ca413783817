"""Chat with a fine-tuned run: one-shot with --prompt, or an interactive streaming REPL."""

import sys
from pathlib import Path

from loraforge.eval.generate import generate, plain_text_run, prompt_for, prompt_messages
from loraforge.trained import load_run

HELP = "Type a message; /reset clears the conversation, /exit (or Ctrl-D) leaves."
TEXT_HELP = ("This run was trained on plain text: each line you type is continued on its own (no conversation); "
             "/exit (or Ctrl-D) leaves.")


def run_chat(run_dir: str | Path, prompt: str | None = None, max_new_tokens: int | None = None) -> None:
    from transformers import TextStreamer

    run = load_run(run_dir, task="causal_lm")
    config, model, tokenizer, stop_ids = run.config, run.model, run.tokenizer, run.stop_ids
    limit = max_new_tokens or config.eval.max_new_tokens
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if prompt is not None:
        generate(model, tokenizer, prompt_for(prompt, config.data), limit, stop_ids, streamer)
        return
    plain = plain_text_run(config.data)
    print(TEXT_HELP if plain else HELP, file=sys.stderr)
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
        if plain:
            print("continued> ", end="", flush=True)
            generate(model, tokenizer, line, limit, stop_ids, streamer)
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        answer = generate(model, tokenizer, history, limit, stop_ids, streamer)
        history.append({"role": "assistant", "content": answer})
