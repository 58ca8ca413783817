import gc
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A port nothing listens on: the hub refuses at once, on any machine, online or not.
UNREACHABLE = "http://127.0.0.1:9"


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers) each worker, and every process its tests start, gets its
    share of the cores: two workers each at as many torch threads as cores run slower than one. Set before any
    test module imports torch, which reads it once."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
    # This process trains quantized and unquantized runs side by side, some through `loraforge train` called
    # in-process, which marks bitsandbytes absent for an unquantized run unless it is imported already
    # (training/bitsandbytes_import.py): imported here, as a library user's own import would be, quietly as the CLI does.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes  # noqa: F401
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        freeze_the_libraries()


def freeze_the_libraries():
    """The libraries nearly every test module loads, imported once in a process that runs tests and moved out of the
    garbage collector's sight: every full collection (accelerate runs one as each training run starts) otherwise
    walks their objects again, 0.3-0.4 s a run; tests/training/test_lifecycle.py alone ran 155 -> 122 s."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_in_runs():
    """Tests write under their own temporary folders: anything a test leaves in ./runs (where transformers' TensorBoard
    callback logs when no folder is given) fails the session."""
    runs = Path.cwd() / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    yield
    left = sorted(p.name for p in (set(runs.iterdir()) if runs.is_dir() else set()) - before)
    assert not left, f"tests wrote into {runs}: {', '.join(left)}"


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty hub cache and a hub that cannot be reached."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        UNREACHABLE + "/{repo_id}/resolve/{revision}/{filename}")
    return tmp_path / "hub-cache"


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from loraforge.model.sources import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm_path):
    from loraforge.model.load import load_tokenizer

    return load_tokenizer(smollm_path)


EMULATED_BF16 = {"fp32": 246.0, "bf16": 51.0, "flags": False}
NATIVE_BF16 = {"fp32": 199.0, "bf16": 432.0, "flags": True}
FLAG_BUT_SLOW = {"fp32": 307.0, "bf16": 165.0, "flags": True}


@pytest.fixture
def cpu_like(monkeypatch):
    """Make the precision probe report a given CPU's measured speeds (figures measured on real machines, see
    FINDINGS)."""
    from loraforge.model import precision

    def use(machine: dict):
        monkeypatch.setattr(precision, "matmul_gflops",
                            lambda tokens, width, depth, dtype, **_: machine["bf16" if dtype == "bfloat16" else "fp32"])
        monkeypatch.setattr(precision, "cpu_bf16_features",
                            lambda: {"avx512_bf16": machine["flags"], "amx_bf16": False})

    return use


def save_tiny_llama(folder: Path, tokenizer, seed: int = 0, **shape) -> Path:
    """A random llama (2 layers, width 64 unless `shape` says otherwise) with the real SmolLM2 tokenizer, saved
    like any local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True, **{**settings, **shape})
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A random 2-layer llama with the real SmolLM2 tokenizer, saved like any local model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def hashed(monkeypatch) -> Counter:
    """How many times each file (by resolved path) is read whole for its sha256: every name a loaded loraforge
    module binds data.cache.file_digest to counts its calls, and still hashes."""
    from loraforge.data import cache

    real, counts = cache.file_digest, Counter()

    def counting(path):
        counts[Path(path).resolve()] += 1
        return real(path)

    for module in [m for name, m in sys.modules.items() if name == "loraforge" or name.startswith("loraforge.")]:
        for name, value in list(vars(module).items()):
            if value is real:
                monkeypatch.setattr(module, name, counting)
    return counts


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_rows():
    return [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}
        for i in range(24)
    ]


ECHO_ROWS = [
    {"messages": [{"role": "user", "content": f"Echo {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
    for w in ["red", "green", "blue", "black", "white", "pink", "gray", "gold"] * 3
]


def write_tiny_config(folder: Path, model_dir: Path, train: str, val_fraction: float = 0.25,
                      max_new_tokens: int = 2) -> Path:
    """folder/tiny.yaml: LoRA r=4 on `model_dir` over ECHO_ROWS (written to folder/echo.jsonl), no reporting;
    `train` is the YAML flow mapping of the train section."""
    data = write_jsonl(folder / "echo.jsonl", ECHO_ROWS)
    config = folder / "tiny.yaml"
    config.write_text(f"model: {{name: {model_dir}}}\nlora: {{r: 4, alpha: 8}}\n"
                      f"data: {{sources: [{{path: {data}}}], val_fraction: {val_fraction}, cache: false}}\n"
                      f"train: {train}\n"
                      f"eval: {{sample_prompts: [Echo red], max_new_tokens: {max_new_tokens}}}\nreport_to: []\n",
                      encoding="utf-8")
    return config


@pytest.fixture
def train_tiny(tmp_path, tiny_model_dir):
    """Run the real recipe on the tiny llama with a few overrides; returns (config, result)."""
    from loraforge.config import load_config
    from loraforge.training.run import run_training

    data = write_jsonl(tmp_path / "echo.jsonl", ECHO_ROWS)
    counter = iter(range(1000))

    def run(*overrides, rows=None, fmt="messages"):
        path = write_jsonl(tmp_path / f"rows{next(counter)}.jsonl", rows) if rows is not None else data
        config_path = tmp_path / "tiny.yaml"
        config_path.write_text(
            f"""
model: {{name: {tiny_model_dir}}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
data:
  sources: [{{path: {path}, format: {fmt}}}]
  val_fraction: 0.25
  cache: false
train: {{max_steps: 6, batch_size: 4, learning_rate: 0.01, eval_every: 3, logging_steps: 2, warmup_ratio: 0.0}}
eval: {{sample_prompts: [Echo red], max_new_tokens: 4}}
""",
            encoding="utf-8",
        )
        config = load_config(config_path, [f"output_dir={tmp_path / ('run' + str(next(counter)))}", *overrides])
        return config, run_training(config)

    return run
