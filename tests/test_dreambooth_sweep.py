"""The DreamBooth demo end to end: a real Ray + Optuna sweep fine-tunes the toy world's UNet on the
star with prior preservation (class images drawn once in the cache task, for the largest searched
count); the checkpoint the sweep picked draws the star on images picking never saw, and its
exports load back (diffusers layout and single file); every checkpoint was written once, in the
run directory, holding what docs/METHODS.md's design says (bench/checkpoint_bytes.py).

The shipped sweeps/configs/demo-dreambooth.yaml as the README runs it (W&B off). Slow (~5 min).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import run_shipped_sweep, safetensors_data_bytes
from run_files import beyond_seed_noise
from trainers.models import load_base_model
from trainers.toyworld import weights_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DEMO = REPO / "sweeps" / "configs" / "demo-dreambooth.yaml"


@pytest.fixture(scope="module")
def db_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("db-demo") / "run"
    # A cache of its own: the mixed demo draws the same class images (same prompt, model and count),
    # and what this sweep drew must not depend on which of the two ran first.
    cache = tmp_path_factory.mktemp("db-demo-cache")
    return run_dir, run_shipped_sweep(DEMO, run_dir, cache, persist_log=run_dir.parent / "persist.jsonl")


def test_class_images_were_drawn_once_for_the_largest_searched_count_and_shared(db_run):
    run_dir, out = db_run
    from sweeps.results import leaderboard

    state = json.loads((run_dir / "sweep.json").read_text())
    extra = state["cache_builds"][0]["extra"]["dreambooth"]
    assert extra["class_images"] == 32 and extra["class_images_drawn"] == 32  # max of choices [16, 32]
    assert len(list(Path(extra["class_folder"]).glob("class_*.png"))) == 32
    # the console showed their drawing as a progress bar (plain lines; its finished state is checked)
    assert re.search(r"^class images\s+\[#{20}\] 32/32$", out, re.M), out[:2000]
    rows, _ = leaderboard(run_dir)
    assert rows and {r.method for r in rows} == {"dreambooth"}
    assert all(r.status != "error" for r in rows), [(r.trial_id, r.error) for r in rows]
    assert {r.params["dreambooth.num_class_images"] for r in rows} <= {16, 32}


def test_the_picked_checkpoint_draws_the_star_on_images_picking_never_saw(db_run):
    """The product's decision, judged by ground truth on held-out seeds and colour pairs: a gain
    the seeds' noise cannot explain on those colour pairs (the seed part of the confirmation's
    two-way bootstrap). Across colour pairs the two-way interval does not separate it (+0.33
    [-0.19, +0.85]); a demo whose gain generalises over prompts is issue 21's goal."""
    run_dir, _ = db_run
    best = json.loads((run_dir.parent / "best" / "best.json").read_text())
    assert best["method"] == "dreambooth"
    held = best["heldout"]
    assert held is not None and "scores" in held, held
    gain = held["margins_by_metric"]["baseline"]["concept_rate"]
    assert gain["margin"] >= 0.15 and beyond_seed_noise(gain) > 0, gain


def test_the_exports_load_back_and_hold_the_same_unet(db_run):
    run_dir, _ = db_run
    best_dir = run_dir.parent / "best"
    best = json.loads((best_dir / "best.json").read_text())
    single = [f for f in best["files"] if f.endswith("-dreambooth.safetensors")]
    assert best["files"][0] == "unet" and len(single) == 1
    unet = UNet2DConditionModel.from_pretrained(str(best_dir / "unet"))
    loaded = load_base_model(str(best_dir / single[0]), single_file_config=str(weights_dir()))
    a, b = unet.state_dict(), loaded.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # What the trial reported shipping at that step is the UNet (not only the small info file).
    unet_bytes = sum(f.stat().st_size for f in (best_dir / "unet").iterdir())
    assert best["cost"]["artifact_bytes"] >= unet_bytes > 4_000_000


def test_each_checkpoint_is_written_once_in_the_run_directory_holding_each_tensor_once(db_run):
    """Tune copied nothing (the probe logs every persist call of every sweep process), and what
    is on disk is the design's bytes for the toy world's UNet: the export and AdamW's moments, no
    second copy of the weights, and no optimizer state in a trial's last checkpoint (step 600)."""
    from checkpoint_bytes import checkpoint_bytes

    run_dir, _ = db_run
    persisted = [json.loads(line) for line in (run_dir.parent / "persist.jsonl").read_text().splitlines()]
    trials = [d for d in run_dir.iterdir() if d.is_dir() and (d / "sdsweep_results.jsonl").is_file()]
    reported = [json.loads(line) for t in trials for line in (t / "sdsweep_results.jsonl").read_text().splitlines()]
    assert len(persisted) == sum("artifact_bytes" in r for r in reported) > len(trials), (persisted, reported)
    assert all(p["files"] == 0 and p["bytes"] == 0 for p in persisted), persisted  # nothing written twice
    assert {str(Path(p["dest"]).parent) for p in persisted} == {str(t) for t in trials}
    unet = list(load_base_model("builtin:toyworld").unet.parameters())
    base = {"sdsweep_dreambooth.json", "trainer_state.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors"}
    for trial in trials:
        assert not list(trial.glob(".checkpoint_*")), "an unfinished checkpoint write was left behind"
        ckpts = sorted(trial.glob("checkpoint_*"))
        assert ckpts
        for c in ckpts:
            files = {str(f.relative_to(c)) for f in c.rglob("*") if f.is_file()}
            # Resume tensors only in a completed trial's last checkpoint (no optimizer state in it):
            # KeepResumeStateInNewest dropped the others', sweeps/checkpoint_keeping.py a stopped trial's newest.
            newest = c == ckpts[-1] and not json.loads((c / "trainer_state.json").read_text())["optimizer_state"]
            assert files == base | ({"trainer_state.safetensors"} if newest else set()), (c, files)
            last = json.loads((c / "trainer_state.json").read_text())["step"] == 600
            want = checkpoint_bytes(unet, None, ema=False, design="after", last=last)
            assert safetensors_data_bytes(c / "unet" / "diffusion_pytorch_model.safetensors") == want["export"]
            if newest:
                assert safetensors_data_bytes(c / "trainer_state.safetensors") == want["resume"], c
