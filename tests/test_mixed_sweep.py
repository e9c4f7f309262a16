"""One sweep across LoRA, textual inversion and DreamBooth, end to end: the shipped
sweeps/configs/demo-mixed.yaml as the README runs it (W&B offline), on a real local Ray with a
real Optuna study. Checks that every method got trials, that each trial carries its own method's
parameters only, that what each trial spent is reported and shown, that W&B groups trials by
method, and that the picked checkpoint -- and each method's best -- exports in its method's
formats and loads in diffusers. Slow (~6 min).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from conftest import run_shipped_sweep
from sweeps.config import load_sweep
from trainers.toyworld import weights_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "configs" / "demo-mixed.yaml"
PROMPT = "a red sks shape on a blue background"


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory, sdsweep_cache: Path) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("mixed-demo") / "run"
    return run_dir, run_shipped_sweep(DEMO, run_dir, sdsweep_cache, wandb=True)


def test_every_method_got_trials_each_with_its_own_parameters_only(mixed_run):
    from sweeps.results import leaderboard

    run_dir, _ = mixed_run
    rows, _ = leaderboard(run_dir)
    space = load_sweep(DEMO).search_space()
    own = {m: {p.key for p in entries} for m, entries in zip(space.methods, space.entries)}
    assert {r.method for r in rows} == set(space.methods)
    assert all(r.status != "error" for r in rows), [(r.trial_id, r.error) for r in rows]
    for r in rows:
        assert set(r.params) - {"method"} == own[r.method], (r.method, r.params)
        # and the trial trained that method: its checkpoints hold its method's resume state
        ckpts = sorted(r.path.glob("checkpoint_*/trainer_state.json"))
        assert ckpts and json.loads(ckpts[-1].read_text())["method"] == r.method


def test_each_trial_reports_what_it_spent_and_the_leaderboard_shows_it(mixed_run):
    from sweeps.results import COST_HEAD, leaderboard

    run_dir, stdout = mixed_run
    rows, _ = leaderboard(run_dir)
    for r in rows:
        assert r.cost["trainer_s"] > 0 and r.cost["peak_memory_mb"] > 0 and r.cost["artifact_bytes"] > 0, r.cost
        # images seen: examples through the UNet; DreamBooth's prior puts a class example beside each
        per_step = 4 * (2 if r.method == "dreambooth" and r.params["dreambooth.prior_loss_weight"] > 0 else 1)
        assert r.cost["images_seen"] == r.steps * per_step, (r.method, r.params, r.cost, r.steps)
    sizes = {r.method: r.cost["artifact_bytes"] for r in rows}
    assert sizes["textual_inversion"] < sizes["lora"] < sizes["dreambooth"]  # a few rows < adapters < a UNet
    assert all(h in stdout for h in COST_HEAD) and "best per method" in stdout
    # The scheduler's clock (trainer seconds here, methods mix) is in every evaluation's report and
    # grows with the steps: ASHA silently lets a trial run on when its time_attr is missing.
    assert load_sweep(DEMO).time_attr == "trainer_s"
    for r in rows:
        clock = [h["trainer_s"] for h in r.history if "composite" in h]
        assert len(clock) == len([h for h in r.history if "composite" in h]) and clock == sorted(set(clock)), r.history
    report = (run_dir / "report" / "index.html").read_text()
    assert 'id="methods"' in report and 'id="spend-chart"' in report


def test_wandb_groups_the_trials_by_method(mixed_run):
    from sweeps.results import leaderboard
    from sweeps.tracking import read_offline_run, wandb_run_id

    run_dir, _ = mixed_run
    rows, _ = leaderboard(run_dir)
    runs = {run.run_id: run for run in (read_offline_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*")))}
    assert len(runs) == len(rows)
    for r in rows:
        run = runs[wandb_run_id(run_dir.name, r.trial_id)]
        assert run.group == run_dir.name and run.job_type == r.method
        assert {k for k in run.config if "." in k and ":" not in k} == set(r.params) - {"method"}


def _user_pipeline() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(weights_dir(), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(pipe: StableDiffusionPipeline) -> np.ndarray:
    out = pipe(prompt=PROMPT, num_inference_steps=5, height=32, width=32, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(out, dtype=np.int16)


def _load(pipe: StableDiffusionPipeline, method: str, export: Path, files: list[str]) -> None:
    if method == "lora":
        pipe.load_lora_weights(str(export), weight_name="pytorch_lora_weights.safetensors")
    elif method == "textual_inversion":
        pipe.load_textual_inversion(str(export / "learned_embeds.safetensors"))
    else:
        assert files[0] == "unet"
        pipe.unet = UNet2DConditionModel.from_pretrained(str(export / "unet"))


def test_the_winner_and_each_methods_best_export_in_their_methods_format_and_load(mixed_run, tmp_path):
    from sweeps.results import best_per_method, export_best, leaderboard

    run_dir, _ = mixed_run
    winner = json.loads((run_dir.parent / "best" / "best.json").read_text())
    rows, _ = leaderboard(run_dir)
    assert winner["trial_id"] == rows[0].trial_id and winner["method"] == rows[0].method
    assert winner["cost"]["trainer_s"] > 0
    base = _draw(_user_pipeline())
    for method, row in best_per_method(rows).items():
        dest = tmp_path / method
        info = export_best(run_dir, dest, method=method)
        assert info["method"] == method and info["trial_id"] == row.trial_id and info["among_method"] == method
        pipe = _user_pipeline()
        _load(pipe, method, dest, info["files"])
        assert np.abs(_draw(pipe) - base).max() > 8, f"{method}'s export changes nothing a user sees"
    with pytest.raises(ValueError, match="no trial of that method"):
        export_best(run_dir, tmp_path / "none", method="no_such_method")


def test_sdsweep_best_method_on_the_command_line_exports_that_methods_best(mixed_run, tmp_path):
    import subprocess
    import sys

    from sweeps.results import best_per_method, leaderboard

    run_dir, _ = mixed_run
    row = best_per_method(leaderboard(run_dir)[0])["textual_inversion"]
    dest = tmp_path / "ti"
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "best", str(run_dir), "--method", "textual_inversion",
                           "--export", str(dest)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(proc.stdout)
    assert shown["method"] == "textual_inversion" and shown["trial_id"] == row.trial_id
    assert shown["cost"]["artifact_bytes"] == (dest / "learned_embeds.safetensors").stat().st_size
    assert "textual_inversion trial" in shown["why"]
    bad = subprocess.run([sys.executable, "-m", "sweeps.cli", "best", str(run_dir), "--method", "dreamboth",
                          "--export", str(tmp_path / "x")], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert bad.returncode != 0 and "no trial of that method" in bad.stderr and "dreambooth" in bad.stderr
