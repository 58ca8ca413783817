"""Greedy generation from a chat prompt, optionally streamed."""

from loraforge.model.template import apply_template


def prompt_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*messages, {"role": "user", "content": prompt}]


def generate(model, tokenizer, messages: list[dict], max_new_tokens: int, stop_ids, streamer=None) -> str:
    import torch

    inputs = apply_template(
        tokenizer, messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    model.eval()
    with torch.no_grad():
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


def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, stop_ids,
                   batch_size: int = 8) -> list[str]:
    """Greedy answers for several chats at once, left-padded so every prompt ends where generation starts."""
    import torch

    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [apply_template(tokenizer, c, tokenize=False, add_generation_prompt=True) for c in chunk]
            inputs = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(model.device)
            with torch.no_grad():
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=sorted(stop_ids),
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers
