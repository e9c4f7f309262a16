"""One sweep across LoRA, textual inversion and DreamBooth, end to end: the shipped
sweeps/configs/demo-mixed.yaml as the README runs it (W&B offline), on a real local Ray with a
real Optuna study. Checks that every method got trials, that each trial carries its own method's
parameters only, that what each trial spent is reported and shown, that W&B groups trials by
method, and that the picked checkpoint -- and each method's best -- exports in its method's
formats and loads in diffusers. Slow (~2-3 min).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from conftest import run_shipped_sweep
from run_files import chromium_text, optuna_dashboard
from sweeps.config import load_sweep
from trainers.toyworld import weights_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "configs" / "demo-mixed.yaml"
PROMPT = "a red sks shape on a blue background"


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory, sdsweep_cache: Path) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("mixed-demo") / "run"
    storage = f"search.storage=sqlite:///{run_dir.parent / 'optuna.db'}"  # for the optuna-dashboard tests
    # Shortened (6 -> 4 trials: the 3 warm starts and one proposal; 450 -> 300 steps; no held-out
    # confirmation, so the export is the leaderboard's best): what these tests check is how methods
    # mix, not how good the pick is (that is the single-method demos'; a confirmation across methods
    # and precisions: tests/test_precision_baselines.py).
    short = ("search.num_samples=4", "base.train.max_train_steps=300", "evaluation.confirm=null")
    return run_dir, run_shipped_sweep(DEMO, run_dir, sdsweep_cache, wandb=True, sets=(storage, *short))


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
        # samples_per_s counts the same unit: per step (samples_per_s / steps_per_s, one interval's
        # rates) it is what images_seen grew by per step between that report and the one before
        reports = [h for h in r.history if "samples_per_s" in h]
        assert reports, r.history
        for before, h in zip([{"step": 0, "images_seen": 0}, *reports], reports):
            grew = (h["images_seen"] - before["images_seen"]) / (h["step"] - before["step"])
            assert h["samples_per_s"] / h["steps_per_s"] == pytest.approx(grew, rel=1e-9), (r.method, r.params, h)
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
    sweep_run = runs.pop(wandb_run_id(run_dir.name, "sweep"))
    assert len(runs) == len(rows)
    for r in rows:
        run = runs[wandb_run_id(run_dir.name, r.trial_id)]
        assert run.group == run_dir.name and run.job_type == r.method
        assert {k for k in run.config if "." in k and ":" not in k} == set(r.params) - {"method"}
        # the runs table and parallel coordinates rank by what the leaderboard ranks by
        assert run.summary["trial_status"] == r.status, (r.trial_id, run.summary)
        if r.best is not None:
            assert run.summary["best_composite"] == pytest.approx(r.best)
            assert run.summary["best_step"] == r.best_step
    assert sweep_run.group == run_dir.name and sweep_run.job_type == "sweep"


def test_the_sweep_level_wandb_run_holds_the_leaderboard_and_the_baseline(mixed_run):
    from sweeps.results import leaderboard
    from sweeps.tracking import read_offline_run, wandb_run_id

    run_dir, _ = mixed_run
    rows, state = leaderboard(run_dir)
    path = next(d for d in (run_dir / "wandb").glob("offline-run-*")
                if d.name.endswith(wandb_run_id(run_dir.name, "sweep")))
    run = read_offline_run(path)
    winner = next(r for r in rows if r.rank == 1)
    assert run.summary["best_trial"] == winner.trial_id and run.summary["best_step"] == winner.best_step
    assert run.summary["baseline_composite"] == pytest.approx(state["baseline"]["scores"]["composite"])
    (table_file,) = (path / "files" / "media" / "table").glob("leaderboard_*.table.json")
    table = json.loads(table_file.read_text())
    got = {row[table["columns"].index("trial_id")]: row for row in table["data"]}
    assert set(got) == {r.trial_id for r in rows}
    for r in rows:
        row = dict(zip(table["columns"], got[r.trial_id]))
        assert row["method"] == r.method and row["status"] == r.status
        assert (row["composite"] is None) if r.best is None else row["composite"] == pytest.approx(r.best)
    assert list((path / "files" / "media" / "images").glob("baseline_*.png")), "no baseline image"


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
    from sweeps.export import export_best
    from sweeps.results import best_per_method, leaderboard

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


def test_results_fit_120_columns_and_the_rest_is_in_wide_csv_and_json(mixed_run, capsys):
    """The mixed sweep has the most hyperparameters of the shipped sweeps (three methods' spaces)."""
    import csv
    import io

    from sweeps.board import param_keys
    from sweeps.cli import main
    from sweeps.results import COST_KEYS, image_metrics, leaderboard

    run_dir, _ = mixed_run
    rows, state = leaderboard(run_dir)
    keys = param_keys(rows)
    assert len(keys) >= 4, keys

    def results(*args: str) -> str:
        assert main(["results", str(run_dir), *args]) == 0
        return capsys.readouterr().out

    compact = results()
    assert max(len(line) for line in compact.splitlines()) <= 120, compact
    assert all(r.trial_id in compact for r in rows[:10])
    assert "lr=train.learning_rate" in compact and "r=lora.rank" in compact  # the legend of the short names
    top2 = results("--top", "2")
    assert rows[0].trial_id in top2 and rows[1].trial_id in top2 and rows[2].trial_id not in top2.split("best per")[0]
    assert f"{len(rows) - 2} more trial(s) not shown" in top2 and "--top 0" in top2
    assert max(len(line) for line in top2.splitlines()) <= 120

    header = results("--wide").splitlines()[1]
    assert all(k in header.split() for k in keys) and all(m in header for m in image_metrics(state))
    assert len(header) > 120  # what the compact table leaves out is here

    table = list(csv.DictReader(io.StringIO(results("--format", "csv"))))
    trials = [t for t in table if t["status"] != "baseline"]
    assert [t["trial_id"] for t in trials] == [r.trial_id for r in rows]
    assert [t for t in table if t["status"] == "baseline"][0]["trial_id"] == "baseline"
    for t, r in zip(trials, rows):
        assert t["method"] == r.method and t["status"] == r.status and float(t["composite"]) == pytest.approx(r.best)
        for k in keys:
            assert t[k] == ("" if r.params.get(k) is None else str(r.params[k])), (k, t[k])
        for k in COST_KEYS:
            assert float(t[k]) == pytest.approx(r.cost[k]), k
        for m in image_metrics(state):
            assert float(t[m]) == pytest.approx(r.best_metrics[m]), m

    data = json.loads(results("--format", "json"))
    assert data["metric"] == "composite" and data["mode"] == "max"
    assert [t["trial_id"] for t in data["trials"]] == [r.trial_id for r in rows]
    for t, r in zip(data["trials"], rows):
        assert t["hyperparameters"] == {k: v for k, v in r.params.items() if k != "method"}
        assert t["cost"] == r.cost and t["status"] == r.status and t["error"] == r.error
        assert t["scores_at_best_step"] == {m: r.best_metrics[m] for m in image_metrics(state)}


def _study(run_dir: Path):
    import optuna

    return optuna.load_study(study_name="demo-mixed", storage=f"sqlite:///{run_dir.parent / 'optuna.db'}")


def test_the_optuna_study_speaks_the_leaderboards_language(mixed_run):
    """Objectives named as sdsweep names them; each Optuna trial labelled with its sdsweep trial
    id, status and best step, as the leaderboard has them."""
    from sweeps.results import leaderboard

    run_dir, _ = mixed_run
    rows, _ = leaderboard(run_dir)
    study = _study(run_dir)
    assert study.metric_names == ["composite"]
    labelled = {t.user_attrs["sdsweep_trial_id"]: t for t in study.trials}
    assert set(labelled) == {r.trial_id for r in rows}
    for r in rows:
        attrs = labelled[r.trial_id].user_attrs
        assert attrs["sdsweep_status"] == r.status, (r.trial_id, attrs, r.status)
        if r.status == "completed":
            assert attrs["sdsweep_best_step"] == r.best_step
            assert attrs["sdsweep_best_composite"] == pytest.approx(r.best)
            assert labelled[r.trial_id].value == pytest.approx(r.best)


def test_optuna_dashboard_shows_the_sweep_in_a_headless_browser(mixed_run):
    """`optuna-dashboard STORAGE` (the `dashboard` extra) as a user starts it: the study list names
    the sweep's study, the study page names the objective (not "Objective 0"), and the trial list
    holds every trial with its sdsweep trial id."""
    from sweeps.results import leaderboard

    run_dir, _ = mixed_run
    rows, _ = leaderboard(run_dir)
    with optuna_dashboard(f"sqlite:///{run_dir.parent / 'optuna.db'}") as base:
        listing = chromium_text(f"{base}/dashboard/")
        assert "demo-mixed" in listing and "MAXIMIZE" in listing, listing[:2000]
        sid = _study(run_dir)._study_id
        page = chromium_text(f"{base}/dashboard/studies/{sid}")
        assert "composite" in page and "Objective 0" not in page, page[:3000]
        trials = chromium_text(f"{base}/dashboard/studies/{sid}/trials")
        assert f"{len(rows)} Trials" in trials, trials[:2000]
        first = _study(run_dir).trials[0].user_attrs  # the trial list opens on trial 0's details
        assert f"sdsweep_trial_id {first['sdsweep_trial_id']}" in trials and "sdsweep_status" in trials, trials[:3000]
