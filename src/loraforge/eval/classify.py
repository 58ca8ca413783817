"""Labels for texts from a classification model, with the probability of every label."""


def predict_labels(model, tokenizer, labels: list[str], texts: list[str], max_length: int,
                   batch_size: int = 16) -> list[dict]:
    import torch

    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = batch.to(model.device)
        with torch.no_grad():
            probabilities = model(**batch).logits.float().softmax(-1)
        for text, row in zip(chunk, probabilities.tolist()):
            best = max(range(len(labels)), key=row.__getitem__)
            out.append({"text": text, "label": labels[best], "scores": dict(zip(labels, (round(p, 4) for p in row)))})
    return out
