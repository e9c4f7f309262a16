"""Evaluate a (fine-tuned) model: generate with fixed prompts and seeds, then score the images.

* ``generate(model, EvalSettings(...))`` (``trainers.generation``) -- prompts x seeds, batched,
  one seeded generator per image.
* ``Evaluator(EvaluatorConfig(...), references)`` -- generate, score with the configured metrics
  (``trainers.metrics``: clip_t, clip_i, dino, drift, ground truth) and the weighted ``composite``; the record holds
  per-image scores, timings and the identity of the settings and scoring models.
  ``write_samples`` stores the images, a grid and ``scores.json`` for W&B and the HTML report.

Nothing here imports ray, optuna or wandb.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from pydantic import Field, model_validator

from trainers.config import Frozen
from trainers.data import DataConfig, load_pixels, preflight
from trainers.devices import sampled_placement
# Generation lives in trainers.generation; re-exported because callers know these as trainers.evaluate.*.
from trainers.generation import (  # noqa: F401 - re-exports
    SAMPLERS,
    TOKEN_PLACEHOLDER,
    EvalSettings,
    GeneratedImage,
    SamplerName,
    generate,
    image_grid,
    make_sampling_scheduler,
    vae_round_trip,
)
from trainers.metrics import (
    COMPOSITE,
    DEFAULT_CLIP,
    GROUND_TRUTH,
    METRICS,
    Metric,
    MetricResult,
    References,
    composite,
    drift_values,
    get_metric,
    scorer_identity,
    shared_embeddings,
)
from trainers.models import BaseModel
from trainers.paths import LOCAL_PATH, MAYBE_PATH
from trainers.tensor_files import atomic_write_text


# --------------------------------------------------------------------------------------------
# Evaluator: generate + score, with everything needed to reproduce and compare the scores
# --------------------------------------------------------------------------------------------


class EvaluatorConfig(Frozen):
    """How checkpoints are judged by what they draw (the sweep file's ``evaluation.images``)."""

    generation: EvalSettings
    metrics: tuple[str, ...] = Field(default=("clip_t", "clip_i"), min_length=1)
    clip: str = Field(DEFAULT_CLIP, json_schema_extra=MAYBE_PATH)
    vision_model: str | None = Field(None, description="transformers vision backbone for 'dino'",
                                     json_schema_extra=MAYBE_PATH)
    preference_model: str | None = Field(None, description="CLIP-architecture human-preference model for "
                                         "'pickscore', e.g. yuvalkirstain/PickScore_v1", json_schema_extra=MAYBE_PATH)
    preference_processor: str | None = Field(
        None, description="where preference_model's tokenizer and image processor come from instead of its own "
        "folder (PickScore_v1 has none: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)", json_schema_extra=MAYBE_PATH)
    # Composite weights; None: equal weights over ``metrics``. Values are put on one scale first
    # (trainers.metrics.composite: CLIP-T/100 is a cosine like CLIP-I), but how far each one moves
    # the composite also depends on its spread across checkpoints, which differs by model
    # (docs/EVALUATION.md, "Choosing the composite weights").
    weights: dict[str, float] | None = None
    references: str | None = Field(None, description="folder of reference images; default: the training images",
                                   json_schema_extra=LOCAL_PATH)
    reference_vae: bool = Field(False, description="pass the reference images through the model's own VAE "
                                "(encode, decode) before clip_i / dino embed them, as every generated image was")
    # Ground truth (concept_rate, prior_kept): a judge of generated images and what the concept
    # token means to it. Only the toy world has one (docs/TOYWORLD.md).
    checker: str | None = Field(None, description="ground-truth checker: builtin:toyworld or a checker directory",
                                json_schema_extra=MAYBE_PATH)
    concept: str | None = Field(None, description="what generation.token means to the checker, e.g. 'star'")

    @model_validator(mode="after")
    def _check(self) -> "EvaluatorConfig":
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; valid metrics: {', '.join(sorted(METRICS))}")
        for name in ("dino", "drift_dino"):
            if name in self.metrics and not self.vision_model:
                raise ValueError(f"metrics includes {name!r} but vision_model is not set (e.g. facebook/dinov2-base)")
        if self.preference_processor and not self.preference_model:
            raise ValueError("preference_processor is set but preference_model is not: it is the processor of "
                             "that model; set preference_model or drop preference_processor")
        if self.preference_model and "pickscore" not in self.metrics:
            raise ValueError(f"preference_model is set but 'pickscore' is not in metrics {list(self.metrics)}: "
                             "add pickscore to metrics (or drop preference_model); unused it would only cost memory")
        if "pickscore" in self.metrics and not self.preference_model:
            raise ValueError("metrics includes 'pickscore' but preference_model is not set (e.g. "
                             "yuvalkirstain/PickScore_v1 with preference_processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
        drift = [m for m in self.metrics if m in ("drift", "drift_dino")]
        token = self.generation.token
        if drift and token and all(TOKEN_PLACEHOLDER in p or token in p for p in self.generation.prompts):
            raise ValueError(f"metrics {drift} score the prompts without {TOKEN_PLACEHOLDER} against the base model's "
                             "images; every generation.prompts entry has the token: add prompts of things the "
                             "model already knows (e.g. the class prompt)")
        truth = [m for m in self.metrics if m in GROUND_TRUTH]
        if truth and not (self.checker and self.concept and self.generation.token):
            raise ValueError(f"metrics {truth} need `checker` (e.g. builtin:toyworld), `concept` (what the token "
                             "means to it, e.g. star) and generation.token (e.g. 'sks shape')")
        if truth and self.generation.token:
            with_token = [p for p in self.generation.prompts if TOKEN_PLACEHOLDER in p or self.generation.token in p]
            if "concept_rate" in truth and not with_token:
                raise ValueError(f"concept_rate needs prompts with {TOKEN_PLACEHOLDER}; generation.prompts has none")
            if "prior_kept" in truth and len(with_token) == len(self.generation.prompts):
                raise ValueError(f"prior_kept needs prompts without {TOKEN_PLACEHOLDER} (known concepts); "
                                 "every generation.prompts entry has the token")
        if self.weights is not None:
            stray = sorted(set(self.weights) - set(self.metrics))
            if stray:
                raise ValueError(f"weights: {stray} are not in metrics {list(self.metrics)}")
            if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
                raise ValueError(f"weights {self.weights} must be non-negative with a positive sum")
        return self

    def composite_weights(self) -> dict[str, float]:
        """The composite's weights (equal over the metrics unless set)."""
        return dict(self.weights) if self.weights is not None else {m: 1.0 for m in self.metrics}

    def reported(self) -> tuple[str, ...]:
        """Every score key an evaluation produces."""
        return (*self.metrics, COMPOSITE)


@dataclass
class EvalRecord:
    """One evaluation: images, aggregate ``scores`` (metrics + composite), per-image ``rows``."""

    images: list[GeneratedImage]
    scores: dict[str, float]
    rows: list[dict[str, Any]]
    generate_s: float
    score_s: float
    identity: dict[str, Any]
    # How the model sampled (``trainers.devices.sampled_placement``: device type, module dtypes,
    # autocast), read from the model itself: a trial's gains compare with the baseline of its key.
    placement: str = ""
    # The base model's run only (``as_base``): for each drift metric, each prompt-without-token
    # image's embedding by (prompt, seed), what the trials' drift compares with.
    base_embeddings: dict[str, dict[tuple[str, int], torch.Tensor]] = field(default_factory=dict)
    # ``run(..., defer_drift=True)`` only: this model's own drift embeddings, same layout; its drift
    # rows, drift scores and composite stay None until :func:`complete_drift` has the base model's.
    pending_drift: dict[str, dict[tuple[str, int], torch.Tensor]] = field(default_factory=dict)


class Evaluator:
    """Generate with fixed prompts/seeds and score; build once per worker, call per checkpoint.

    ``references`` are the images CLIP-I / DINO compare against (the training images at training
    resolution, ``load_references``); their embeddings are computed at the first evaluation and
    reused by every later one (``trainers.metrics.References``). ``device`` is where the scoring
    models run: the trial's device (``trainer.device``) or the baseline's, so on a GPU nothing
    is scored on the CPU. Scoring models come from per-process, per-device caches, so a second
    Evaluator (or evaluation) loads nothing.
    """

    def __init__(self, cfg: EvaluatorConfig, references: Sequence[Image.Image],
                 device: torch.device | str = "cpu") -> None:
        self.cfg, self.references = cfg, References(references)
        # ``reference_vae``: the references after the model's VAE, made at the first evaluation.
        # Every method keeps the base VAE frozen, so one round trip serves every checkpoint.
        self._vae_references: References | None = None
        self.device = torch.device(device)
        # {placement key: {drift metric: {(prompt, seed): the base model's embedding}}} (set_base)
        self.base: dict[str, dict[str, dict[tuple[str, int], torch.Tensor]]] = {}
        self.metrics = [get_metric(n, clip=cfg.clip, vision=cfg.vision_model, checker=cfg.checker,
                                   token=cfg.generation.token, concept=cfg.concept, device=self.device,
                                   preference=cfg.preference_model, preference_processor=cfg.preference_processor)
                        for n in cfg.metrics]
        needs_refs = [m.name for m in self.metrics if m.subject_only]
        if needs_refs and not self.references:
            raise ValueError(f"metrics {needs_refs} need reference images; none were found")

    def identity(self) -> dict[str, Any]:
        """What a score depends on besides the checkpoint: settings and scoring-model weights."""
        scorers = {m.scorer for m in self.metrics if m.scorer}
        out: dict[str, Any] = {"settings": self.cfg.model_dump(mode="json"), "references": len(self.references)}
        if "clip" in scorers:
            out["clip"] = scorer_identity("clip", self.cfg.clip, self.device)
        if "vision" in scorers and self.cfg.vision_model:
            out["vision"] = scorer_identity("vision", self.cfg.vision_model, self.device)
        if "preference" in scorers and self.cfg.preference_model:
            out["preference"] = scorer_identity("preference", self.cfg.preference_model, self.device,
                                                self.cfg.preference_processor)
        if "checker" in scorers and self.cfg.checker:
            out["checker"] = scorer_identity("checker", self.cfg.checker, self.device)
        return out

    def _subject_images(self, prompts: Sequence[str]) -> list[int]:
        """Indices of the images the reference metrics score: those of prompts with the token when
        only some prompts have it (see ``trainers.metrics``), else every image."""
        token = self.cfg.generation.token
        picked = [i for i, p in enumerate(prompts) if token and token in p]
        return picked if picked else list(range(len(prompts)))

    def set_base(self, base: dict[str, dict[str, dict[tuple[str, int], torch.Tensor]]]) -> None:
        """The base model's embeddings the drift metrics compare with, by sampling placement
        (what ``run(..., as_base=True)`` returned as ``base_embeddings`` at each placement)."""
        self.base = base

    def _prior_images(self, prompts: Sequence[str]) -> list[int]:
        """Indices of the images the drift metrics score: those of prompts without the token."""
        token = self.cfg.generation.token
        return [i for i, p in enumerate(prompts) if not (token and token in p)]

    def _drift(self, metric: Any, images: list[GeneratedImage], placement: str, as_base: bool,
               record: dict[str, dict[tuple[str, int], torch.Tensor]], defer: bool = False) -> MetricResult:
        """A drift metric over the images of prompts without the token: each one's embedding
        against the base model's at its prompt and seed (:func:`drift_values`). The base model
        (``as_base``) compares with itself; it and a ``defer`` run put their embeddings in
        ``record``; a deferred one is scored later (:func:`complete_drift`)."""
        picked = self._prior_images([g.prompt for g in images])
        own = dict(zip(((images[i].prompt, images[i].seed) for i in picked),
                       metric.embed([images[i].image for i in picked]).cpu()))
        if as_base or defer:
            record[metric.name] = own
        if defer:
            return MetricResult(float("nan"), (None,) * len(images))
        table = own if as_base else self.base.get(placement, {}).get(metric.name)
        values = drift_values(metric.name, own, table, placement, sorted(self.base))
        per_item: list[float | None] = [None] * len(images)
        for i in picked:
            per_item[i] = values[(images[i].prompt, images[i].seed)]
        return MetricResult(sum(values.values()) / len(values), tuple(per_item))

    def _references_for(self, model: BaseModel) -> References:
        if not self.cfg.reference_vae:
            return self.references
        if self._vae_references is None:
            self._vae_references = References(vae_round_trip(model.vae, self.references.images))
        return self._vae_references

    def _score(self, metric: Metric, pils: list[Image.Image], prompts: list[str],
               references: References | None = None) -> MetricResult:
        references = self.references if references is None else references
        if not metric.subject_only:
            return metric.score(pils, prompts, references)
        picked = self._subject_images(prompts)
        r = metric.score([pils[i] for i in picked], [prompts[i] for i in picked], references)
        per_item: list[float | None] = [None] * len(pils)
        for i, v in zip(picked, r.per_item):
            per_item[i] = v
        return MetricResult(r.value, tuple(per_item))

    def run(self, model: BaseModel, autocast_dtype: torch.dtype | None = None,
            prediction_type: str | None = None, as_base: bool = False, defer_drift: bool = False) -> EvalRecord:
        """Generate and score ``model`` as it is now (adapters included).

        ``autocast_dtype`` (bf16/fp16 on a GPU) matches a mixed-precision trainer's frozen weights;
        trials and the baseline both take it from ``trainers.devices.sampling_autocast``, so a
        gain over the baseline is never a precision shift. ``prediction_type`` is the trainer's
        (see :func:`generate`). ``as_base``: this is the base model; the drift metrics compare its
        images with themselves and return their embeddings (``EvalRecord.base_embeddings``) for
        :meth:`set_base`. ``defer_drift``: the base model's embeddings are not there yet (it is being
        drawn beside this model); the drift metrics return this model's embeddings instead
        (``EvalRecord.pending_drift``) and :func:`complete_drift` scores them once they are.
        """
        t0 = time.perf_counter()
        device = next(model.unet.parameters()).device
        use_autocast = autocast_dtype is not None  # CUDA, or a CPU bf16 run (torch.autocast has cpu bf16)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            images = generate(model, self.cfg.generation, prediction_type)
        t1 = time.perf_counter()
        pils, prompts = [g.image for g in images], [g.prompt for g in images]
        references = self._references_for(model)
        placement = sampled_placement(model, autocast_dtype)
        # Deferred only where something is pending: without a drift metric the record is complete.
        defer = defer_drift and not as_base and any(getattr(m, "prior_only", False) for m in self.metrics)
        embedded: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
        with shared_embeddings():  # each image embedded once per scorer, whichever metrics read it
            results = {m.name: (self._drift(m, images, placement, as_base, embedded, defer)
                                if getattr(m, "prior_only", False) else self._score(m, pils, prompts, references))
                       for m in self.metrics}
        scores: dict[str, float | None] = {name: r.value for name, r in results.items()}
        rows = [{"prompt": g.prompt, "seed": g.seed, **{n: r.per_item[i] for n, r in results.items()}}
                for i, g in enumerate(images)]
        if defer:
            scores.update({name: None for name in embedded})
        scores[COMPOSITE] = None if defer else composite(scores, self.cfg.composite_weights())
        return EvalRecord(images, scores, rows, t1 - t0, time.perf_counter() - t1, self.identity(),
                          placement, {} if defer else embedded, embedded if defer else {})


def complete_drift(scores: dict[str, Any], rows: list[dict[str, Any]],
                   pending: dict[str, dict[tuple[str, int], torch.Tensor]],
                   base: dict[str, dict[tuple[str, int], torch.Tensor]], weights: Mapping[str, float],
                   placement: str = "") -> None:
    """Score a deferred evaluation's drift (``Evaluator.run(..., defer_drift=True)``) in place:
    :func:`drift_values` of its pending embeddings against ``base`` (the base model's
    ``base_embeddings`` at the same sampling placement) into its rows, their mean into ``scores``,
    then the composite with ``weights``: what the run gives when the base model's are there."""
    for name, own in pending.items():
        values = drift_values(name, own, base.get(name), placement, [placement] if base else [])
        for row in rows:
            key = (row["prompt"], row["seed"])
            if key in values:
                row[name] = values[key]
        scores[name] = sum(values.values()) / len(values)
    scores[COMPOSITE] = composite({k: v for k, v in scores.items() if v is not None}, weights)


def load_references(cfg: EvaluatorConfig, data: DataConfig) -> list[Image.Image]:
    """Reference images: ``cfg.references`` if set, else the training images, as trained on
    (same resize and crop as the latent cache, no flip)."""
    ref_cfg = data if cfg.references is None else data.model_copy(update={"path": cfg.references})
    records = preflight(ref_cfg, require_captions=False)
    out = []
    for r in records:
        x = load_pixels(r, ref_cfg)
        out.append(Image.fromarray(x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()))
    return out


SCORES_FILE = "scores.json"
GRID_FILE = "grid.png"


def write_samples(record: EvalRecord, out_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write each image (``NN.png``), ``grid.png`` and ``scores.json`` into ``out_dir``.

    ``scores.json`` holds the aggregate scores, one row per image (file, prompt, seed, each
    metric), the timings and the evaluator identity, plus ``extra`` (e.g. the training step).
    Returns the path of ``scores.json``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (g, row) in enumerate(zip(record.images, record.rows)):
        name = f"{i:02d}.png"
        g.image.save(out_dir / name)
        rows.append({"file": name, **row})
    columns = len(record.identity["settings"]["generation"]["seeds"])
    image_grid([g.image for g in record.images], columns).save(out_dir / GRID_FILE)
    info = {**(extra or {}), "scores": record.scores, "rows": rows, "grid": GRID_FILE,
            "generate_s": record.generate_s, "score_s": record.score_s, "identity": record.identity,
            "placement": record.placement}
    path = out_dir / SCORES_FILE
    atomic_write_text(path, json.dumps(info, indent=1))
    return path


@dataclass(frozen=True)
class EvalResult:
    """Generated images and each metric's result, keyed by metric name."""

    images: list[GeneratedImage]
    scores: dict[str, MetricResult]


def evaluate(
    model: BaseModel,
    settings: EvalSettings,
    metrics: Sequence[str] = ("clip_t",),
    references: Sequence[Image.Image] | None = None,
    clip: str = DEFAULT_CLIP,
) -> EvalResult:
    """Generate with ``settings`` and score with each named metric (all using CLIP ``clip``)."""
    scorers = [get_metric(n, clip=clip) for n in metrics]  # unknown names fail before generating
    images = generate(model, settings)
    pils = [g.image for g in images]
    prompts = [g.prompt for g in images]
    return EvalResult(images, {m.name: m.score(pils, prompts, references) for m in scorers})
