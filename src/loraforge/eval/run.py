"""`loraforge eval`: loss, perplexity and token accuracy, then generation metrics against references."""

import hashlib
import json
import logging
import math
import re
import time
import unicodedata
from contextlib import nullcontext
from pathlib import Path

from loraforge import ledger, rundir
from loraforge.config.data_section import DataSource
from loraforge.data.build import DataStats, assign_splits, tokenize_preference, tokenize_rows
from loraforge.data.cache import data_file_digest
from loraforge.data.formats import FORMAT_FIELDS, PREFERENCE_FORMATS
from loraforge.data.packing import collator
from loraforge.data.render import IGNORE
from loraforge.data.rows import load_rows
from loraforge.data.sources import local_problem
from loraforge.errors import ConfigError, DataError
from loraforge.eval.classify import predict_labels
from loraforge.eval.generate import generate_batch
from loraforge.eval.metrics import classification_metrics
from loraforge.eval.preference import held_out_kind, preference_line, preference_metrics
from loraforge.model.precision import cpu_speeds
from loraforge.model.sources import given_in
from loraforge.trained import load_run

log = logging.getLogger(__name__)


def token_metrics(model, dataset, collate, batch_size: int = 8) -> dict:
    """Mean loss over trained tokens, its perplexity, and how often the argmax is the trained token."""
    import torch

    total_loss, tokens, correct = 0.0, 0, 0
    model.eval()
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {key: value.to(model.device) for key, value in collate(rows).items()}
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits.float()
        shifted, targets = logits[:, :-1], labels[:, 1:]
        mask = targets != IGNORE
        total_loss += torch.nn.functional.cross_entropy(
            shifted[mask], targets[mask], reduction="sum"
        ).item()
        correct += (shifted.argmax(-1)[mask] == targets[mask]).sum().item()
        tokens += int(mask.sum())
    loss = total_loss / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1),
            "tokens": tokens}


class Words:
    """ROUGE's tokens: lower-cased words of any script (letters, digits and the marks that combine with them: Indic
    vowel signs, Arabic vowels), and each Chinese or Japanese character on its own (those scripts put no spaces
    between words). rouge_score's default tokenizer keeps a-z and 0-9 only, so any other script scored 0 against
    itself."""

    ONE_CHARACTER = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

    def tokenize(self, text: str) -> list[str]:
        words, word = [], ""
        for char in text.lower():
            if self.ONE_CHARACTER.match(char):
                words += [word, char] if word else [char]
                word = ""
            elif unicodedata.category(char)[0] in "LNM":
                word += char
            elif word:
                words.append(word)
                word = ""
        return words + [word] if word else words


def generation_metrics(outputs: list[str], references: list[str]) -> dict:
    """Exact match, contains, ROUGE-L and valid JSON over the answers; only the count where there are none."""
    from rouge_score import rouge_scorer

    if not outputs:
        return {"samples": 0}
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words())
    n = len(outputs)

    def valid_json(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    return {
        "exact_match": sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / n,
        "contains": sum(r.strip().lower() in o.lower() for o, r in zip(outputs, references)) / n,
        "rouge_l": sum(scorer.score(r, o)["rougeL"].fmeasure for o, r in zip(outputs, references)) / n,
        "valid_json": sum(valid_json(o.strip()) for o in outputs) / n,
        "samples": len(outputs),
    }


SPLIT_FILES = {"val": "validation", "test": "test"}


def has_test_split(config) -> bool:
    return config.data.test_fraction > 0 or any(s.split == "test" for s in config.data.sources)


def sources_as_trained(run_dir: Path, config):
    """The run's config with its data files found where it trained (relative paths start from the folder it trained
    in, as manifest.json records, by the rule of model.name: given_in), refused where a file is gone or changed: its
    held-out rows would not be the ones the run held out."""
    manifest = rundir.read_manifest(run_dir)
    trained_files, cwd = manifest.get("data_files") or {}, manifest.get("cwd")
    sources = []
    for source in config.data.sources:
        digest = trained_files.get(source.path)
        if isinstance(digest, str) and digest.startswith("hub:"):
            sources.append(source)
            continue
        path = given_in(source.path, cwd, "data.sources path")
        if not isinstance(digest, str):
            if path.is_file():
                log.warning("%s records no digest of %s (data.sources path %s), so whether it changed since the run "
                            "trained on it is not checked: its held-out rows are drawn from the file as it is now",
                            run_dir / rundir.MANIFEST, path, source.path)
                sources.append(source.model_copy(update={"path": str(path)}))
            else:
                sources.append(source)
            continue
        if not path.is_file() or data_file_digest(path) != digest:
            state = "is not there" if not path.is_file() else "has changed since the run trained on it"
            raise DataError(f"{path} (data.sources path {source.path} of {run_dir}) {state}, so the run's "
                            "held-out rows cannot be drawn again; evaluate a file as it is with --data")
        sources.append(source.model_copy(update={"path": str(path)}))
    return config.model_copy(update={"data": config.data.model_copy(update={"sources": sources})})


def eval_rows(config, data: str | None, split: str = "val", data_format: str | None = None):
    """(data config, rows) to evaluate: the run's validation or test split, as training drew it, or every row
    of `data`, read in data_format (by default the format of the run's sources, when they share one)."""
    if data is None:
        data_config = config.data
        system = data_config.system_prompt if config.task == "causal_lm" else None  # as classify.py builds rows
        rows = load_rows(data_config.sources, system, data_config.on_bad_row, DataStats())
        _, val, test = assign_splits(rows, data_config, config.seed, DataStats())
        chosen = {"val": val, "test": test}[split]
        if not chosen:
            raise DataError(f"the run has no {SPLIT_FILES[split]} split: set data.test_fraction or give a source with "
                            f"split: {split} when training, or evaluate a file with --data")
        return data_config, chosen
    missing = local_problem(data)
    if missing is not None:
        raise DataError(f"--data {missing}")
    formats = sorted({s.format.value for s in config.data.sources})
    if data_format is None and len(formats) > 1:
        raise DataError(f"--data {data}: the run trained on sources of several formats ({', '.join(formats)}); "
                        "say which one this file is in with --format")
    chosen_by_user = data_format is not None
    data_format = data_format or formats[0]
    readable = readable_formats(config)
    if data_format not in readable:
        kind = f"method {config.method}" if config.task == "causal_lm" else f"task {config.task}"
        raise DataError(f"--format {data_format}: this run ({kind}) evaluates rows of format "
                        f"{' or '.join(sorted(readable))}")
    like = next((s for s in config.data.sources if s.format.value == data_format), None)
    runs_own = like is not None
    if like is None:
        like = DataSource(path=data, format=data_format)
    source = like.model_copy(update={"path": data, "split": "train", "weight": 1.0})
    data_config = config.data.model_copy(update={"sources": [source], "val_fraction": 0.0, "test_fraction": 0.0,
                                                 "packing": False})
    system = data_config.system_prompt if config.task == "causal_lm" else None
    try:
        rows = load_rows(data_config.sources, system, data_config.on_bad_row, DataStats())
    except DataError as exc:
        if f"format={data_format}" not in str(exc):
            raise
        if runs_own:
            mapping = f" with the column names it maps ({source.fields})" if source.fields else ""
            read_as = f"as the run's source of format {data_format}{mapping} and its"
            fix = "fix the rows or name the columns as the run's"
        else:
            read_as = (f"in format {data_format}, with its own column names ({', '.join(FORMAT_FIELDS[data_format])}; "
                       "the run has no source of that format), and the run's")
            fix = "fix the rows or name the columns so"
        another = "" if chosen_by_user else ", or give the file's format with --format"
        raise DataError(f"{exc}\n--data {data} is read {read_as} data.on_bad_row={data_config.on_bad_row}; eval takes "
                        f"no config changes: {fix}{another}") from None
    return data_config, rows["train"]


def readable_formats(config) -> set[str]:
    """The data formats whose rows a run of this kind evaluates."""
    if config.task == "classification":
        return {"classification"}
    if config.method == "kto":
        return set(PREFERENCE_FORMATS)
    if config.method != "sft":
        return {"preference"}
    return set(FORMAT_FIELDS) - PREFERENCE_FORMATS - {"classification"}


def classification_rows_metrics(model, tokenizer, labels: list[str], rows, max_length: int) -> dict:
    """Accuracy, macro-F1 and confusion matrix of a classifier on labelled rows."""
    texts = [r.conversation.messages[0].content for r in rows]
    unknown = sorted({r.conversation.label for r in rows} - set(labels))
    if unknown:
        raise DataError(f"labels {unknown} of the evaluation data are not among the run's labels {labels}")
    actual = [labels.index(r.conversation.label) for r in rows]
    predicted = [labels.index(p["label"]) for p in predict_labels(model, tokenizer, labels, texts, max_length)]
    return classification_metrics(predicted, actual, labels)


def causal_rows_metrics(model, tokenizer, stop_ids, data_config, rows, max_new_tokens: int, max_samples: int) -> dict:
    """Loss, perplexity and token accuracy over the rows, and generation metrics of greedy answers to up to
    max_samples of them against their last assistant message."""
    stats = DataStats()
    dataset, _ = tokenize_rows(rows, tokenizer, stop_ids, data_config, stats)
    if len(dataset) == 0:
        raise DataError(f"all {len(rows)} rows were dropped, as training drops them ({_drops(stats.dropped)}; the "
                        f"run's data.max_length is {data_config.max_length}): nothing is left to measure; give rows "
                        "that fit")
    # Rows whose last message is an answer to something: an assistant message alone has no prompt to answer.
    chats = [r for r in rows if len(r.conversation.messages) > 1 and r.conversation.messages[-1].role == "assistant"]
    chats = chats[:max_samples]
    prompts = [[{"role": m.role, "content": m.content} for m in r.conversation.messages[:-1]] for r in chats]
    references = [r.conversation.messages[-1].content for r in chats]
    log.info("scoring %d rows (loss, perplexity, token accuracy)", len(dataset))
    found = token_metrics(model, dataset, collator(tokenizer, packed=False))
    began = time.perf_counter()

    def answered(done: int, total: int) -> None:
        spent = time.perf_counter() - began
        left = f", about {spent * (total - done) / done:.0f} s left" if done < total else ""
        log.info("answers %d/%d (greedy, up to %d new tokens each): %.0f s%s", done, total, max_new_tokens, spent,
                 left)

    outputs = generate_batch(model, tokenizer, prompts, max_new_tokens, stop_ids, progress=answered) if prompts else []
    found.update(generation_metrics(outputs, references))
    found["rows"] = len(dataset)
    found["dropped"] = dict(stats.dropped)
    found["examples"] = [{"prompt": p[-1]["content"], "reference": r, "output": o}
                         for p, r, o in list(zip(prompts, references, outputs))[:5]]
    return found


def preference_rows_metrics(model, tokenizer, stop_ids, data_config, rows, beta: float, batch_size: int = 4) -> dict:
    """Held-out preference (eval/preference.py) of pairs or unpaired rows."""
    dataset, _ = tokenize_preference(rows, tokenizer, stop_ids, data_config, DataStats())
    return preference_metrics(model, dataset, tokenizer.pad_token_id, beta, batch_size)


def run_eval(run_dir: str | Path, data: str | None = None, compare_base: bool = False, max_samples: int = 32,
             split: str = "val", data_format: str | None = None, precision: str | None = None) -> dict:
    """Metrics of a finished run on its validation or test split, or on a data file; written to
    RUN_DIR/eval (result_path). Computed as the run trained (manifest.json: bf16, or else fp32), so that
    they repeat its end-of-training evaluation (eval.json), unless `precision` says otherwise."""
    if precision not in (None, "fp32", "bf16"):
        raise ConfigError([f"precision {precision!r}: eval computes in fp32 or bf16 (or, left out, as the run trained)"])
    if split not in SPLIT_FILES:
        raise ConfigError([f"split {split!r}: eval draws the run's held-out split {' or '.join(SPLIT_FILES)}; "
                           "evaluate other rows as a file with data"])
    run_dir = Path(run_dir)
    name = data or f"{SPLIT_FILES[split]} split"
    # The rows are read before the model is loaded, so a file that cannot be evaluated is refused at once.
    saved = rundir.read_config(run_dir)
    if data is None:
        saved = sources_as_trained(run_dir, saved)
    data_config, rows = eval_rows(saved, data, split, data_format)
    out = result_path(run_dir, data, split)
    _adopt_earlier_result(out)
    ledger.check(out.parent, [out.name], "eval")
    trained = rundir.trained_precision(run_dir)
    precision = precision or ("bf16" if trained == "bf16" else "fp32")
    run = load_run(run_dir, task="classification" if saved.task == "classification" else "causal_lm",
                   precision=precision)
    if precision == "bf16" and run.model.device.type == "cpu":
        _warn_if_bf16_is_slower(run.model.config)
    base_measured = saved.task == "causal_lm" and saved.method == "sft" and hasattr(run.model, "disable_adapter")
    if compare_base and not base_measured:
        kind = ("a classification run" if saved.task == "classification" else f"a {saved.method} run"
                if saved.method != "sft" else "a full fine-tune (no adapter to switch off)")
        log.warning("--compare-base: eval measures no base model for %s; only the run's own figures follow", kind)
    results = _measure(run, data_config, rows, compare_base, max_samples)
    return _write({"run_dir": str(run_dir), "data": name, "precision": precision, "trained_precision": trained,
                   **results}, run_dir, data, split)


def _warn_if_bf16_is_slower(model_config) -> None:
    speeds = cpu_speeds(model_config)
    if speeds["bf16_gflops"] < speeds["fp32_gflops"]:
        log.warning("eval computes in bf16, as the run trained, to repeat its figures; this CPU runs bf16 matmuls "
                    "slower than fp32 (bf16 %.0f vs fp32 %.0f GFLOP/s): --precision fp32 is faster, its figures "
                    "differ a little from eval.json's", speeds["bf16_gflops"], speeds["fp32_gflops"])


def computed_as(results: dict) -> str:
    """How the figures were computed, against how the run trained."""
    precision, trained = results["precision"], results.get("trained_precision")
    if precision == trained:
        return f"computed in {precision} as trained"
    return f"computed in {precision} ({f'trained in {trained}' if trained else 'no manifest.json says how it trained'})"


def _measure(run, data_config, rows, compare_base: bool, max_samples: int) -> dict:
    config, model = run.config, run.model
    if config.task == "classification":
        return {"rows": len(rows), "fine_tuned": classification_rows_metrics(model, run.tokenizer, run.labels, rows,
                                                                          config.data.max_length)}
    if config.method != "sft":
        found = preference_rows_metrics(model, run.tokenizer, run.stop_ids, data_config, rows, config.preference.beta,
                                         config.train.eval_batch_size or config.train.batch_size)
        return {"rows": found.get("pairs", found.get("rows")), "preference": found}
    variants = {"fine_tuned": nullcontext}
    if compare_base and hasattr(model, "disable_adapter"):
        variants = {"base": model.disable_adapter, **variants}
    results = {}
    for variant, context in variants.items():
        with context():
            results[variant] = causal_rows_metrics(model, run.tokenizer, run.stop_ids, data_config, rows,
                                                   config.eval.max_new_tokens, max_samples)
    results["rows"] = results["fine_tuned"]["rows"]
    results["dropped"] = results["fine_tuned"].pop("dropped")
    results.get("base", {}).pop("dropped", None)
    return results


def _drops(dropped: dict[str, int]) -> str:
    return ", ".join(f"{reason.replace('_', ' ')}: {count}" for reason, count in sorted(dropped.items()))


def result_path(run_dir: Path, data: str | None, split: str) -> Path:
    """RUN_DIR/eval/validation.json or test.json for a split; for a file, its name and a digest of its full path,
    so that files of one name in different folders, or named like a split, keep their results apart."""
    if data is None:
        return run_dir / "eval" / f"{SPLIT_FILES[split]}.json"
    where = hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:8]
    return run_dir / "eval" / f"data-{Path(data).stem}-{where}.json"


def _adopt_earlier_result(out: Path) -> None:
    """A result file an eval wrote before eval kept a ledger (a run evaluated by an earlier loraforge): its own JSON,
    with the keys every eval result holds, is recorded as eval's, so that eval rewrites it instead of refusing."""
    if not out.is_file() or out.name in ledger.read(out.parent).get("files", {}):
        return
    try:
        found = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(found, dict) and {"run_dir", "data", "precision", "trained_precision", "rows"} <= found.keys():
        ledger.record(out.parent, [out.name])


def _write(results: dict, run_dir: Path, data: str | None, split: str) -> dict:
    """Into RUN_DIR/eval, rewriting only a result file an earlier eval wrote there (ledger.py)."""
    out = result_path(run_dir, data, split)
    ledger.claim(out.parent, [out.name], "eval")
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    ledger.record(out.parent, [out.name])
    results["written_to"] = str(out)
    return results


def format_results(results: dict) -> str:
    if "preference" in results:
        return (f"{preference_line(results['preference'])}\n{results['rows']} {held_out_kind(results['preference'])} "
                f"from {results['data']}, {computed_as(results)}; "
                f"written to {results['written_to']}")
    names = [n for n in ("base", "fine_tuned") if n in results]
    keys = ("loss", "perplexity", "token_accuracy", "exact_match", "contains", "rouge_l", "valid_json")
    if "accuracy" in results[names[-1]]:
        keys = ("accuracy", "macro_f1")
    lines = [f"{'metric':<16}" + "".join(f"{n:>14}" for n in names)]
    for key in keys:
        lines.append(f"{key:<16}" + "".join(f"{results[n][key]:>14.4f}" if key in results[n] else f"{'n/a':>14}"
                                            for n in names))
    drops = results.get("dropped")
    dropped = f" ({sum(drops.values())} more dropped as training drops them: {_drops(drops)})" if drops else ""
    lines.append(f"{results['rows']} rows from {results['data']}{dropped}, {computed_as(results)}; "
                 f"written to {results['written_to']}")
    return "\n".join(lines)
