"""Convert the English part of chatterbot-corpus (BSD-3-Clause) into data/chatterbot_en.jsonl.

Each corpus conversation alternates speakers; the first speaks as `user`, the second as `assistant`.
A conversation whose last turn is a user's loses that turn, since nothing answers it.
Run: python scripts/build_chatterbot_data.py [OUT]   (needs `pip install chatterbot-corpus==1.3.3`)
"""

import json
import sys
from importlib.metadata import distribution
from pathlib import Path

import yaml


def conversations(corpus_dir: Path):
    for path in sorted(corpus_dir.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for turns in data.get("conversations") or []:
            texts = [str(t).strip() for t in turns]
            if len(texts) % 2:
                texts = texts[:-1]
            if len(texts) < 2 or not all(texts):
                continue
            roles = ["user", "assistant"] * (len(texts) // 2)
            yield {
                "messages": [{"role": r, "content": t} for r, t in zip(roles, texts)],
                "source": f"chatterbot-corpus/english/{path.name}",
            }


def main(out: str = "data/chatterbot_en.jsonl") -> None:
    corpus_dir = Path(str(distribution("chatterbot-corpus").locate_file("chatterbot_corpus/data/english")))
    rows = list(conversations(corpus_dir))
    with open(out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} conversations to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
