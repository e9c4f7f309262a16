"""Everything heavy on the run's device, at the run's precision (docs/ARCHITECTURE.md "On a GPU"), checked on
the CPU: one placement rule shared by the trainer, the evaluator, the cache build and the
baseline; scoring models cached per device; reference embeddings computed once per evaluator.
What only a GPU can show is in bench/gpu_smoke.py."""

from __future__ import annotations

from contextlib import nullcontext

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sweeps.config import load_sweep
from trainers import devices
from trainers import evaluate as ev
from trainers import metrics as mt
from trainers.config import LoraSettings, TrainConfig
from trainers.data import DataConfig, preflight
from trainers.evaluate import EvalSettings
from trainers.latents import build_latent_cache
from trainers.lora import LoraTrainer

CLIP, VIT = "builtin:tiny-clip", "builtin:tiny-vit"
TINY_DEMO = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "tiny-demo.yaml"
FROZEN = ("unet", "vae", "text_encoder")


def _evaluator_cfg() -> ev.EvaluatorConfig:
    gen = EvalSettings(prompts=("a photo of {token}", "{token} on a beach", "a red cube"), token="sks toy",
                       seeds=(0, 1), steps=2, guidance_scale=3.0)
    return ev.EvaluatorConfig(generation=gen, metrics=("clip_t", "clip_i", "dino"), clip=CLIP, vision_model=VIT)


def _references(demo_dir: Path) -> list:
    return ev.load_references(_evaluator_cfg(), DataConfig(path=str(demo_dir), resolution=64))


def test_reference_embeddings_are_computed_once_per_evaluator(tiny_model, demo_dir, monkeypatch) -> None:
    refs = _references(demo_dir)
    ref_ids = {id(im) for im in refs}
    embedded: list[tuple[str, int]] = []  # (scorer, number of reference images) per embedding call

    def counting(kind: str, real):
        def wrapper(spec, images, *args, **kwargs):
            if images and all(id(im) in ref_ids for im in images):
                embedded.append((kind, len(images)))
            return real(spec, images, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(mt, "image_embeddings", counting("clip", mt.image_embeddings))
    monkeypatch.setattr(mt, "vision_embeddings", counting("vision", mt.vision_embeddings))
    evaluator = ev.Evaluator(_evaluator_cfg(), refs)
    first, second = evaluator.run(tiny_model), evaluator.run(tiny_model)
    # Two evaluations, each reference set embedded once per scorer (it was once per evaluation).
    assert sorted(embedded) == [("clip", len(refs)), ("vision", len(refs))]
    assert first.scores == second.scores


def test_cached_reference_embeddings_give_the_per_call_scores(tiny_model, demo_dir) -> None:
    refs = _references(demo_dir)
    cfg = _evaluator_cfg()
    evaluator = ev.Evaluator(cfg, refs)
    first = evaluator.run(tiny_model)  # computes the reference embeddings
    cached = evaluator.run(tiny_model)  # reuses them
    # Per-call computation: each metric scores the subject images against a plain list.
    subject = [i for i, r in enumerate(cached.rows) if "sks toy" in r["prompt"]]
    pils = [cached.images[i].image for i in subject]
    prompts = [cached.images[i].prompt for i in subject]
    for name in ("clip_i", "dino"):
        plain = mt.get_metric(name, clip=CLIP, vision=VIT).score(pils, prompts, list(refs))
        assert cached.scores[name] == plain.value  # bit-equal: the same embeddings, the same arithmetic
        assert [cached.rows[i][name] for i in subject] == list(plain.per_item)
    assert cached.scores == first.scores


def test_scoring_models_are_cached_per_device_and_placed_there() -> None:
    # The meta device stands in for a GPU: a second device must get its own copy, put there.
    cpu_clip = mt.get_clip(CLIP, "cpu")[0]
    meta_clip = mt.get_clip(CLIP, "meta")[0]
    meta_vit = mt.get_vision_model(VIT, torch.device("meta"))[0]
    meta_checker = mt.get_checker("builtin:toyworld", "meta")
    try:
        assert meta_clip is not cpu_clip and mt.get_clip(CLIP, torch.device("meta"))[0] is meta_clip
        for model in (meta_clip, meta_vit, meta_checker):
            assert devices.module_placements(model) == {("meta", torch.float32)}
        assert devices.module_placements(cpu_clip) == {("cpu", torch.float32)}
        assert mt.get_clip(CLIP)[0] is cpu_clip  # no device: the CPU
    finally:
        mt.clear_clip_cache()  # the meta copies hold no weights


def test_an_evaluator_builds_its_metrics_on_its_device(demo_dir) -> None:
    from sweeps import trial

    cfg = load_sweep(TINY_DEMO)
    trial._EVALUATORS.clear()
    evaluator = trial.worker_evaluator(cfg, torch.device("meta"))
    assert evaluator is not None and evaluator.device == torch.device("meta")
    assert {m.device for m in evaluator.metrics} == {torch.device("meta")}  # type: ignore[attr-defined]
    assert trial.worker_evaluator(cfg, "cpu") is not evaluator  # the device is part of the key
    trial._EVALUATORS.clear()


def test_run_placement_is_the_trainers_device_and_weight_dtype(tiny_model, demo_dir, tmp_path, monkeypatch) -> None:
    data_cfg = DataConfig(path=str(demo_dir), resolution=64)
    data = build_latent_cache(preflight(data_cfg), data_cfg, tiny_model, root=tmp_path / "cache")
    tcfg = TrainConfig(max_train_steps=2, train_batch_size=2)
    trainer = LoraTrainer(tiny_model, data, tcfg, LoraSettings(), output_dir=tmp_path / "out")
    try:
        where = devices.run_placement(tcfg.device, tcfg.mixed_precision)
        assert (where.device, where.weight_dtype) == (trainer.device, trainer.weight_dtype)
    finally:
        trainer.teardown()
    # It runs the trainer's own precision rule (the trainer calls run_placement), not a copy of it.
    monkeypatch.setattr(devices, "resolve_mixed_precision", lambda requested, device: "bf16")
    assert devices.run_placement(None, "auto").weight_dtype == torch.bfloat16


class _Stop(Exception):
    pass


def test_the_baseline_is_sampled_with_the_trials_precision_and_autocast(tiny_model, monkeypatch) -> None:
    from sweeps import trial
    from sweeps.baseline import score_baselines

    # As on a bf16 GPU: the trainer's rule gives bf16, and sampling autocasts.
    monkeypatch.setattr(devices, "resolve_mixed_precision", lambda requested, device: "bf16")
    monkeypatch.setattr(devices, "sampling_autocast", lambda device, dtype: None if dtype == torch.float32 else dtype)
    seen: list[dict] = []

    def record(self, model, autocast_dtype=None, prediction_type=None, as_base=False, defer_drift=False):
        seen.append({"autocast": autocast_dtype, "device": self.device,
                     **{n: devices.module_placements(getattr(model, n)) for n in FROZEN}})
        raise _Stop

    monkeypatch.setattr(ev.Evaluator, "run", record)
    cfg = load_sweep(TINY_DEMO)
    trial._EVALUATORS.clear()
    with pytest.raises(_Stop):
        score_baselines(cfg, tiny_model)
    # A trial's evaluation: its trainer has run_placement's device and dtype (test above).
    where = devices.run_placement(cfg.base.train.device, cfg.base.train.mixed_precision)
    fake = SimpleNamespace(model=tiny_model, device=where.device, weight_dtype=where.weight_dtype,
                           evaluation_model=lambda: nullcontext(tiny_model), prediction_type="epsilon")
    with pytest.raises(_Stop):
        trial.evaluate_images(trial.worker_evaluator(cfg, where.device), fake, Path("unused"), {})
    baseline, trial_eval = seen
    assert baseline["autocast"] == trial_eval["autocast"] == torch.bfloat16
    assert baseline["device"] == trial_eval["device"] == where.device
    for n in FROZEN:  # frozen weights in the weight dtype, as Trainer._place leaves them
        assert baseline[n] == {(str(where.device), torch.bfloat16)}
    trial._EVALUATORS.clear()


def test_the_cache_encodes_in_fp32_whatever_dtype_the_vae_was_loaded_in(tiny_sd_dir, demo_dir, tmp_path) -> None:
    from trainers.models import load_base_model

    cfg = DataConfig(path=str(demo_dir), resolution=64, random_flip=True)
    records = preflight(cfg)
    half = load_base_model("builtin:tiny-sd", torch_dtype=torch.bfloat16)  # keys name bf16 weights
    upcast = load_base_model("builtin:tiny-sd", torch_dtype=torch.bfloat16)
    upcast.vae.float()  # the same weights, exactly, computing in fp32
    upcast.text_encoder.float()
    expected = build_latent_cache(records, cfg, upcast, root=tmp_path / "a")
    got = build_latent_cache(records, cfg, half, root=tmp_path / "b", device="cpu")
    assert got.key == expected.key and got.report.encode_device == "cpu"
    assert torch.equal(got.mean, expected.mean) and torch.equal(got.std, expected.std)
    assert torch.equal(got.text_embeds, expected.text_embeds)  # type: ignore[arg-type]
    assert devices.module_placements(half.vae) == {("cpu", torch.float32)}


def test_a_run_builds_its_cache_on_the_runs_device(tiny_model, monkeypatch) -> None:
    from trainers import run
    from trainers.config import RunConfig

    seen = {}
    monkeypatch.setattr(run, "build_latent_cache", lambda *a, **kw: seen.update(kw))
    cfg = RunConfig.model_validate({"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
                                    "method": "lora", "train": {"device": "cpu"}})
    run.prepare_data(cfg, tiny_model, cache_text=True)
    assert seen["device"] == devices.run_device("cpu") == torch.device("cpu")
