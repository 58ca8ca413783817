"""The Python API: what the CLI does, as functions that return typed results. `import loraforge` gives them
(loaded on first use, so the import itself is instant):

    import loraforge
    config = loraforge.load_config("configs/default.yaml", ["train.max_steps=20"])
    result = loraforge.train(config)            # TrainResult: run_dir, eval losses, metrics, weights, test
    answers = loraforge.generate(result.run_dir, ["Hello!"])

The CLI calls these same functions.
"""

from dataclasses import dataclass
from pathlib import Path

from loraforge.config import RunConfig, load_config
from loraforge.config.env import env_beside, scoped_environment
from loraforge.errors import ConfigError, DataError, ModelError
from loraforge.eval.generate import context_problem, generate_batch, prompt_for
from loraforge.eval.run import run_eval
from loraforge.export.merge import MergeResult, run_merge
from loraforge.model.load import context_length
from loraforge.trained import load_run
from loraforge.training.finish import TrainResult
from loraforge.training.run import run_training

__all__ = ["EvalResult", "MergeResult", "TrainResult", "evaluate", "generate", "load_config", "merge", "train"]


@dataclass
class EvalResult:
    run_dir: Path
    data: str
    rows: int
    # "fine_tuned" and, with compare_base, "base" (a preference run: "preference"): metric name -> value (and a
    # few examples).
    metrics: dict[str, dict]
    written_to: Path
    # What the figures were computed in, and what the run trained in (None without its manifest.json).
    precision: str = "fp32"
    trained_precision: str | None = None


def train(config: RunConfig | str | Path, overrides: list[str] | tuple[str, ...] = (), resume: str | None = None,
          allow_changes: bool = False) -> TrainResult:
    """Train from a RunConfig or a config file (with KEY=VALUE overrides); resume: "auto" or a checkpoint folder.
    The variables of a .env beside the config file hold for the run only. Python's, NumPy's and torch's global
    random generators are seeded with config.seed, as transformers' Trainer seeds them."""
    found = {}
    if not isinstance(config, RunConfig):
        path, config = config, load_config(config, overrides)
        found = env_beside(path)
    elif overrides:
        raise TypeError("overrides apply to a config file; pass the path, or change the RunConfig with model_copy")
    with scoped_environment(found):
        return run_training(config, resume=resume, allow_changes=allow_changes)


def evaluate(run_dir: str | Path, data: str | None = None, split: str = "val", compare_base: bool = False,
             max_samples: int = 32, precision: str | None = None, data_format: str | None = None) -> EvalResult:
    """Metrics of a finished run on its validation or test split, or on a data file in the run's format (or in
    data_format, which a run trained on several formats needs), computed in the precision the run trained in
    unless `precision` ("fp32" or "bf16") says otherwise."""
    found = run_eval(run_dir, data, compare_base, max_samples, split, data_format, precision)
    metrics = {name: found[name] for name in ("base", "fine_tuned", "preference") if name in found}
    return EvalResult(Path(run_dir), found["data"], found["rows"], metrics, Path(found["written_to"]),
                      found["precision"], found["trained_precision"])


def merge(run_dir: str | Path, out: str | Path | None = None) -> MergeResult:
    """The adapter folded into its base, saved as a plain transformers model (RUN_DIR/merged by default)."""
    return run_merge(run_dir, out)


def generate(run_dir: str | Path, prompts: str | list[str], max_new_tokens: int | None = None) -> str | list[str]:
    """Greedy answers of a fine-tuned run, with the run's template and system prompt (a plain-text run continues
    each prompt's text): one answer to one prompt, a list of answers to a list of prompts."""
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ConfigError([f"max_new_tokens {max_new_tokens!r}: give a whole number of 1 or more (or leave it out for "
                           "the run's eval.max_new_tokens)"])
    asked = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(asked, list) or not all(isinstance(p, str) for p in asked):
        raise TypeError(f"prompts: give a str or a list of str, got {prompts!r:.100}")
    run = load_run(run_dir, task="causal_lm", precision="auto")
    config = run.config
    chats = [prompt_for(p, config.data) for p in asked]
    limit, context = max_new_tokens or config.eval.max_new_tokens, context_length(run.model.config)
    for index, chat in enumerate(chats):
        try:
            problem = context_problem(run.tokenizer, chat, limit, context, "max_new_tokens, or the run's "
                                                                              "eval.max_new_tokens")
        except DataError as exc:
            raise DataError(f"prompt {index}: {exc}") from None
        if problem:
            raise ModelError(f"prompt {index}: {problem}")
    answers = generate_batch(run.model, run.tokenizer, chats, limit, run.stop_ids)
    return answers[0] if isinstance(prompts, str) else answers
