"""precision: auto decides by measured matmul speed and the CPU's bf16 features; explicit choices are kept."""

import json
import logging

import pytest
import torch

from loraforge.errors import ConfigError
from loraforge.model import precision as precision_module
from loraforge.model.precision import (BF16_MIN_SPEEDUP, choose_cpu, choose_for_run, choose_precision, cpu_speeds,
                                       matmul_gflops)
from tests.conftest import EMULATED_BF16, FLAG_BUT_SLOW, NATIVE_BF16
from tests.model.ops import Ops

needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU precision choice; this machine has CUDA")



def test_auto_picks_fp32_where_bf16_is_emulated(cpu_like, caplog):
    cpu_like(EMULATED_BF16)
    with caplog.at_level(logging.INFO, logger="loraforge.model.precision"):
        choice = choose_cpu("auto")
    assert choice.chosen == "fp32"
    assert choice.reason == "no native bf16 on this CPU (bf16 51 vs fp32 246 GFLOP/s)"
    assert choice.record()["bf16_gflops"] == 51.0


def test_auto_picks_bf16_where_the_cpu_computes_it_natively(cpu_like):
    cpu_like(NATIVE_BF16)
    choice = choose_cpu("auto")
    assert choice.chosen == "bf16"
    assert "avx512_bf16" in choice.reason and "bf16 432 vs fp32 199" in choice.reason


def test_auto_trusts_the_measurement_over_the_flag(cpu_like):
    cpu_like(FLAG_BUT_SLOW)
    choice = choose_cpu("auto")
    assert choice.chosen == "fp32"
    assert "this CPU has avx512_bf16 (bf16 165 vs fp32 307 GFLOP/s)" == choice.reason


def test_explicit_bf16_on_a_slow_cpu_runs_with_one_warning_giving_the_slowdown(cpu_like, caplog):
    cpu_like(EMULATED_BF16)
    with caplog.at_level(logging.WARNING, logger="loraforge.model.precision"):
        choice = choose_cpu("bf16")
    assert choice.chosen == "bf16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0.21x the speed of fp32" in warnings[0] and "auto would train in fp32" in warnings[0]


def test_explicit_bf16_on_a_fast_cpu_does_not_warn(cpu_like, caplog):
    cpu_like(NATIVE_BF16)
    with caplog.at_level(logging.WARNING, logger="loraforge.model.precision"):
        assert choose_cpu("bf16").chosen == "bf16"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_explicit_fp32_measures_nothing(monkeypatch):
    monkeypatch.setattr(precision_module, "matmul_gflops", lambda *a: pytest.fail("fp32 needs no probe"))
    assert choose_cpu("fp32").chosen == "fp32"


def test_fp16_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="fp16 on a CPU"):
        choose_cpu("fp16")


@needs_cpu
def test_the_real_probe_decides_by_its_own_measurement(caplog):
    speeds = cpu_speeds()
    assert speeds["fp32_gflops"] > 0 and speeds["bf16_gflops"] > 0
    with caplog.at_level(logging.INFO, logger="loraforge.model.precision"):
        choice = choose_precision("auto")
    faster = speeds["bf16_gflops"] >= BF16_MIN_SPEEDUP * speeds["fp32_gflops"]
    assert choice.chosen == ("bf16" if faster else "fp32")
    assert f"precision auto -> {choice.chosen}: " in caplog.text


def test_probe_uses_the_model_shape():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672)
    assert precision_module.probe_shape(config) == (2048, 2048)
    assert precision_module.probe_shape(LlamaConfig(hidden_size=576, intermediate_size=1536)) == (1536, 576)
    assert precision_module.probe_shape(LlamaConfig(hidden_size=64, intermediate_size=128)) == (512, 512), (
        "a tiny model's product is too short to time")
    assert matmul_gflops(16, 32, 64, "float32", repeats=1) > 0


def test_a_dtype_far_behind_stops_being_timed_after_one_repetition():
    """A repetition below give_up_below GFLOP/s ends the timing: the warm-up and one timed repetition, 2 products
    each, instead of 1 + 5 (bf16 without a fast kernel takes seconds to time in full)."""
    def products(**settings):
        with Ops() as ops:
            assert matmul_gflops(64, 96, 80, "float32", **settings) > 0
        return sum(name in ("mm.default", "addmm.default") for name in ops.seen)

    assert products(repeats=5) == 12
    assert products(repeats=5, give_up_below=1e12) == 4
    assert products(repeats=5, give_up_below=1e-12) == 12, "a dtype not far behind is timed in full"


def test_bf16_is_timed_against_half_the_fp32_speed(monkeypatch):
    asked = {}

    def fake(tokens, width, depth, dtype, give_up_below=0.0):
        asked[dtype] = give_up_below
        return 200.0 if dtype == "float32" else 20.0

    monkeypatch.setattr(precision_module, "matmul_gflops", fake)
    assert cpu_speeds()["bf16_gflops"] == 20.0
    assert asked == {"float32": 0.0, "bfloat16": 100.0}


@needs_cpu
def test_manifest_records_the_choice_and_its_reason(train_tiny):
    config, result = train_tiny()
    record = json.loads((result.run_dir / "manifest.json").read_text())["precision"]
    assert record["requested"] == "auto" and record["chosen"] in ("fp32", "bf16")
    assert "GFLOP/s" in record["reason"]
    assert (record["chosen"] == "bf16") == (record["bf16_gflops"] >= BF16_MIN_SPEEDUP * record["fp32_gflops"])


def test_a_finished_run_computes_in_bf16_only_where_it_trained_in_bf16_and_bf16_is_fast_here(cpu_like, monkeypatch):
    cpu_like(NATIVE_BF16)
    assert choose_for_run("bf16").chosen == "bf16"
    assert choose_for_run("bf16").reason == ("as the run trained: this CPU has avx512_bf16 (bf16 432 vs fp32 199 "
                                             "GFLOP/s)")
    cpu_like(EMULATED_BF16)
    assert choose_for_run("bf16").chosen == "fp32"
    assert choose_for_run("bf16").reason == ("the run trained in bf16, but no native bf16 on this CPU (bf16 51 vs fp32 "
                                             "246 GFLOP/s)")
    monkeypatch.setattr(precision_module, "matmul_gflops", lambda *a: pytest.fail("nothing to measure"))
    assert [choose_for_run(trained).chosen for trained in ("fp32", "fp16", None)] == ["fp32"] * 3


@needs_cpu
def test_a_run_on_a_hub_model_pinned_to_a_commit_reads_its_base_config_at_that_commit_offline(
        train_tiny, tiny_model_dir, no_hub, cpu_like, monkeypatch):
    """A hub model downloaded at a pinned commit is cached without refs/main: offline, its config is found at the
    run's model.revision only. It is read for the CPU probe of a bf16 run; an fp32 run computes in fp32 without it."""
    import shutil
    from pathlib import Path

    import huggingface_hub.constants

    from loraforge import trained

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "a" * 40
    shutil.copytree(tiny_model_dir, no_hub / "models--owner--tiny-llama" / "snapshots" / commit)
    pinned = ["model.name=owner/tiny-llama", f"model.revision={commit}", "train.max_steps=2"]
    bf16_run = train_tiny(*pinned, "precision=bf16")[0]
    fp32_run = train_tiny(*pinned, "precision=fp32")[0]
    cpu_like(NATIVE_BF16)
    assert trained.precision_here(Path(bf16_run.output_dir), bf16_run) == "bf16"
    assert trained.load_run(bf16_run.output_dir, precision="auto").model.get_input_embeddings().weight.dtype == (
        torch.bfloat16)
    monkeypatch.setattr(trained, "load_model_config", lambda *a, **kw: pytest.fail("an fp32 run needs no config"))
    assert trained.precision_here(Path(fp32_run.output_dir), fp32_run) == "fp32"
