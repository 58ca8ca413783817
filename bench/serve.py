"""`loraforge serve` under load, with and without batching, side by side in one run: N concurrent clients each
send R chat requests (greedy, max_tokens T) to a server on a free port on 127.0.0.1; requests/s, p50/p95
latency and generated tokens/s for --max-batch 1 (one request at a time) and --max-batch N.

Then the generation engines alone, without HTTP, on the base with its adapters off: loraforge's batches against
transformers' continuous batching (the engine of `transformers serve`), the same prompts arriving at once and then
one every --gap seconds, greedy, the same token limit and stop tokens.

    python bench/serve.py [RUN_DIR ...] [--clients 16] [--requests 2] [--max-tokens 32] [--gap 0.5]

Without RUN_DIR it trains two 2-step runs of configs/default.yaml on the built-in model (offline) and serves
both from one base, the clients alternating between them. Results: bench/results/serve-<date>-<cpu>.md.
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, new_result  # noqa: E402

PROMPTS = ["Hello", "What is AI?", "Tell me a joke.", "Who are you?", "What is your favourite colour?",
           "Do you like music?", "What do you do?", "Are you a robot?"]


def quick_runs(folder: Path) -> list[str]:
    from loraforge.config import load_config
    from loraforge.training.run import run_training

    runs = []
    for name, rate in (("serve-a", 2e-4), ("serve-b", 1e-3)):
        config = load_config(ROOT / "configs" / "default.yaml", [
            f"output_dir={folder / name}", "train.max_steps=2", f"train.learning_rate={rate}", "train.eval_every=1000",
            "train.save_every=null", "eval.num_samples=0", "eval.sample_prompts=[]", "report_to=[]"])
        run_training(config)
        runs.append(str(folder / name))
    return runs


def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        api = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600, max_retries=0)
        barrier.wait(timeout=60)
        for turn in range(requests):
            started = time.perf_counter()
            answer = api.chat.completions.create(
                model=models[index % len(models)], temperature=0, max_tokens=max_tokens,
                messages=[{"role": "user", "content": PROMPTS[(index + turn) % len(PROMPTS)]}])
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += answer.usage.completion_tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1800)
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(latencies), "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            "p50_s": round(statistics.median(ordered), 2), "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
            "tokens_per_s": round(tokens[0] / wall, 1)}


def engines(served, prompts: list[list[int]], max_tokens: int, gap_s: float) -> dict[str, dict]:
    """Seconds until each prompt's answer is done, and generated tokens/s, for loraforge's engine and for
    transformers' continuous batching, the prompts submitted gap_s apart, each engine warmed up by one prompt."""
    import torch
    from transformers import GenerationConfig

    from loraforge.serve.engine import Engine, Job

    def summary(latencies: list[float], tokens: int, wall: float) -> dict:
        ordered = sorted(latencies)
        return {"p50_s": round(statistics.median(ordered), 2), "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
                "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}

    engine = Engine(max_batch=len(prompts))
    warm = threading.Event()
    engine.submit(Job(served, prompts[0], 2, 0.0, 1.0, [], 0, deliver=lambda event: event[0] != "delta" and warm.set()))
    warm.wait(timeout=600)
    done: dict[int, float] = {}
    jobs = []
    started = time.perf_counter()
    for index, ids in enumerate(prompts):
        submitted = time.perf_counter()
        job = Job(served, ids, max_tokens, 0.0, 1.0, [], 0,
                  deliver=lambda event, i=index, at=submitted: done.setdefault(i, time.perf_counter() - at)
                  if event[0] != "delta" else None)
        jobs.append(job)
        engine.submit(job)
        time.sleep(gap_s)
    while len(done) < len(prompts):
        time.sleep(0.01)
    ours = summary(list(done.values()), sum(len(j.tokens) for j in jobs), time.perf_counter() - started)
    engine.close()

    model = served.base.model
    settings = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(served.stop_ids),
                                pad_token_id=served.tokenizer.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        manager = model.base_model.model.init_continuous_batching(generation_config=settings)
        manager.start()
        try:
            manager.add_request(list(prompts[0]), request_id="warm-up", max_new_tokens=2)
            for _ in manager.request_id_iter("warm-up"):
                pass
            submitted, latencies, tokens = {}, [], [0]

            def collect() -> None:
                """Each answer timed when it is done, while prompts are still being submitted."""
                while len(latencies) < len(prompts):
                    result = manager.get_result(timeout=600)
                    if result is None:
                        return
                    if result.is_finished():
                        latencies.append(time.perf_counter() - submitted[result.request_id])
                        generated = result.generated_tokens
                        # Its stop token is in the list; loraforge counts answers without it.
                        tokens[0] += len(generated) - (1 if generated and generated[-1] in served.stop_ids else 0)

            reader = threading.Thread(target=collect)
            started = time.perf_counter()
            reader.start()
            for index, ids in enumerate(prompts):
                submitted[f"prompt-{index}"] = time.perf_counter()
                manager.add_request(list(ids), request_id=f"prompt-{index}", max_new_tokens=max_tokens)
                time.sleep(gap_s)
            reader.join(timeout=1800)
            if len(latencies) < len(prompts):
                raise RuntimeError("transformers' continuous batching stopped without every answer")
            tokens = tokens[0]
            theirs = summary(latencies, tokens, time.perf_counter() - started)
        finally:
            manager.stop(block=True, timeout=30)
    return {"loraforge batches": ours, "transformers continuous batching": theirs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gap", type=float, default=0.5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import platform

    from loraforge.cli import tune_process
    from loraforge.serve.run import Background, build

    tune_process()
    runs = args.runs or quick_runs(Path(tempfile.mkdtemp(prefix="bench-serve-")))
    rows = []
    for max_batch in (1, args.clients):
        app, engine, names = build(runs, max_batch=max_batch, timeout_s=1800)
        server = Background(app)
        try:
            load(server.url, names[: len(runs)], 2, 1, 4)
            engine.batch_sizes.clear()
            found = load(server.url, names[: len(runs)], args.clients, args.requests, args.max_tokens)
            found["max_batch"], found["mean_batch"] = max_batch, round(statistics.mean(engine.batch_sizes), 1)
            rows.append(found)
        finally:
            server.stop()
            engine.close()
    from loraforge.model.template import apply_template
    from loraforge.serve.models import load_served

    served = load_served(runs)
    base = next(s for s in served.values() if s.adapter is None and s.base.adapters)
    prompts = [list(apply_template(base.tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                   add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for i in range(args.clients)]
    compared = {gap: engines(base, prompts, args.max_tokens, gap) for gap in (0.0, args.gap)}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = [f"Measured {date.today()} on {cpu}: {args.clients} clients x {args.requests} chat requests, greedy, "
             f"max_tokens {args.max_tokens}, runs {', '.join(Path(r).name for r in runs)} on one base.", "",
             "| --max-batch | mean batch | requests/s | p50 latency s | p95 latency s | generated tok/s | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['max_batch']} | {r['mean_batch']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} | "
              f"{r['tokens_per_s']} | {r['wall_s']} |" for r in rows]
    lines += ["", f"The engines alone, {args.clients} prompts to the base {base.name} (adapters off), greedy, max_tokens "
              f"{args.max_tokens}, seconds from each prompt's arrival to its last token:", "",
              "| engine | prompts arrive | p50 s | p95 s | generated tok/s | wall s |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {'at once' if gap == 0 else f'{gap:g} s apart'} | {r['p50_s']} | {r['p95_s']} | "
              f"{r['tokens_per_s']} | {r['wall_s']} |" for gap, found in compared.items() for name, r in found.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(f"{new_result('serve-', ('.md',))}.md")
    out.write_text(text, encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
