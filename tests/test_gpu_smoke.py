"""bench/gpu_smoke.py runs only where a GPU is lent; its checks and wiring are exercised here on
the CPU (``--cpu-dry-run``), so the script is known to work before a GPU machine runs it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_smoke.py"


@pytest.fixture
def smoke(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the script sets it on import
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "gpu_smoke", module)  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_without_cuda_the_smoke_exits_2_saying_it_needs_a_gpu(smoke, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert smoke.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "textual_inversion", "dreambooth"])
def test_the_cpu_dry_run_passes_its_checks(smoke, monkeypatch, method) -> None:
    from trainers import metrics

    full = smoke.smoke_sweep

    def small(*args, **kwargs):  # fewer images: the checks, not the throughput, are under test
        raw = full(*args, **kwargs)
        gen = raw["evaluation"]["images"]["generation"]
        gen.update(prompts=gen["prompts"][3:5], seeds=[0], steps=2)
        return raw

    monkeypatch.setattr(smoke, "smoke_sweep", small)
    try:
        assert smoke.cpu_dry_run(steps=1, method=method) == 0
    finally:
        metrics.clear_clip_cache()  # the scorers carry the probe's hooks


def test_the_checks_catch_a_wrong_dtype_or_device(smoke) -> None:
    expect = smoke.Expect("cuda", torch.bfloat16, torch.bfloat16)
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(AssertionError, match="expected torch.bfloat16 on cpu"):
        smoke._check_weights("unet", layer.requires_grad_(False), torch.device("cpu"), torch.bfloat16)
    probe = smoke.Probe()
    probe.watch("unet", layer)
    layer(torch.zeros(1, 2))
    with pytest.raises(AssertionError, match="computed in torch.float32 on cpu during train"):
        probe.check("train", "unet", torch.device("cpu"), torch.bfloat16)
    state = {"cache_builds": [{"encode_device": "cpu"}],
             "baseline": {"placement": {"device": "cuda:0", "weight_dtype": "bfloat16", "autocast": "bfloat16"}}}
    with pytest.raises(AssertionError, match="latent cache encoded on 'cpu'"):
        smoke.check_outside_trials(state, expect)
    state["cache_builds"][0]["encode_device"] = "cuda:0"
    state["baseline"]["placement"]["autocast"] = None
    with pytest.raises(AssertionError, match="baseline placement"):
        smoke.check_outside_trials(state, expect)
