"""`loraforge predict`: labels for texts from a classification run."""

import json
import sys
from pathlib import Path

from loraforge.errors import DataError
from loraforge.eval.classify import predict_labels
from loraforge.trained import load_run


def read_texts(path: str) -> list[str]:
    """A .jsonl file with a "text" field per line, or a plain file with one text per line."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: file not found")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{file}:{line}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{file}:{number}: expected an object with a \"text\" field")
            if not row["text"].strip():
                raise DataError(f"{file}:{number}: the text is empty; a label needs some text to go on")
            texts.append(row["text"])
        else:
            texts.append(line)
    if not texts:
        raise DataError(f"{file}: holds no texts; give one per line (or a \"text\" field per line in .jsonl)")
    return texts


def run_predict(run_dir: str, text: str | None = None, file: str | None = None, stream=None) -> list[dict]:
    stream = stream or sys.stdout
    if text is not None and not text.strip():
        raise DataError("--text is empty; a label needs some text to go on")
    texts = [text] if text is not None else read_texts(file)
    run = load_run(run_dir, task="classification")
    results = predict_labels(run.model, run.tokenizer, run.labels, texts, run.config.data.max_length)
    for result in results:
        if text is not None:
            print(f"{result['label']}\t{result['scores'][result['label']]:.3f}", file=stream)
        else:
            print(json.dumps(result, ensure_ascii=False), file=stream)
    return results
