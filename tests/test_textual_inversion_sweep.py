"""The textual-inversion demo end to end: a real Ray + Optuna sweep over learning rate, vectors per
token and initializer gives the toy world's triangle a new name; the checkpoint the sweep picked
draws it on images picking never saw, and its export loads in diffusers in both layouts.

The shipped sweeps/configs/demo-ti.yaml as the README runs it (W&B off). Slow (~2 min).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from conftest import run_shipped_sweep
from trainers.toyworld import weights_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "configs" / "demo-ti.yaml"


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory: pytest.TempPathFactory, sdsweep_cache: Path) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("ti-demo") / "run"
    return run_dir, run_shipped_sweep(DEMO, run_dir, sdsweep_cache)


def test_only_each_trials_newest_checkpoint_keeps_the_resume_tensors(ti_run):
    run_dir, _ = ti_run
    trials = [d for d in run_dir.iterdir() if d.is_dir() and sorted(d.glob("checkpoint_*"))]
    assert trials
    for trial in trials:
        ckpts = sorted(trial.glob("checkpoint_*"))
        assert all((c / "trainer_state.json").is_file() and (c / "learned_embeds.safetensors").is_file()
                   for c in ckpts)
        # Resume tensors only in a completed trial's last checkpoint (written without optimizer
        # state); a trial stopped early keeps none once the sweep has ended (sweeps/checkpoint_keeping.py).
        completed = not json.loads((ckpts[-1] / "trainer_state.json").read_text())["optimizer_state"]
        assert [c.name for c in ckpts if (c / "trainer_state.safetensors").is_file()] == \
            ([ckpts[-1].name] if completed else [])


def test_every_trial_is_textual_inversion_and_vectors_per_token_is_searched(ti_run):
    run_dir, out = ti_run
    from sweeps.results import leaderboard

    rows, _ = leaderboard(run_dir)
    assert rows and {r.method for r in rows} == {"textual_inversion"}
    assert len({r.params["textual_inversion.vectors_per_token"] for r in rows}) > 1, [r.params for r in rows]
    assert all(r.status != "error" for r in rows), [(r.trial_id, r.error) for r in rows]
    assert "textual_inversion" in out


def test_the_picked_checkpoint_names_the_triangle_on_images_picking_never_saw(ti_run):
    """The product's decision, judged by ground truth on held-out seeds and colour pairs: the gain
    over the base model is one the paired bootstrap says the seeds' noise cannot explain."""
    run_dir, _ = ti_run
    best = json.loads((run_dir.parent / "best" / "best.json").read_text())
    assert best["method"] == "textual_inversion"
    held = best["heldout"]
    assert held is not None and "scores" in held, held
    gain = held["margins_by_metric"]["baseline"]["concept_rate"]
    assert gain["margin"] >= 0.3 and gain["separated"] and gain["low"] > 0, gain
    # Textual inversion changes no word the model knew: the known shapes are drawn as before.
    assert held["scores"]["prior_kept"] >= held["baseline"]["prior_kept"] - 0.05, held


def test_the_export_loads_in_diffusers_in_both_layouts_and_draws_the_same(ti_run):
    run_dir, _ = ti_run
    best_dir = run_dir.parent / "best"
    best = json.loads((best_dir / "best.json").read_text())
    assert best["files"] == ["learned_embeds.safetensors", "sks-shape.safetensors"]
    # The trial reported what its checkpoint ships: the embedding file, bytes for bytes.
    assert best["cost"]["artifact_bytes"] == (best_dir / "learned_embeds.safetensors").stat().st_size
    with safe_open(str(best_dir / "sks-shape.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        provenance = json.loads(f.metadata()["sdsweep_best"])
    assert provenance["trial_id"] == best["trial_id"] and provenance["image_scores"] == best["image_scores"]
    images = []
    for name, token in (("learned_embeds.safetensors", None), ("sks-shape.safetensors", "sks shape")):
        pipe = StableDiffusionPipeline.from_pretrained(weights_dir(), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_textual_inversion(str(best_dir / name), token=token)
        images.append(pipe("a red sks shape on a blue background", num_inference_steps=5, height=32, width=32,
                           output_type="np", generator=torch.Generator().manual_seed(0)).images)
    assert np.array_equal(images[0], images[1])
