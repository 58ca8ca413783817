"""The `loraforge` command. Each subcommand parses its arguments and calls one run_* function.

This is the one place that defers imports: every command module pulls in torch and transformers (~6 s), so
each handler imports its own when it runs, after reading its config, and `loraforge --help`, `config validate`
or a config with a mistake answers at once. Inside
the package every import sits at the top of its module, except the heavy libraries (torch, transformers,
peft, trl, datasets, bitsandbytes, accelerate, matplotlib, gguf, rouge_score, tensorboard, huggingface_hub) in the
modules that `config` commands load (tests/test_imports.py checks both rules).
"""

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from loraforge import __version__, rundir
from loraforge.config import RunConfig, config_to_yaml, load_config
from loraforge.config.load import located
from loraforge.config.env import env_beside, read_env_beside, scoped_environment
from loraforge.config.migrate import write_migrated
from loraforge.config.output_dir import expand_output_dir, remove_if_unused
from loraforge.data.formats import FORMAT_FIELDS
from loraforge.data.bundle import DataStats
from loraforge.data.rows import load_rows
from loraforge.data.sources import first_row, source_problems
from loraforge.errors import ConfigError, DataError, LoraforgeError, ModelError, TrainingStopped
from loraforge.model.precision import choose_cpu
from loraforge.model.sources import BUILTIN, check_model_name, folder_on_disk
from loraforge.model.targets import targets_on_disk
from loraforge.model.template import template_text
from loraforge.model.variants import configured_layers, kept_layers
from loraforge.training.batch import accumulation
from loraforge.training.bitsandbytes_import import leave_out_bitsandbytes
from loraforge.training.cpu_threads import spin_between_kernels


# The launcher's flags, handed by the launching `train` to every process it starts, for the resume command.
LAUNCH_FLAGS_ENV = "LORAFORGE_LAUNCH_FLAGS"


def at_least(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number from minimum (to maximum)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{value}: give {minimum} to {maximum}" if maximum is not None
                                             else f"{value}: give {minimum} or more")
        return value

    return whole


def launch_flags(args) -> list[str]:
    """The `train` flags that launched several processes, as a resume command must repeat them."""
    flags = ["--nproc", str(args.nproc)]
    if args.nnodes > 1:
        flags += ["--nnodes", str(args.nnodes), "--master", args.master]
        if args.node_rank is not None:
            flags += ["--node-rank", str(args.node_rank)]
    if args.shutdown_timeout is not None:
        flags += ["--shutdown-timeout", str(args.shutdown_timeout)]
    return flags


def torchrun_command(args, output_dir: str) -> list[str]:
    """torchrun's (torch.distributed.run's) arguments that run this same `train` command in every process:
    standalone on a free port for one machine, a c10d rendezvous at --master for several."""
    command = ["--nproc-per-node", str(args.nproc)]
    if args.nnodes == 1:
        command += ["--standalone", "--local-addr", "127.0.0.1"]
    else:
        command += ["--nnodes", str(args.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", args.master,
                    "--rdzv-id", "loraforge"]
        if args.node_rank is not None:
            # The rendezvous store lives with node 0, the node at --master, rather than with whichever node on
            # the master's machine binds its port first, so the run's other nodes never outlive it.
            command += ["--node-rank", str(args.node_rank), "--rdzv-conf", f"is_host={args.node_rank == 0}".lower()]
    if args.shutdown_timeout is not None:
        command += ["--shutdown-timeout", str(args.shutdown_timeout)]
    again = ["-m", "loraforge", "train", args.config, *_without_output_dir(args.overrides), f"output_dir={output_dir}"]
    if args.resume:
        again += ["--resume", args.resume]
    if args.allow_changes:
        again.append("--allow-changes")
    return command + again


def _without_output_dir(overrides: list[str]) -> list[str]:
    return [item for item in overrides if not item.startswith("output_dir=")]


def _train(args) -> int:
    config = load_config(args.config, args.overrides)
    read_env_beside(args.config)
    launched = "LOCAL_RANK" in os.environ
    if args.shutdown_timeout is not None and (args.shutdown_timeout < 0 or (args.nproc == 1 and args.nnodes == 1)):
        raise ConfigError([f"--shutdown-timeout {args.shutdown_timeout}: give 0 or more seconds, with --nproc or "
                           "--nnodes above 1 (torchrun's grace for its processes; a single process has none)"])
    if (args.nproc > 1 or args.nnodes > 1) and not launched:
        return _launch(args, config)
    leave_out_bitsandbytes(config)
    from loraforge.training.run import run_training

    try:
        flags = json.loads(os.environ.get(LAUNCH_FLAGS_ENV, "[]")) if launched else []
        result = run_training(config, resume=args.resume, allow_changes=args.allow_changes,
                              command=[args.config, *args.overrides, *flags])
    except TrainingStopped as exc:
        if _is_main() or exc.exit_code not in (130, 143):
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if result.samples is not None and _is_main():
        print(result.summary())
    return 0


def _launch(args, config: RunConfig) -> int:
    if args.nnodes > 1 and not args.master:
        raise ConfigError(["--nnodes above 1 needs --master HOST:PORT, the same on every node"])
    if args.nnodes > 1 and "{time}" in config.output_dir:
        raise ConfigError([f"output_dir {config.output_dir!r}: machines start at different times, so name the "
                           "run directory (output_dir=runs/...) when training on several"])
    from loraforge.training.batch import accumulation

    accumulation(config.train, args.nproc * args.nnodes)
    # Filled in once here, so every process writes into the same run directory.
    output_dir = expand_output_dir(config, reserve=True).output_dir
    os.environ[LAUNCH_FLAGS_ENV] = json.dumps(launch_flags(args))
    from loraforge.training.launch import launch

    command = [args.config, *_without_output_dir(args.overrides), f"output_dir={output_dir}", *launch_flags(args)]
    try:
        launch(torchrun_command(args, output_dir), Path(output_dir), command)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        remove_if_unused(output_dir)
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _estimate(args) -> int:
    config = load_config(args.config, args.overrides)
    read_env_beside(args.config)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_estimate(args, config)
    leave_out_bitsandbytes(config)
    from loraforge.training.estimate import run_estimate

    try:
        estimate = run_estimate(config, probe_steps=args.probe_steps, probe_dir=args.probe_dir)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if estimate is not None:
        print(estimate.summary())
    return 0


def _launch_estimate(args, config: RunConfig) -> int:
    """The probe as a real run of --nproc processes, in one directory they share, removed afterwards."""
    from loraforge.training.batch import accumulation
    from loraforge.training.launch import launch

    accumulation(config.train, args.nproc)

    probe_dir = tempfile.mkdtemp(prefix="loraforge-estimate-")
    try:
        launch(["--nproc-per-node", str(args.nproc), "--standalone", "--local-addr", "127.0.0.1", "-m", "loraforge",
                "estimate", args.config, *args.overrides, "--probe-steps", str(args.probe_steps),
                "--probe-dir", probe_dir])
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    return 0


def _config_validate(args) -> int:
    config = load_config(args.config, args.overrides)
    problems = _missing_for_training(config, args.config)
    if problems:
        raise ConfigError(located(args.config, args.overrides, problems), source=str(args.config))
    print(f"{args.config}: valid")
    return 0


def _missing_for_training(config: RunConfig, config_path: str | Path) -> list[str]:
    """What train would refuse seconds or minutes later, in a config whose keys and values are valid: data files
    (their rows read and parsed as training reads them, where every source is a local file), a chat template file, a
    model folder, the layers its variant removes and the modules LoRA names in it, the run init_from names and
    whether its adapter fits, a global batch one process cannot make, fp16 without a GPU, and a tracker that cannot
    log in (with the .env beside the config, as train reads it). A problem that needs the model's weights or
    several processes is left to train."""
    problems = source_problems(config.data.sources)
    if not problems and all(Path(source.path).is_file() for source in config.data.sources):
        try:
            load_rows(config.data.sources, None, config.data.on_bad_row, DataStats())
        except DataError as exc:
            problems.append(str(exc))
    if config.data.chat_template is not None:
        try:
            template_text(config.data.chat_template)
        except ModelError as exc:
            problems.append(str(exc))
    try:
        if config.model.name not in BUILTIN:
            check_model_name(config.model.name)
        folder = folder_on_disk(config.model.name)
        count = configured_layers(folder) if folder is not None else None
        if count is not None:
            kept_layers(count, config.model.variant, config.model.drop_layers, config.model.keep_layers)
    except ModelError as exc:
        problems.append(str(exc))
    try:
        rundir.check_init_from(config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    for check in (targets_on_disk, _one_process_batch, _fp16_needs_a_gpu):
        problems.extend(check(config))
    from loraforge.training.trackers import check_trackers

    try:
        with scoped_environment(env_beside(config_path)):
            check_trackers(config.report_to, prompt=False)
    except ConfigError as exc:
        problems.extend(exc.problems)
    return problems


def _one_process_batch(config: RunConfig) -> list[str]:
    try:
        accumulation(config.train, 1)
    except ConfigError as exc:
        return exc.problems
    return []


def _fp16_needs_a_gpu(config: RunConfig) -> list[str]:
    if config.precision != "fp16":
        return []
    import torch

    if torch.cuda.is_available():
        return []
    try:
        choose_cpu("fp16")
    except ConfigError as exc:
        return exc.problems
    return []


def _config_show(args) -> int:
    print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _config_migrate(args) -> int:
    migration, text = write_migrated(args.source, args.out, first_row)
    report = [f"{args.source} -> {args.out or 'standard output'}:", migration.table(),
              *(f"note: {note}" for note in migration.notes)]
    missing = _missing_for_training(RunConfig.model_validate(migration.config), args.out or args.source)
    left = [*(problem for problem in missing if not any(problem in unread for unread in migration.unreadable)),
            *migration.unreadable]
    train = f"`loraforge train {args.out}`" if args.out else "training it"
    report += [f"left to do before {train}:", *(f"  - {problem}" for problem in left)] if left else [
        f"valid: loraforge train {args.out}" if args.out else "valid: save it and train it"]
    if args.out:
        print("\n".join(report))
    else:
        print("\n".join(report), file=sys.stderr)
        print(text, end="")
    return 0


def _config_schema(args) -> int:
    print(json.dumps(RunConfig.model_json_schema(), indent=2))
    return 0


def _data_preview(args) -> int:
    config = load_config(args.config, args.overrides)
    from loraforge.preview import run_preview

    run_preview(config, n=args.n)
    return 0


def _runs_first(*run_dirs: str) -> None:
    """A path that is no finished run is refused before the libraries a run command needs are imported (seconds);
    where none of the runs needs bitsandbytes, it is left out of the process."""
    leave_out_bitsandbytes(*(rundir.read_config(run_dir) for run_dir in run_dirs),
                           trained_in=tuple(rundir.read_manifest(run_dir).get("cwd") for run_dir in run_dirs))


def _chat(args) -> int:
    _runs_first(args.run_dir)
    from loraforge.chat import run_chat

    run_chat(args.run_dir, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    return 0


def _serve(args) -> int:
    _runs_first(*args.run_dirs)
    from loraforge.serve.run import run_server

    if (args.max_batch is not None and args.max_batch < 1) or args.timeout <= 0:
        raise LoraforgeError("--max-batch must be at least 1 and --timeout above 0")
    run_server(args.run_dirs, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
               timeout_s=args.timeout, engine=args.engine)
    return 0


def _eval(args) -> int:
    _runs_first(args.run_dir)
    from loraforge.eval.run import format_results, run_eval

    if args.data_format and not args.data:
        raise ConfigError(["--format names the format of a --data file; give --data FILE with it"])
    print(format_results(run_eval(args.run_dir, args.data, args.compare_base, args.max_samples, args.split,
                                  args.data_format, args.precision)))
    return 0


def _merge(args) -> int:
    _runs_first(args.run_dir)
    from loraforge.export.merge import run_merge

    print(run_merge(args.run_dir, args.out).summary())
    return 0


def _export_gguf(args) -> int:
    _runs_first(args.run_dir)
    from loraforge.export.gguf import run_export_gguf

    print(f"GGUF written: {run_export_gguf(args.run_dir, args.type)}")
    return 0


def _export_ollama(args) -> int:
    _runs_first(args.run_dir)
    from loraforge.export.ollama import run_export_ollama

    path = run_export_ollama(args.run_dir, args.type)
    print(f"Modelfile written: {path}\nRun it with: cd {shlex.quote(str(path.parent))} && ollama create my-model -f Modelfile")
    return 0


def _predict(args) -> int:
    _runs_first(args.run_dir)
    from loraforge.predict import run_predict

    run_predict(args.run_dir, text=args.text, file=args.file)
    return 0


# Commands that run a model; process-wide settings must be in place before their first tensor is made.
COMPUTING = {"train", "estimate", "chat", "serve", "eval", "merge", "export", "predict"}
# Commands that train (estimate runs training steps to time them): their OpenMP threads spin between kernels.
TRAINING = {"train", "estimate"}


def tune_process() -> None:
    """CPU memory settings (train/cpu_memory.py): they hold for the whole process and only take effect before
    the first bf16 matmul, so they belong here, at the entry, not inside a library call."""
    import torch

    from loraforge.training.cpu_memory import limit_memory_growth

    if not torch.cuda.is_available():
        limit_memory_growth()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge",
        description="Fine-tune causal language models with LoRA from one validated YAML config.",
    )
    parser.add_argument("--version", action="version", version=f"loraforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training(commands)
    _add_config_and_data(commands)
    _add_run_commands(commands)
    return parser


OVERRIDES = dict(nargs="*", default=[], metavar="KEY=VALUE", help="dotted-key overrides, values parsed as YAML (lora.r=8)")


def _add_training(commands) -> None:
    train = commands.add_parser("train", help="fine-tune from a config; writes a run directory")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", **OVERRIDES)
    train.add_argument("--resume", metavar="auto|CHECKPOINT",
                       help="carry on the run in output_dir from its newest complete checkpoint (auto) or from CHECKPOINT")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: resume even though the config or data differ from the checkpoint's")
    train.add_argument("--nproc", type=at_least(1), default=1, help="processes on this machine, launched through torchrun "
                       "(one per GPU; on CPU each takes a share of the cores)")
    train.add_argument("--nnodes", type=at_least(1), default=1, help="machines taking part; run the same command on each")
    train.add_argument("--node-rank", type=int, help="this machine's rank among --nnodes (optional with c10d)")
    train.add_argument("--master", metavar="HOST:PORT", help="rendezvous address, the same on every node")
    train.add_argument("--shutdown-timeout", type=int, metavar="SECONDS",
                       help="after a signal or a failed process, how long torchrun lets the processes finish their "
                       "step and checkpoint before it kills them (torchrun's default: 30)")
    train.set_defaults(func=_train)
    estimate = commands.add_parser("estimate", help="predict seconds per step, total time and peak memory of a config")
    estimate.add_argument("config")
    estimate.add_argument("overrides", **OVERRIDES)
    estimate.add_argument("--probe-steps", type=int, default=6, help="real steps measured (default 6)")
    estimate.add_argument("--nproc", type=at_least(1), default=1, help="plan for N processes on this machine (as "
                          "`train --nproc N`): the probe runs in N processes; memory and step time per process")
    estimate.add_argument("--probe-dir", help=argparse.SUPPRESS)
    estimate.set_defaults(func=_estimate)


def _add_config_and_data(commands) -> None:
    config = commands.add_parser("config", help="check or print a config")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    validate = config_commands.add_parser("validate", help="report every problem in a config at once")
    validate.add_argument("config")
    validate.add_argument("overrides", **OVERRIDES)
    validate.set_defaults(func=_config_validate)
    show = config_commands.add_parser("show", help="print the resolved config (extends and overrides applied)")
    show.add_argument("config")
    show.add_argument("overrides", **OVERRIDES)
    show.set_defaults(func=_config_show)
    migrate = config_commands.add_parser("migrate", help="turn a fine-tuning script's config (YAML or JSON) into a "
                                         "loraforge config, listing where every key went")
    migrate.add_argument("source", help="the script's config file; _extends chains are followed")
    migrate.add_argument("--out", help="where to write the loraforge config (default: standard output)")
    migrate.set_defaults(func=_config_migrate)
    schema = config_commands.add_parser("schema", help="print the JSON schema: every key with its description")
    schema.set_defaults(func=_config_schema)
    data = commands.add_parser("data", help="look at the training data as the model will see it")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    preview = data_commands.add_parser("preview", help="samples with trained tokens highlighted, then data stats")
    preview.add_argument("config")
    preview.add_argument("overrides", **OVERRIDES)
    preview.add_argument("-n", type=at_least(1), default=3, help="how many samples to show (default 3)")
    preview.set_defaults(func=_data_preview)


def _add_run_commands(commands) -> None:
    chat = commands.add_parser("chat", help="chat with a fine-tuned run (streaming), or answer one --prompt")
    chat.add_argument("run_dir", help="run directory written by `loraforge train`")
    chat.add_argument("--prompt", help="answer this one prompt and exit")
    chat.add_argument("--max-new-tokens", type=at_least(1), default=None, help="longest answer (default: eval.max_new_tokens)")
    chat.set_defaults(func=_chat)
    evaluate = commands.add_parser("eval", help="loss, perplexity, token accuracy and generation metrics of a run")
    evaluate.add_argument("run_dir", help="run directory of a causal_lm run")
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--data", help="a data file, in the run's source format unless --format says another "
                                      "(default: the run's validation split)")
    which.add_argument("--split", choices=["val", "test"], default="val",
                       help="the run's held-out split to evaluate, drawn as training drew it (default val)")
    evaluate.add_argument("--format", dest="data_format", choices=sorted(FORMAT_FIELDS),
                          help="the --data file's format (default: the format of the run's sources)")
    evaluate.add_argument("--compare-base", action="store_true", help="evaluate the base model the same way, side by side")
    evaluate.add_argument("--max-samples", type=at_least(0), default=32, help="rows answered for generation metrics (default 32)")
    evaluate.add_argument("--precision", choices=["fp32", "bf16"],
                          help="compute in this precision instead of the run's own (manifest.json), which repeats "
                               "eval.json's figures")
    evaluate.set_defaults(func=_eval)
    merge = commands.add_parser("merge", help="fold the adapter into its base; save a model plain transformers loads")
    merge.add_argument("run_dir", help="run directory of a LoRA run")
    merge.add_argument("--out", help="output folder (default RUN_DIR/merged)")
    merge.set_defaults(func=_merge)
    export = commands.add_parser("export", help="GGUF for llama.cpp, Modelfile for Ollama")
    export_commands = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    for name, func, what in (("gguf", _export_gguf, "GGUF through llama.cpp's converter (merges first if needed)"),
                             ("ollama", _export_ollama, "an Ollama Modelfile next to the GGUF")):
        sub = export_commands.add_parser(name, help=what)
        sub.add_argument("run_dir")
        sub.add_argument("--type", choices=["f16", "q8_0"], default="q8_0", help="GGUF tensor type (default q8_0)")
        sub.set_defaults(func=func)
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server for one or more runs")
    serve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs to serve; a request's model names one by "
                       "its directory name, or a base by its model name")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=at_least(1, 65535), default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every request "
                       "(default: the LORAFORGE_API_KEY environment variable, if set)")
    serve.add_argument("--max-batch", type=int, default=None, help="requests generated together at most (default 32; "
                       "vLLM's own with --engine vllm)")
    serve.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take (default 300; "
                       "loraforge's engine only)")
    serve.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto",
                       help="hf: transformers and PEFT in this process; vllm: vLLM's server on CUDA, each run a LoRA "
                       "module; auto (default): vllm where it is installed, CUDA is there and it can serve the "
                       "runs, else hf")
    serve.set_defaults(func=_serve)
    predict = commands.add_parser("predict", help="labels for texts from a classification run")
    predict.add_argument("run_dir", help="run directory of a task: classification run")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one text; prints its label and probability")
    source.add_argument("--file", help="a .jsonl file with a text field per line, or one text per line; prints JSONL")
    predict.set_defaults(func=_predict)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so `preview CONFIG -n 2 KEY=VALUE` leaves
    # the override over; take such KEY=VALUE leftovers as overrides too.
    if extra:
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes warns at import that an optional hub-downloaded CPU kernel is missing; loraforge never uses
    # that kernel (it serves the inference repack that training turns off).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # TRL's DPO and KTO trainers read the property behind model/adapters.py's peft_wrapping() at every reference pass.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command in TRAINING:
            spin_between_kernels(getattr(args, "nproc", 1) * getattr(args, "nnodes", 1))
        if args.command in COMPUTING:
            tune_process()
        return args.func(args)
    except ConfigError as exc:
        if exc.source is None and getattr(args, "config", None):
            # Found by train against its model or data: said with the config it is in, and where each key is set.
            exc = ConfigError(located(args.config, args.overrides, exc.problems), source=args.config)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LoraforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
