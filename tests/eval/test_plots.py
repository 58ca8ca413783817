"""loss.png: what a short run logs is visible, on an axis of whole steps."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from loraforge.eval.plots import loss_figure, plot_loss  # noqa: E402


def test_a_run_with_one_logged_train_loss_shows_it_on_whole_steps():
    """A 2-step run with logging_steps 10 logs one train loss: it was drawn as a line of one point, which shows
    nothing, beside a legend naming it, on an axis of steps 0.25, 0.5, ..."""
    figure = loss_figure([(2, 3.1)], [(0, 3.4), (2, 3.0)])
    train, evaluation = figure.axes[0].lines
    assert train.get_marker() not in (None, "None", "") and evaluation.get_marker() == "o"
    ticks = figure.axes[0].get_xticks()
    assert len(ticks) > 1 and all(float(t).is_integer() for t in ticks)
    plt.close(figure)


def test_a_long_curve_is_a_plain_line():
    figure = loss_figure([(step, 3.0 - step / 1000) for step in range(1, 500)], [])
    assert figure.axes[0].lines[0].get_marker() in (None, "None", "")
    plt.close(figure)


def test_the_png_is_written_from_metrics_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in (
        {"step": 0, "eval_loss": 3.4}, {"step": 2, "loss": 3.1}, {"step": 2, "eval_loss": 3.0})) + "\n")
    out = plot_loss(metrics, tmp_path / "loss.png", title="t")
    height, width, _ = imread(out).shape
    assert (width, height) == (770, 440)
