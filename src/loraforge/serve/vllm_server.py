"""`loraforge serve --engine vllm`: the runs handed to vLLM's own OpenAI server (`vllm serve`) on CUDA. loraforge
checks that vLLM can answer as the runs trained (LoRA adapters on one base, or one fully fine-tuned model; one
tokenizer and chat template; no system prompt of a run's own) and starts vLLM in its place with each run as a LoRA
module under the run's directory name. `--engine auto` takes vLLM where it is installed, CUDA is there and the
runs fit, and loraforge's own engine otherwise, saying why."""

import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from loraforge import rundir
from loraforge.errors import LoraforgeError
from loraforge.model.load import load_tokenizer

log = logging.getLogger("loraforge.serve")

# The values vLLM's --max-lora-rank accepts.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
API_KEY_ENV = "VLLM_API_KEY"


class Unfit(LoraforgeError):
    """Runs that vLLM would not answer for as they trained."""


def machine_lacks() -> str | None:
    """What this machine lacks to run vLLM, or None. vLLM pins torch and transformers versions of its own (vLLM 0.33:
    torch 2.14, transformers < 5.21), so it lives in an environment of its own: only its `vllm` program is looked for,
    on PATH or beside this Python."""
    import torch

    if _program() is None:
        return ("the vllm program is not on PATH (install vLLM in an environment of its own, on a machine with CUDA, "
                "and put its bin folder on PATH)")
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _program() -> str | None:
    beside_python = str(Path(sys.executable).parent)
    return shutil.which("vllm", path=os.pathsep.join([os.environ.get("PATH", ""), beside_python]))


def _tokenizer_identity(folder: Path) -> tuple:
    tokenizer = load_tokenizer(str(folder / rundir.TOKENIZER))
    return tokenizer.get_vocab(), tokenizer.chat_template, tuple(tokenizer.all_special_tokens)


def _rank(adapter: Path, name: str) -> int:
    settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("peft_type") != "LORA":
        raise Unfit(f"run {name} is a {settings.get('peft_type')} adapter; vLLM serves LoRA adapters only")
    if settings.get("use_dora"):
        raise Unfit(f"run {name} is a DoRA run (lora.use_dora), which vLLM does not serve; use --engine hf, or "
                    f"`loraforge merge` it and serve the merged model")
    if settings.get("bias", "none") != "none":
        raise Unfit(f"run {name} trained biases (lora.bias {settings['bias']}), which vLLM's LoRA loader does not "
                    "take; use --engine hf")
    if settings.get("modules_to_save"):
        raise Unfit(f"run {name} trains whole modules too ({', '.join(settings['modules_to_save'])}, "
                    f"lora.modules_to_save), which vLLM's LoRA loader refuses; use --engine hf")
    return max([settings["r"], *(settings.get("rank_pattern") or {}).values()])


def command(run_dirs: list[str], host: str, port: int, max_batch: int | None = None) -> list[str]:
    """The arguments of `vllm` that serve run_dirs as `loraforge serve --engine hf` would; Unfit where it could not."""
    runs = [(Path(d).resolve(), rundir.read_config(d)) for d in run_dirs]
    names = [folder.name for folder, _ in runs]
    for (folder, config), name in zip(runs, names):
        if config.task != "causal_lm":
            raise Unfit(f"{folder} is a {config.task} run; serve answers chats, so give it causal_lm runs")
        if names.count(name) > 1:
            raise Unfit(f"two runs are named {name!r}; requests name a run by its directory's name, so rename one")
        if config.data.system_prompt:
            raise Unfit(f"run {name} has a system prompt (data.system_prompt), and vLLM adds no system prompt of a "
                        "model's own; use --engine hf, or have clients send it as the first message")
        if config.model.variant != "original":
            raise Unfit(f"run {name} trained on its base with layers removed (model.variant {config.model.variant}), "
                        "and vLLM would load the whole base; use --engine hf, or `loraforge merge` it and serve "
                        "the merged model")
    first = _tokenizer_identity(runs[0][0])
    if any(_tokenizer_identity(folder) != first for folder, _ in runs[1:]):
        raise Unfit("the runs' tokenizers or chat templates differ, and vLLM takes one per server; "
                    "start one `loraforge serve` per tokenizer, or use --engine hf")
    tokenizer = str(runs[0][0] / rundir.TOKENIZER)
    full = [name for (folder, _), name in zip(runs, names) if (folder / rundir.MODEL / "config.json").is_file()]
    if full and len(runs) > 1:
        raise Unfit(f"run {full[0]} trained every weight, so it is a model of its own, and vLLM serves one model "
                    "per server; serve it alone, or use --engine hf")
    if full:
        args = ["serve", str(runs[0][0] / rundir.MODEL), "--served-model-name", names[0], "--tokenizer", tokenizer]
    else:
        bases = {(rundir.base_model(folder, c), c.model.revision, c.quantization.model_dump_json())
                 for folder, c in runs}
        if len(bases) > 1:
            raise Unfit("the runs are on different bases (" + ", ".join(sorted({c.model.name for _, c in runs}))
                        + ") and vLLM serves one base per server; start one `loraforge serve --engine vllm` per "
                        "base, each on its own --port")
        (path, revision, _), = bases
        base_name, quantization = runs[0][1].model.name, runs[0][1].quantization.mode
        if base_name in names:
            raise Unfit(f"a run directory is named {base_name!r}, the name its base answers under; rename it")
        if quantization == "8bit":
            raise Unfit("the runs trained on an 8-bit base; loraforge hands vLLM 4-bit (bitsandbytes) or "
                        "unquantized bases only; use --engine hf")
        for (folder, _), name in zip(runs, names):
            rundir.check_adapter(folder / rundir.ADAPTER)
        rank = max(_rank(folder / rundir.ADAPTER, name) for (folder, _), name in zip(runs, names))
        if rank > LORA_RANKS[-1]:
            raise Unfit(f"a run has LoRA rank {rank}; vLLM serves ranks up to {LORA_RANKS[-1]}; use --engine hf")
        args = ["serve", path, "--served-model-name", base_name, "--tokenizer", tokenizer,
                "--enable-lora", "--max-loras", str(len(runs)),
                "--max-lora-rank", str(next(r for r in LORA_RANKS if r >= rank)),
                "--lora-modules", *(json.dumps({"name": name, "path": str(folder / rundir.ADAPTER)})
                                    for (folder, _), name in zip(runs, names))]
        if revision:
            args += ["--revision", revision]
        if quantization == "4bit":
            args += ["--quantization", "bitsandbytes"]
    if any(config.model.trust_remote_code for _, config in runs):
        args.append("--trust-remote-code")
    # Sampling defaults as loraforge's engine has them (temperature 1, top_p 1), not the model's generation config.
    args += ["--generation-config", "vllm", "--host", host, "--port", str(port)]
    return args if max_batch is None else [*args, "--max-num-seqs", str(max_batch)]


def choose(engine: str, run_dirs: list[str], host: str, port: int,
           max_batch: int | None = None) -> tuple[str, list[str] | None]:
    """("hf", None) or ("vllm", its arguments) for --engine engine; auto logs its choice and why."""
    if engine == "hf":
        return "hf", None
    lacks = machine_lacks()
    if engine == "vllm":
        if lacks:
            raise LoraforgeError(f"--engine vllm: {lacks}; use --engine hf (or auto) here")
        try:
            return "vllm", command(run_dirs, host, port, max_batch)
        except Unfit as exc:
            raise Unfit(f"--engine vllm: {exc}") from None
    if lacks:
        log.info("engine auto -> hf: %s", lacks)
        return "hf", None
    try:
        args = command(run_dirs, host, port, max_batch)
    except Unfit as exc:
        log.info("engine auto -> hf: %s", exc)
        return "hf", None
    log.info("engine auto -> vllm: CUDA and vLLM are here and vLLM can serve these runs")
    return "vllm", args


def become_vllm(args: list[str], api_key: str | None) -> None:
    """Replace this process with `vllm ARGS`: signals and the exit status are vLLM's from here on."""
    program = _program()
    if program is None:
        raise LoraforgeError("--engine vllm: the vllm command is not on PATH")
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    log.info("engine vllm: %s%s", shlex.join(["vllm", *args]),
             f" (the API key in {API_KEY_ENV})" if api_key else "")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, [program, *args], env)
