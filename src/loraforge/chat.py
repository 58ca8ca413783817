"""Chat with a fine-tuned run: one-shot with --prompt, or an interactive streaming REPL."""

import sys
from pathlib import Path

from loraforge.errors import DataError, ModelError
from loraforge.eval.generate import (context_problem, generate, plain_text_run, prompt_for, prompt_messages,
                                     require_utf8)
from loraforge.model.load import context_length
from loraforge.trained import load_run

HELP = "Type a message; Ctrl-C stops an answer, /reset clears the conversation, /exit (or Ctrl-D) leaves."
TEXT_HELP = ("This run was trained on plain text: each line you type is continued on its own (no conversation); "
             "Ctrl-C stops a continuation, /exit (or Ctrl-D) leaves.")


def run_chat(run_dir: str | Path, prompt: str | None = None, max_new_tokens: int | None = None) -> None:
    from transformers import TextStreamer

    run = load_run(run_dir, task="causal_lm", precision="auto")
    config, model, tokenizer, stop_ids = run.config, run.model, run.tokenizer, run.stop_ids
    limit = max_new_tokens or config.eval.max_new_tokens
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    context = context_length(model.config)

    def too_long(asked) -> str | None:
        """Why asked, with an answer of up to `limit` tokens, does not fit the model's context; None when it fits."""
        return context_problem(tokenizer, asked, limit, context, "--max-new-tokens, or the run's eval.max_new_tokens")

    def answer(asked) -> str | None:
        """The streamed answer; None when Ctrl-C stopped it."""
        try:
            return generate(model, tokenizer, asked, limit, stop_ids, streamer)
        except KeyboardInterrupt:
            print("\n(answer stopped)", file=sys.stderr)
            return None

    if prompt is not None:
        asked = prompt_for(prompt, config.data)
        try:
            problem = too_long(asked)
        except DataError as exc:
            raise DataError(f"--prompt: {exc}") from None
        if problem:
            raise ModelError(f"--prompt: {problem}")
        generate(model, tokenizer, asked, limit, stop_ids, streamer)
        return
    plain = plain_text_run(config.data)
    print(TEXT_HELP if plain else HELP, file=sys.stderr)
    history = prompt_messages("", config.data.system_prompt)[:-1]
    first = len(history)  # the system message, kept when old turns are left out
    while True:
        try:
            line = input("you> ").strip()
            require_utf8(line)
        except EOFError:
            print(file=sys.stderr)
            return
        except (UnicodeDecodeError, DataError):
            print("(that line is not UTF-8 text; type it again)", file=sys.stderr)
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            del history[first:]
            continue
        if not line:
            continue
        if plain:
            if too_long(line):
                print(f"(that text: {too_long(line)})", file=sys.stderr)
                continue
            print("continued> ", end="", flush=True)
            answer(line)
            continue
        history.append({"role": "user", "content": line})
        if too_long(history) and len(history) - first > 1:
            while too_long(history) and len(history) - first > 1:
                del history[first : first + 2]
            print(f"(the conversation passed the model's context of {context} tokens: its oldest turns are left "
                  "out)", file=sys.stderr)
        if too_long(history):
            print(f"(that message: {too_long(history)})", file=sys.stderr)
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        said = answer(history)
        if said is None:
            history.pop()
            continue
        history.append({"role": "assistant", "content": said})
