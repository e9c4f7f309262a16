"""The demo on the toy world, end to end: a real sweep teaches the star, and the leaderboard,
sweep state, export and HTML report show the CLIP scores beside the checker's ground truth.

The shipped sweeps/configs/demo.yaml as the README runs it (W&B off). Slow (~4 min).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_shipped_sweep
from run_files import beyond_seed_noise

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, sdsweep_cache: Path) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("toyworld-demo") / "run"
    # The shipped demo, unshortened (8 trials x 600 steps; ~9 min on a quiet 2-core machine, 13-14
    # in the suite beside the other worker): a shortened one (2 trials x 300 steps) picked a
    # checkpoint whose held-out gain was 0.06, within noise.
    return run_dir, run_shipped_sweep(DEMO, run_dir, sdsweep_cache)


def test_leaderboard_shows_clip_scores_beside_ground_truth_and_the_baseline(demo_run, capsys):
    from sweeps.cli import main

    run_dir, out = demo_run
    # The console's table (its 120-column width is checked on the widest, the mixed demo's) names
    # the score columns it left out ...
    assert re.search(r"^base\s+-\s+\(no adapter\)", out, re.M), out
    assert re.search(r"not shown here: .*clip_t", out), out
    # ... which `sdsweep results --wide` shows, beside the ground truth.
    assert main(["results", str(run_dir), "--wide"]) == 0
    wide = capsys.readouterr().out
    header = next(line for line in wide.splitlines() if line.split()[:2] == ["rank", "trial"])
    for column in ("composite", "clip_t", "clip_i", "concept_rate", "prior_kept"):
        assert column in header.split(), (column, header)
    assert re.search(r"^base\s+\(no adapter\)", wide, re.M), wide
    state = json.loads((run_dir / "sweep.json").read_text())
    base = state["baseline"]["scores"]
    assert set(base) >= {"clip_t", "clip_i", "concept_rate", "prior_kept", "composite"}
    assert state["baseline"]["identity"]["checker"]["spec"] == "builtin:toyworld"
    # The base model has never drawn a star: the token means nothing to it yet.
    assert base["concept_rate"] <= 0.25, base


def test_the_checkpoint_the_sweep_picked_draws_the_star_on_images_picking_never_saw(demo_run):
    """Ground truth, not CLIP, and the product's decision, not the best case: the exported pick
    (best.json) draws the star on held-out colour pairs and seeds where the base model does not,
    by a margin the seeds' noise cannot explain on those colour pairs (the seed part of the
    confirmation's two-way bootstrap). Across colour pairs the two-way interval does not separate
    it (the pick learned the star on some pairs only: +0.47 [-0.07, +1.00] with 4 pairs); a demo
    whose gain generalises over prompts is issue 21's goal."""
    run_dir, out = demo_run
    best = json.loads((run_dir.parent / "best" / "best.json").read_text())
    assert {"concept_rate", "prior_kept"} <= set(best["image_scores"])
    held = best["heldout"]
    assert held is not None and "scores" in held, held
    demo = json.loads((run_dir / "sweep.json").read_text())["config"]["evaluation"]
    assert set(held["seeds"]).isdisjoint(demo["images"]["generation"]["seeds"])
    gain = held["margins_by_metric"]["baseline"]["concept_rate"]
    assert gain["margin"] == pytest.approx(held["scores"]["concept_rate"] - held["baseline"]["concept_rate"])
    assert gain["margin"] >= 0.15 and beyond_seed_noise(gain) > 0, gain
    assert "held-out confirmation" in out


def test_report_shows_the_ground_truth_and_the_images(demo_run):
    run_dir, _ = demo_run
    html = (run_dir / "report" / "index.html").read_text()
    assert "concept_rate" in html and "prior_kept" in html
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert sources and all((run_dir / "report" / s).is_file() for s in sources), sources[:5]
    assert any("baseline" in s for s in sources)


def test_the_console_is_plain_lines_a_person_reads_at_a_glance(demo_run):
    """`sdsweep run` into a pipe (as in CI): sdsweep's own lines, no control codes, none of Ray
    Tune's tables; a start and an end line per trial, each end saying why it ended."""
    run_dir, out = demo_run
    assert "\x1b" not in out and "\r" not in out
    for tune_output in ("Trial status", "╭", "Configuration for experiment", "View detailed results"):
        assert tune_output not in out, tune_output
    live = out[: out.index("run directory:")].rstrip("\n").splitlines()
    trials = json.loads((run_dir / "sweep.json").read_text())["config"]["search"]["num_samples"]
    starts = [line for line in live if line.startswith("start ")]
    ends = [line for line in live if line.startswith("end ")]
    assert len(starts) == len(ends) == trials, live
    assert all(re.search(r"(completed \d+ steps|stopped by ASHA at step \d+|errored at step \d+: .+)", e) for e in ends)
    assert live[-1].startswith(f"trials {trials} done") and " 0 running, 0 left" in live[-1]
    assert any(line.startswith("baseline images  [####################]") for line in live)
    assert len(live) <= 2 * trials + 20, live  # the sweep's part of the console: about a screenful


def test_drift_reads_back_from_the_trials_and_the_base_models_own_images(demo_run):
    """Each evaluation's drift is, image by image, the cosine (transformers' CLIP, computed here)
    between the trial's image of a known-shape prompt and the base model's image at the same
    prompt and seed, both read back from the files the sweep wrote; the base model's own is 1, in
    the trials' baseline and in the held-out confirmation."""
    import torch
    from PIL import Image

    from trainers import metrics as mt
    from trainers.toyworld.concept import TOKEN

    run_dir, _ = demo_run
    state = json.loads((run_dir / "sweep.json").read_text())
    base_dir = run_dir / state["baseline"]["dir"]
    assert (base_dir / state["baseline"]["base_embeddings"]).is_file()
    assert state["baseline"]["scores"]["drift"] == pytest.approx(1.0, abs=1e-5)
    base_files = {(r["prompt"], r["seed"]): base_dir / r["file"]
                  for r in json.loads((base_dir / "scores.json").read_text())["rows"]}
    model, _, processor = mt.get_clip(state["config"]["evaluation"]["images"]["clip"])

    def embed(paths):
        with torch.no_grad():
            out = model.get_image_features(pixel_values=processor(
                images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"])
        feats = getattr(out, "pooler_output", out)
        return feats / feats.norm(dim=-1, keepdim=True)

    samples = sorted(run_dir.glob("run_trial_*/samples/step-*/scores.json"))
    assert len(samples) >= 8
    for path in samples[::4]:
        scores = json.loads(path.read_text())
        rows = [r for r in scores["rows"] if TOKEN not in r["prompt"]]
        expected = (embed([path.parent / r["file"] for r in rows])
                    * embed([base_files[(r["prompt"], r["seed"])] for r in rows])).sum(-1)
        assert [r["drift"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5), path
        assert scores["scores"]["drift"] == pytest.approx(float(expected.mean()), abs=1e-5)
        assert all(r["drift"] is None for r in scores["rows"] if TOKEN in r["prompt"])
    conf = json.loads((run_dir / "confirm" / "confirm.json").read_text())
    held = {m["label"]: m["heldout"] for m in conf["models"]}
    assert held["baseline"]["drift"] == pytest.approx(1.0, abs=1e-5)
    assert all(v["drift"] <= 1.0 + 1e-5 for v in held.values())
    # The confirmation draws the base model beside the top K and scores their drift afterwards on
    # the driver: read back from its files, it is the same cosine with the base model's images.
    held_dirs = {m["label"]: run_dir / m["dir"] for m in conf["models"]}
    held_base = {(r["prompt"], r["seed"]): held_dirs["baseline"] / r["file"]
                 for r in json.loads((held_dirs["baseline"] / "scores.json").read_text())["rows"]}
    candidates = [label for label in held_dirs if label != "baseline"]
    assert candidates
    for label in candidates:
        scores = json.loads((held_dirs[label] / "scores.json").read_text())
        rows = [r for r in scores["rows"] if TOKEN not in r["prompt"]]
        expected = (embed([held_dirs[label] / r["file"] for r in rows])
                    * embed([held_base[(r["prompt"], r["seed"])] for r in rows])).sum(-1)
        assert [r["drift"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5), label
        assert scores["scores"]["drift"] == pytest.approx(float(expected.mean()), abs=1e-5)
        assert held[label]["drift"] == pytest.approx(scores["scores"]["drift"], abs=1e-9)
