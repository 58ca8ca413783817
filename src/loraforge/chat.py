"""Chat with a fine-tuned run: one-shot with --prompt, or an interactive streaming REPL."""

import sys
from pathlib import Path

from loraforge.errors import ModelError
from loraforge.eval.generate import generate, plain_text_run, prompt_for, prompt_ids, prompt_messages
from loraforge.model.load import context_length
from loraforge.trained import load_run

HELP = "Type a message; Ctrl-C stops an answer, /reset clears the conversation, /exit (or Ctrl-D) leaves."
TEXT_HELP = ("This run was trained on plain text: each line you type is continued on its own (no conversation); "
             "/exit (or Ctrl-D) leaves.")


def run_chat(run_dir: str | Path, prompt: str | None = None, max_new_tokens: int | None = None) -> None:
    from transformers import TextStreamer

    run = load_run(run_dir, task="causal_lm")
    config, model, tokenizer, stop_ids = run.config, run.model, run.tokenizer, run.stop_ids
    limit = max_new_tokens or config.eval.max_new_tokens
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    context = context_length(model.config)

    def room(asked) -> int:
        return context - len(prompt_ids(tokenizer, asked))

    if prompt is not None:
        asked = prompt_for(prompt, config.data)
        if limit > room(asked):
            raise ModelError(f"an answer of up to {limit} tokens (--max-new-tokens, or the run's eval.max_new_tokens) "
                             f"after this prompt passes the model's context of {context} tokens; ask for at most "
                             f"{max(room(asked), 0)}, or shorten the prompt")
        generate(model, tokenizer, asked, limit, stop_ids, streamer)
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
            if limit > room(line):
                print(f"(that text and an answer of up to {limit} tokens pass the model's context of {context} "
                      "tokens; shorten it)", file=sys.stderr)
                continue
            print("continued> ", end="", flush=True)
            generate(model, tokenizer, line, limit, stop_ids, streamer)
            continue
        history.append({"role": "user", "content": line})
        first = 1 if history[0]["role"] == "system" else 0
        if limit > room(history) and len(history) - first > 1:
            while limit > room(history) and len(history) - first > 1:
                del history[first : first + 2]
            print(f"(the conversation passed the model's context of {context} tokens: its oldest turns are left "
                  "out)", file=sys.stderr)
        if limit > room(history):
            history.pop()
            print(f"(that message and an answer of up to {limit} tokens pass the model's context of {context} "
                  "tokens; shorten it)", file=sys.stderr)
            continue
        print("assistant> ", end="", flush=True)
        try:
            answer = generate(model, tokenizer, history, limit, stop_ids, streamer)
        except KeyboardInterrupt:
            history.pop()
            print("\n(answer stopped; that message is left out of the conversation)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": answer})
