"""The GPU memory estimate (trainers/memory.py) and the packing plan built on it (sweeps/plan.py,
``sdsweep plan``, the refusal at ``sdsweep run``).

References, none of them the estimate's own arithmetic: parameter counts of the model loaded
through the real loading path; the resident memory a real forward + backward adds in a fresh
process (shapes other than those the constants were measured on); published SD 1.5 DreamBooth
memory figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SDSWEEP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_parameter_counts_are_those_of_the_loaded_model(tiny_model) -> None:
    from trainers.memory import Architecture
    from trainers.config import ModelSpec

    arch = Architecture.from_spec(ModelSpec(source="builtin:tiny-sd"))
    for name in ("unet", "text_encoder", "vae"):
        loaded = sum(p.numel() for p in getattr(tiny_model, name).parameters())
        assert arch.parameters(name) == loaded, name


def test_sd15_parameter_counts_are_sd15s() -> None:
    """The reference architecture is SD 1.5's: its published parameter counts (UNet 859.52 M,
    CLIP ViT-L/14 text encoder 123.06 M, VAE 83.65 M)."""
    from trainers.memory import SD15

    assert round(SD15.parameters("unet") / 1e6, 2) == 859.52
    assert round(SD15.parameters("text_encoder") / 1e6, 2) == 123.06
    assert round(SD15.parameters("vae") / 1e6, 2) == 83.65
    assert SD15.default_resolution == 512


@pytest.mark.parametrize("resolution, batch, checkpointing, low, high", [
    (320, 1, False, 0.85, 1.15),   # channels 96-384: the constants were measured on 64-256
    (256, 2, True, 0.85, 1.45),    # checkpointing is the rougher rule (docs/SWEEPS.md)
])
def test_activation_estimate_against_a_real_backward(resolution, batch, checkpointing, low, high) -> None:
    from bench_memory_estimate import measure_in_subprocess

    r = measure_in_subprocess(resolution, batch, checkpointing, channels=(96, 192, 384, 384))
    assert r["measured_mib"] > 50  # a step big enough to measure
    assert low <= r["ratio"] <= high, r


@pytest.mark.parametrize("label", ["grad ckpt + 8-bit Adam", "8-bit Adam", "batch 2, 8-bit Adam",
                                   "grad ckpt, AdamW", "AdamW"])
def test_sd15_dreambooth_against_published_figures(label) -> None:
    """Never far below what people measured (that would pack trials that die of OOM), and not so
    far above that it refuses packings that fit."""
    from bench_memory_estimate import PUBLISHED, dreambooth_shape
    from trainers.memory import SD15, estimate_trial_memory

    overrides, published = next((o, p) for name, o, p in PUBLISHED if name == label)
    ratio = estimate_trial_memory(SD15, dreambooth_shape(**overrides)).total_gib / published
    assert 0.95 <= ratio <= 1.3, ratio


def test_the_estimate_moves_with_what_costs_memory() -> None:
    from trainers.memory import SD15, TrialShape, estimate_trial_memory

    def gib(**kw) -> float:
        base = dict(method="lora", resolution=512, batch=1, gradient_checkpointing=False, precision="bf16",
                    unet_dtype=torch.bfloat16, text_encoder_dtype=torch.bfloat16, weight_dtype=torch.bfloat16,
                    lora_rank=4, lora_targets=("to_q", "to_k", "to_v", "to_out.0"))
        return estimate_trial_memory(SD15, TrialShape(**{**base, **kw})).total_gib

    one = gib()
    assert gib(batch=2) > one and gib(resolution=768) > one and gib(lora_rank=128) > one
    assert gib(batch=4, gradient_checkpointing=True) < gib(batch=4)
    fp32 = gib(precision="no", unet_dtype=torch.float32, text_encoder_dtype=torch.float32,
               weight_dtype=torch.float32)
    assert fp32 > one
    dreambooth = gib(method="dreambooth", lora_rank=0, lora_targets=(), train_unet=True, unet_dtype=torch.float32)
    assert dreambooth > 3 * one  # AdamW state and fp32 gradients of 860 M parameters


def test_plan_takes_the_worst_case_of_the_space_and_refuses_what_cannot_fit(tmp_path, sdsweep_cache) -> None:
    from sweeps.config import load_sweep
    from sweeps.plan import check_packing, plan_sweep
    from sweeps.results import SweepError

    cfg = load_sweep(REPO / "sweeps" / "configs" / "demo-mixed.yaml",
                     {"resources.gpu": 0.25, "search.max_concurrent_trials": 4})
    plan = plan_sweep(cfg, gpu_memory_gib=80)
    assert {m.method for m in plan.methods} == {"lora", "textual_inversion", "dreambooth"}
    worst = {m.method: m for m in plan.methods}
    space = cfg.search_space()
    assert worst["lora"].estimate.shape.lora_rank == max(space.candidates("lora")["lora.rank"]) == 16
    assert worst["textual_inversion"].estimate.shape.ti_vectors == 8  # the range's high
    # prior preservation puts the class batch beside the instance batch: the worst case has it
    assert worst["dreambooth"].worst["dreambooth.prior_loss_weight"] == 1.0
    assert worst["dreambooth"].estimate.shape.batch == 2 * cfg.base.train.train_batch_size
    assert plan.sharing == 4 and plan.problem() is None
    per_trial = plan.largest.estimate.total_gib
    with pytest.raises(SweepError, match=r"resources\.gpu: 0\.25 packs 4 trials.*Fix: set resources\.gpu to 0\.34"):
        check_packing(cfg, gpu_memory_gib=3.5 * per_trial)  # 3 fit, 4 asked
    assert plan.largest.method == "dreambooth"
    with pytest.raises(SweepError, match="no packing fits.*dreambooth.optimizer: adamw_8bit"):
        check_packing(cfg, gpu_memory_gib=0.5 * per_trial)  # the fix names what lowers the largest method's memory
    assert check_packing(cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"gpu": 0.0})})) is None


def test_sdsweep_plan_and_run_on_the_command_line(tmp_path, sdsweep_cache) -> None:
    demo = str(REPO / "sweeps" / "configs" / "demo.yaml")
    ok = _cli("plan", demo, "--set", "resources.gpu=0.5", "--gpu-memory", "40", cache=sdsweep_cache)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "lora" in ok.stdout and "packing OK: 2 x" in ok.stdout and "40.0 GiB" in ok.stdout
    refused = _cli("plan", demo, "--set", "resources.gpu=0.5", "--gpu-memory", "0.8", cache=sdsweep_cache)
    assert refused.returncode == 2
    assert "resources.gpu: 0.5 packs 2 trials" in refused.stderr and "set resources.gpu to 1" in refused.stderr
    # `run` refuses the same packing before Ray starts or the run directory gets anything.
    run_dir = tmp_path / "run"
    run = _cli("run", demo, "--set", "resources.gpu=0.5", "--set", "resources.gpu_memory_gib=0.8",
               "--run-dir", str(run_dir), cache=sdsweep_cache)
    assert run.returncode == 2 and "resources.gpu: 0.5 packs 2 trials" in run.stderr
    assert not run_dir.exists()
    assert "Started a local Ray instance" not in run.stdout + run.stderr
