"""Build data/chatterbot_pref_en.jsonl, preference pairs, from data/chatterbot_en.jsonl (chatterbot-corpus, BSD-3-Clause).

Each conversation gives one pair: the prompt is every turn before its last assistant answer, chosen is that
answer, rejected is the last answer of another conversation drawn (seeded) from a different corpus file, so
the rejected answer is fluent but off-topic. Prompts whose rejected draw equals the chosen text are skipped.
Run: python scripts/build_preference_data.py [SRC] [OUT]
"""

import json
import random
import sys

SEED = 0


def pairs(rows: list[dict]):
    rng = random.Random(SEED)
    for index, row in enumerate(rows):
        messages = row["messages"]
        others = [j for j, other in enumerate(rows) if other["source"] != row["source"]]
        rejected = rows[rng.choice(others)]["messages"][-1]["content"]
        if rejected == messages[-1]["content"]:
            continue
        yield {"prompt": messages[:-1], "chosen": messages[-1]["content"], "rejected": rejected,
               "source": row["source"]}


def main(src: str = "data/chatterbot_en.jsonl", out: str = "data/chatterbot_pref_en.jsonl") -> None:
    with open(src, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    built = list(pairs(rows))
    with open(out, "x" if out != "-" else "w", encoding="utf-8") as fh:
        for pair in built:
            fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"wrote {len(built)} preference pairs to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
