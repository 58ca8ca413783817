"""Loss curves as PNG, drawn from metrics.jsonl."""

from pathlib import Path

from loraforge.rundir import read_metrics


def read_loss_series(metrics_path: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) lists of (step, loss) from metrics.jsonl, in step order (the step-0 evaluation of a LoRA
    run is written at the end)."""
    train, evaluation = [], []
    for record in read_metrics(metrics_path):
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            evaluation.append((record["step"], record["eval_loss"]))
    return sorted(train), sorted(evaluation)


def plot_loss(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = loss_figure(*read_loss_series(metrics_path), title=title)
    figure.savefig(out_path)
    plt.close(figure)
    return Path(out_path)


# Up to this many points a curve marks each one: a short run logs a handful, and a lone point drawn as a line shows
# nothing at all.
MARKED_POINTS = 40


def loss_figure(train: list[tuple[int, float]], evaluation: list[tuple[int, float]], title: str = ""):
    """Train and eval loss against the optimizer step (whole steps on the axis)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue",
                  marker="." if len(train) <= MARKED_POINTS else None)
    if evaluation:
        axes.plot(*zip(*evaluation), label="eval loss", color="tab:orange", marker="o")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
