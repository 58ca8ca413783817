"""Greedy generation from a prompt, optionally streamed. A prompt is a chat (a list of messages, rendered by the
chat template with the assistant's turn opened) or, for a run trained on plain text only, the text to continue."""

from loraforge.errors import DataError
from loraforge.model.template import apply_template


def prompt_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*messages, {"role": "user", "content": prompt}]


def plain_text_run(data_config) -> bool:
    """Every source is format text: the run learned to continue text, with no chat template involved."""
    return all(source.format.value == "text" for source in data_config.sources)


def prompt_for(prompt: str, data_config) -> str | list[dict]:
    """What a run is asked: the text itself after plain-text training, else a chat with the run's system prompt."""
    return prompt if plain_text_run(data_config) else prompt_messages(prompt, data_config.system_prompt)


def prompt_text(prompt: str | list[dict]) -> str:
    """What was asked, for records: the text, or the chat's last message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def asked_of(prompts: list[str], data_config, tokenizer) -> list[str | list[dict]]:
    """What a run is asked for each prompt, each rendered once now: a template that cannot render one fails here,
    before training, rather than at an evaluation during it or after it."""
    asked = [prompt_for(prompt, data_config) for prompt in prompts]
    for prompt in asked:
        prompt_ids(tokenizer, prompt)
    return asked


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A text is tokenized as training tokenized its rows (BOS where the tokenizer adds it, no EOS). DataError for
    text that is not UTF-8 (bytes read as lone surrogates, from a terminal or a file) and for a prompt of no tokens."""
    for text in [prompt] if isinstance(prompt, str) else [m.get("content") for m in prompt if isinstance(m, dict)]:
        if isinstance(text, str):
            require_utf8(text)
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            raise DataError("the prompt is empty: give some text to continue")
        return ids
    text = apply_template(tokenizer, prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_problem(tokenizer, prompt: str | list[dict], limit: int, context: int, limit_key: str) -> str | None:
    """Why a prompt with an answer of up to `limit` tokens (set by limit_key) does not fit the model's context of
    `context` tokens; None when it fits."""
    room = context - len(prompt_ids(tokenizer, prompt))
    if room < 1:
        return f"it fills the model's context of {context} tokens by itself ({context - room} tokens); shorten it"
    if limit <= room:
        return None
    return (f"it and an answer of up to {limit} tokens ({limit_key}) pass the model's context of {context} tokens; "
            f"shorten it, or ask for at most {room} tokens")


def require_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"the prompt is not UTF-8 text (character {exc.start + 1} is a byte that is not UTF-8); send "
                        "or save it as UTF-8") from None


def as_trained(model):
    """A model with bf16 weights (a bf16 run's, as it trains) generates under bf16 autocast, as its forward runs in
    training, where its fp32 layers (LoRA's, a head trained in full) meet bf16 activations."""
    import torch

    bf16 = any(param.dtype == torch.bfloat16 for param in model.parameters())
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=bf16)


def generate(model, tokenizer, prompt: str | list[dict], max_new_tokens: int, stop_ids, streamer=None) -> str:
    import torch

    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=model.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad(), as_trained(model):
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def generate_batch(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int, stop_ids,
                   batch_size: int = 8, progress=None) -> list[str]:
    """Greedy answers for several prompts at once, left-padded so every prompt ends where generation starts.
    progress: called with (answers done, answers in all) after each batch."""
    import torch

    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [{"input_ids": prompt_ids(tokenizer, prompt)} for prompt in chunk]
            inputs = tokenizer.pad(ids, padding=True, return_tensors="pt").to(model.device)
            with torch.no_grad(), as_trained(model):
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=sorted(stop_ids),
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if progress is not None:
                progress(len(answers), len(prompts))
    finally:
        tokenizer.padding_side = side
    return answers
