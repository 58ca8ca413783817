"""`loraforge predict`: labels for texts from a classification run."""

import json
import sys
from pathlib import Path

from loraforge import rundir
from loraforge.errors import DataError, RunDirError


def load_classifier(run_dir: str | Path):
    from loraforge.chat import load_model_from_run
    from loraforge.model.load import load_tokenizer

    run_dir = Path(run_dir)
    config = rundir.read_config(run_dir)
    if config.task != "classification":
        raise RunDirError(f"{run_dir} is a {config.task} run; use `loraforge chat {run_dir}`")
    labels = json.loads((run_dir / rundir.LABELS).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(str(run_dir / rundir.TOKENIZER))
    model = load_model_from_run(run_dir, config, labels=labels)
    model.eval()
    return config, model, tokenizer, labels


def predict(model, tokenizer, labels: list[str], texts: list[str], max_length: int, batch_size: int = 16) -> list[dict]:
    import torch

    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            probabilities = model(**batch).logits.float().softmax(-1)
        for text, row in zip(chunk, probabilities.tolist()):
            best = max(range(len(labels)), key=row.__getitem__)
            out.append({"text": text, "label": labels[best], "scores": dict(zip(labels, (round(p, 4) for p in row)))})
    return out


def read_texts(path: str) -> list[str]:
    """A .jsonl file with a "text" field per line, or a plain file with one text per line."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: file not found")
    texts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{file}:{number}: expected an object with a \"text\" field")
            texts.append(row["text"])
        else:
            texts.append(line)
    return texts


def run_predict(run_dir: str, text: str | None = None, file: str | None = None, stream=None) -> list[dict]:
    stream = stream or sys.stdout
    texts = [text] if text is not None else read_texts(file)
    config, model, tokenizer, labels = load_classifier(run_dir)
    results = predict(model, tokenizer, labels, texts, config.data.max_length)
    for result in results:
        if text is not None:
            print(f"{result['label']}\t{result['scores'][result['label']]:.3f}", file=stream)
        else:
            print(json.dumps(result, ensure_ascii=False), file=stream)
    return results
