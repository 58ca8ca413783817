"""report.md: the metrics before and after, the loss curves, and answers side by side."""

from pathlib import Path

from loraforge import rundir

ROWS = (
    ("loss", "eval loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("macro_f1", "macro F1", "{:.3f}"),
    ("rewards/accuracies", "reward accuracy", "{:.3f}"),
    ("rewards/margins", "reward margin", "{:.4f}"),
    ("rewards/chosen", "reward of chosen", "{:.4f}"),
    ("rewards/rejected", "reward of rejected", "{:.4f}"),
    ("nll_loss", "loss of the chosen answers (ORPO)", "{:.4f}"),
    ("kl", "KL to the reference (KTO)", "{:.4f}"),
)


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def write_report(run_dir: Path, title: str, before: dict, after: dict, samples: list[dict], data_summary: str,
                 weights: str | None = None, test: str | None = None, preference: str | None = None) -> Path:
    """before/after: metric name (loss, perplexity, accuracy, macro_f1, rewards/...) -> value; weights: which step
    the fine-tuned weights are from; test: the test split's metrics with those weights; preference: the
    preference accuracy line of a preference run."""
    lines = [f"# {title}", "", f"Run directory: `{run_dir}`", "", f"Data: {data_summary}", ""]
    if weights:
        lines += [f"Fine-tuned weights: {weights}", ""]
    lines += ["## Metrics", "", "| metric | base model | fine-tuned |", "| --- | --- | --- |"]
    for key, name, fmt in ROWS:
        if key in before or key in after:
            show = lambda d: fmt.format(d[key]) if d.get(key) is not None else "-"
            lines.append(f"| {name} | {show(before)} | {show(after)} |")
    if preference:
        lines += ["", "## Held-out preference (validation split)", "", preference]
    if test:
        lines += ["", "## Test split", "", f"With the fine-tuned weights, once, after training: {test}"]
    if (Path(run_dir) / rundir.LOSS_PLOT).is_file():
        lines += ["", "## Loss", "", f"![train and eval loss]({rundir.LOSS_PLOT})"]
    if samples:
        lines += ["", "## Answers", "", "| prompt | base model | fine-tuned |", "| --- | --- | --- |"]
        lines += [f"| {_cell(s['prompt'])} | {_cell(s['base'])} | {_cell(s['finetuned'])} |" for s in samples]
    path = Path(run_dir) / rundir.REPORT
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
