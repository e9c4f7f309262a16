"""A gain over the base model is never a precision shift (sweeps/baseline.py): the baseline is
scored at every sampling placement the sweep's trials use, each trial's gains compare with the
baseline of the placement it sampled with, and the held-out confirmation samples each model as its
trial did (the base model as the winner did). Run on the CPU in bf16, where the methods' module
dtypes differ as they do on a GPU: LoRA samples a bf16 UNet and text encoder, textual inversion an
fp32 text encoder, DreamBooth an fp32 UNet (and an fp32 text encoder when it trains it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_baselines_and_the_confirmation_sample_at_each_trials_precision(tmp_path):
    from sweeps.results import leaderboard

    lr = {"train.learning_rate": {"type": "categorical", "choices": [1.0e-4], "default": 1.0e-4}}
    sweep = {
        "name": "precision",
        "base": {"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
                 "train": {"max_train_steps": 2, "train_batch_size": 1, "mixed_precision": "bf16"},
                 "textual_inversion": {"vectors_per_token": 1}},
        "search": {"spaces": [{"method": "lora", "params": lr},
                              {"method": "textual_inversion", "params": lr},
                              {"method": "dreambooth", "params": {**lr, "dreambooth.train_text_encoder": {
                                  "type": "categorical", "choices": [False, True], "default": True}}}],
                   "sampler": {"type": "random", "seed": 0}, "num_samples": 3, "max_concurrent_trials": 2},
        "scheduler": {"type": "none"},
        "evaluation": {"every": 2, "images": {
            "generation": {"prompts": ["a photo of {token}", "a red cube"], "token": "sks toy", "seeds": [0], "steps": 2},
            "clip": "builtin:tiny-clip", "metrics": ["clip_t", "clip_i", "drift"], "weights": {"clip_t": 1, "clip_i": 1}},
            "confirm": {"top_k": 3, "seeds": [1000], "pick_seeds": [1001], "bootstrap": 100}},
        "resources": {"cpu": 1, "gpu": 0},
        "storage_path": str(tmp_path / "runs"),
        "tracking": {"wandb": False},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    run_dir = tmp_path / "runs" / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(path), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    state = json.loads((run_dir / "sweep.json").read_text())
    baselines = state["baselines"]
    # One baseline per placement a trial can have (read back from each baseline's own samples).
    sampled = {json.loads((run_dir / b["dir"] / "scores.json").read_text())["placement"] for b in baselines.values()}
    assert sampled == set(baselines) == {
        "cpu unet=bfloat16 text_encoder=bfloat16 vae=bfloat16 autocast=bfloat16",  # LoRA (the base method)
        "cpu unet=bfloat16 text_encoder=float32 vae=bfloat16 autocast=bfloat16",  # textual inversion
        "cpu unet=float32 text_encoder=bfloat16 vae=bfloat16 autocast=bfloat16",  # DreamBooth
        "cpu unet=float32 text_encoder=float32 vae=bfloat16 autocast=bfloat16",  # DreamBooth + text encoder
    }, sorted(sampled)
    assert state["baseline"] == baselines["cpu unet=bfloat16 text_encoder=bfloat16 vae=bfloat16 autocast=bfloat16"]

    rows, _ = leaderboard(run_dir)
    assert {r.method for r in rows} == {"lora", "textual_inversion", "dreambooth"}
    for r in rows:  # every evaluation's recorded placement has its own baseline, and gains use it
        evals = sorted(r.path.glob("samples/step-*/scores.json"))
        assert evals, r.trial_id
        placements = {json.loads(f.read_text())["placement"] for f in evals}
        assert placements == {r.placement} and r.placement in baselines, (r.method, placements)
        assert r.gain_base(state["baseline"]["scores"]) == baselines[r.placement]["scores"]
    # Drift compares each evaluation with the base model at its own placement: every baseline
    # scores itself 1 and keeps its embeddings; a DreamBooth trial (it trains the UNet) drifts.
    for key, b in baselines.items():
        assert b["scores"]["drift"] == pytest.approx(1.0, abs=1e-3) and (run_dir / b["dir"] / b["base_embeddings"]).is_file()
    assert all(isinstance(h.get("drift"), float) for r in rows for h in r.history if "clip_t" in h)
    dreambooth = next(r for r in rows if r.method == "dreambooth")
    assert dreambooth.placement.startswith("cpu unet=float32 text_encoder=float32")  # it trained the text encoder

    conf = json.loads((run_dir / "confirm" / "confirm.json").read_text())
    by_trial = {r.trial_id: r for r in rows}
    models = {m["label"]: m for m in conf["models"]}
    for label, m in models.items():
        held = json.loads((run_dir / m["dir"] / "scores.json").read_text())["placement"]
        assert held == m["placement"], label
        trial = by_trial[conf["winner"].split("@")[0]] if label == "baseline" else by_trial[m["trial_id"]]
        assert held == trial.placement, (label, held, trial.placement)
    assert models["baseline"]["heldout"]["drift"] == pytest.approx(1.0, abs=1e-3)
    assert all(isinstance(m["heldout"]["drift"], float) and "drift" in m["pick"] for m in conf["models"][:-1])
