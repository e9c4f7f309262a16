"""``sdsweep init``: a generated folder of images to a sweep file, and that file run as written.

The command line in subprocesses, as a user runs it; the sweep it writes runs on a real local Ray
(shortened only by init's own ``--trials`` / ``--steps``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cache: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SDSWEEP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def _photos(folder: Path, n: int = 5, captions: int = 0) -> Path:
    """``n`` drawn 'photos' of one yellow ball (odd sizes: preflight and the crop must cope)."""
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", (96 + 8 * i, 80), (40 * i, 120, 200))
        ImageDraw.Draw(im).ellipse((20 + i, 10, 70 + i, 60), fill=(250, 200, 0))
        im.save(folder / f"ball_{i}.png")
        if i < captions:
            (folder / f"ball_{i}.txt").write_text("a photo of sks ball\n")
    return folder


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_init_writes_a_sweep_that_runs(tmp_path, sdsweep_cache) -> None:
    data = _photos(tmp_path / "my photos")
    made = _cli("init", "--data", str(data), "--model", "builtin:tiny-sd", "--method", "lora", "--trials", "2",
                "--steps", "10", cache=sdsweep_cache, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    out = tmp_path / "sweep-my-photos.yaml"
    text = out.read_text()
    assert text.count("#") >= 10, "the file explains itself"
    assert "instance_prompt: a photo of sks" in text and "resolution: 64" in text  # tiny-sd's own resolution
    assert f"sdsweep run {out.name}" in made.stdout
    assert "cost: 2 trials x up to 10 steps" in made.stdout and "GPU memory per lora trial" in made.stdout
    # 2 trials x 10 // 2 evaluations, 5 prompts (one without the token, for drift) x 2 seeds
    assert "images generated for evaluation: up to 100 (10 evaluations x 10)" in made.stdout
    ran = _cli("run", out.name, "--run-dir", str(tmp_path / "run"), cache=sdsweep_cache, cwd=tmp_path, timeout=1100)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["method"] == "lora" and best["metric"]["name"] == "composite"
    from sweeps.results import leaderboard

    rows, _ = leaderboard(tmp_path / "run")
    assert len(rows) == 2 and all(r.status in ("completed", "stopped") for r in rows), rows
    # Random tiny weights learn nothing in 10 steps: the confirmation must not call the pick better
    # than the base model, and its margin is under the smallest difference worth reporting.
    conf = json.loads((tmp_path / "run" / "confirm" / "confirm.json").read_text())
    over_base = conf["margins"]["baseline"]
    assert over_base["call"] in ("too close to call", "no meaningful difference"), over_base
    assert abs(over_base["margin"]) < over_base["min_difference"], over_base
    assert f"{best['trial_id']}@{best['metric']['step']}" == conf["winner"]
    # drift is scored and weighted: the base model does not drift from itself, the trials' values
    # are cosines read back from each evaluation's own scores
    state = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert state["baseline"]["scores"]["drift"] == pytest.approx(1.0, abs=1e-5)
    assert state["config"]["evaluation"]["images"]["weights"] == {"clip_t": 0.55, "clip_i": 0.05, "drift": 0.40}
    drifts = [h["drift"] for r in rows for h in r.history if "drift" in h]
    assert drifts and all(-1.0 <= d <= 1.0 + 1e-6 for d in drifts), drifts


def test_init_all_methods_with_a_class_prompt(tmp_path, sdsweep_cache) -> None:
    from sweeps.config import load_sweep

    data = _photos(tmp_path / "balls", captions=5)  # "a photo of sks ball"
    made = _cli("init", "--data", str(data), "--model", "builtin:tiny-sd", "--method", "all", "--class-prompt",
                "a photo of a ball", "--token", "sks ball", "--out", "all.yaml", cache=sdsweep_cache, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    cfg = load_sweep(tmp_path / "all.yaml")
    assert cfg.search_space().methods == ("lora", "textual_inversion", "dreambooth")
    assert cfg.base.data.caption_source == "auto"  # the folder's own captions
    from sweeps.config import trial_run_config

    assert trial_run_config(cfg, {"method": "dreambooth"}).settings.class_prompt == ("a photo of a ball",)
    assert trial_run_config(cfg, {"method": "textual_inversion"}).settings.initializer == "ball"
    assert cfg.evaluation.images.generation.token == "sks ball"
    assert "class images drawn once by the base model (prior preservation): 200" in made.stdout
    for method in ("lora", "textual_inversion", "dreambooth"):
        assert f"GPU memory per {method} trial" in made.stdout
    again = _cli("init", "--data", str(data), "--model", "builtin:tiny-sd", "--out", "all.yaml",
                 cache=sdsweep_cache, cwd=tmp_path)
    assert again.returncode == 2 and "all.yaml exists" in again.stderr and "--force" in again.stderr


def test_init_for_a_real_model_scores_with_clip_l14_dinov2_and_dino_drift(tmp_path, tiny_sd_dir) -> None:
    """A model that is not built in gets the real scorers' defaults (docs/EVALUATION.md): CLIP-T and
    CLIP-I on the default CLIP, DINO and drift in facebook/dinov2-base's space, the class prompt
    among the prompts drift compares with the base model's images. Read back as `sdsweep run`
    reads the file (nothing is downloaded: the scorers load when a sweep runs)."""
    import argparse

    from sweeps.config import sweep_from_mapping
    from sweeps.init import write_sweep_text
    from trainers.config import yaml_load

    data = _photos(tmp_path / "balls")
    args = argparse.Namespace(data=str(data), model=str(tiny_sd_dir), method="lora", token=None,
                              class_prompt="a photo of a ball", instance_prompt=None, trials=None, steps=None)
    text, _ = write_sweep_text(args)
    images = sweep_from_mapping(yaml_load(text), "init.yaml").evaluation.images
    assert images.metrics == ("clip_t", "clip_i", "dino", "drift_dino")
    assert images.vision_model == "facebook/dinov2-base" and images.clip == "openai/clip-vit-large-patch14"
    assert images.weights == {"clip_t": 0.55, "clip_i": 0.05, "drift_dino": 0.40}
    without = [p for p in images.generation.prompts if "{token}" not in p]
    assert without[0] == "a photo of a ball" and len(without) == 2


def test_init_names_what_is_wrong_with_the_folder(tmp_path, sdsweep_cache) -> None:
    half = _photos(tmp_path / "half", captions=2)
    partly = _cli("init", "--data", str(half), "--model", "builtin:tiny-sd", cache=sdsweep_cache, cwd=tmp_path)
    assert partly.returncode == 2 and "2 of 5 images have captions" in partly.stderr and "ball_4.png" in partly.stderr
    broken = _photos(tmp_path / "broken")
    (broken / "ball_1.png").write_bytes(b"not a png")
    bad = _cli("init", "--data", str(broken), "--model", "builtin:tiny-sd", cache=sdsweep_cache, cwd=tmp_path)
    assert bad.returncode == 2 and "ball_1.png" in bad.stderr
    assert not list(tmp_path.glob("sweep-*.yaml")), "nothing is written for a folder that does not pass"
