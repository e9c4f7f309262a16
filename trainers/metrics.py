"""Image metrics the evaluator scores checkpoints with, and the scoring models behind them.

Every metric implements the interface of docs/ARCHITECTURE.md ("Extension points"): ``name``,
``higher_is_better``, ``scale`` and ``score(images, prompts, references)``; one line in
:data:`METRICS` registers it. Shipped metrics:

* ``clip_t`` -- prompt-image alignment, torchmetrics' CLIPScore definition (x100, 0..100).
* ``clip_i`` -- similarity of generated to reference (training) images in CLIP image space,
  DreamBooth's subject-fidelity metric (a cosine).
* ``dino`` -- the same with any transformers vision backbone (DreamBooth's DINO metric uses a
  self-supervised ViT-S/16: unlike CLIP it is not trained to ignore appearance details, so it
  separates subjects of one class better).
* ``drift`` / ``drift_dino`` -- for prompts without the concept token, the cosine of each image
  with the base model's image at the same prompt and seed (CLIP image space / the vision
  backbone's); 1 = unchanged. What prior preservation protects, measured without a judge.
* ``pickscore`` -- human preference for each image given its prompt (PickScore, a CLIP fine-tuned
  on people's choices; optional, needs ``preference_model``).
* ``concept_rate`` / ``prior_kept`` -- ground truth where a judge exists (the toy world's
  checker, docs/TOYWORLD.md): the share of concept-prompt images drawn right with the token read
  as the concept, and the share of the other prompts' images still drawn right.

When some prompts carry the concept token and some do not, the reference metrics (``clip_i``,
``dino``) score only the images of prompts with the token: those are the images that should
look like the references. An image of "a red circle" is meant not to look like the subject,
and scoring it against the subject would reward a model that forgets everything else.

``composite`` (:func:`composite`) is the weighted mean of metrics on one scale (each value times
its ``scale``, so CLIP-T's x100 is undone and every term is a cosine). Scoring models load once
per process and device, in fp32 on the device they are asked for (the trial's; :func:`get_clip`,
:func:`get_vision_model`, :func:`get_checker`), with a weights fingerprint that is stored beside
every score (:func:`scorer_identity`). Reference images passed as :class:`References` keep their
embeddings, so an evaluator embeds its references once, not at every evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
from PIL import Image

from trainers.metric_modes import COMPOSITE  # defined light: the results readers rank by it without torch
# The scoring models and their embeddings live in trainers.scoring_models; re-exported here
# because callers (and the metric interface of docs/ARCHITECTURE.md) know them as trainers.metrics.*.
from trainers.scoring_models import (  # noqa: F401 - re-exports
    DEFAULT_CLIP,
    PREFERENCE,
    Device,
    References,
    clear_clip_cache,
    get_checker,
    get_clip,
    get_vision_model,
    image_embeddings,
    load_checker_spec,
    reference_embeddings,
    scorer_identity,
    shared_embeddings,
    text_embeddings,
    vision_embeddings,
)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # Plain division by the L2 norm, as torchmetrics does (not F.normalize's eps clamp), so the
    # arithmetic matches operation for operation.
    return x / x.norm(p=2, dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricResult:
    """A metric's aggregate ``value`` and its per-image scores (same order as the images; ``None``
    for an image the metric does not score, e.g. a prior prompt's image for ``concept_rate``)."""

    value: float
    per_item: tuple[float | None, ...]


class Metric(Protocol):
    """The metric interface (docs/ARCHITECTURE.md, "Extension points"): register the class in ``METRICS``.

    ``scale`` maps a value onto the composite's common scale (a cosine-like 0..1 range),
    ``scorer`` names the scoring model a value depends on (``"clip"``, ``"vision"``,
    ``"preference"``, ``"checker"`` or ``None``), and ``subject_only`` says the metric compares images with the
    references, so only the images of prompts with the concept token are meant for it.
    """

    name: str
    higher_is_better: bool
    scale: float
    scorer: str | None
    subject_only: bool

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None
    ) -> MetricResult:
        """Score ``images`` (generated from ``prompts``) against optional ``references``."""
        ...


class _ClipMetric:
    """Shared by every metric: which scoring models to use (loaded once per process and device).

    Every metric class takes the same keywords, so the evaluator builds any registered metric
    the same way; a metric uses the models it needs, on ``device``. ``token`` is the concept token of the
    prompts (``{token}``'s value) and ``concept`` what it means in the judge's vocabulary.
    """

    name: str
    higher_is_better = True
    scale = 1.0
    scorer: str | None = "clip"
    subject_only = False
    prior_only = False  # scores only the prompts without the token, against the base model's images

    def __init__(self, clip: str = DEFAULT_CLIP, vision: str | None = None, checker: str | None = None,
                 token: str | None = None, concept: str | None = None, device: Device = None,
                 preference: str | None = None, preference_processor: str | None = None) -> None:
        self.clip, self.vision, self.checker, self.token, self.concept = clip, vision, checker, token, concept
        self.preference, self.preference_processor = preference, preference_processor
        self.device = torch.device(device or "cpu")  # where the scoring models run (the trial's)


class ClipTScore(_ClipMetric):
    """CLIP-T: torchmetrics' CLIPScore, ``max(mean_i 100 * cos(E_img_i, E_text_i), 0)``.

    Range [0, 100]. ``per_item`` holds the unclamped ``100 * cos`` per image, as torchmetrics
    accumulates them; only the mean is clamped at 0 (torchmetrics ``CLIPScore.compute``).
    With ``concept`` set, the token in each prompt is replaced by it before scoring ("a red sks
    shape ..." is scored as "a red star ..."): the scoring CLIP has never seen the token, so the
    text it can judge is the class the token stands for.
    """

    name = "clip_t"
    scale = 0.01  # x100 undone: the composite adds cosines

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None = None
    ) -> MetricResult:
        """Score each image against its own prompt (``prompts[i]`` for ``images[i]``)."""
        if len(images) != len(prompts) or not images:
            raise ValueError(f"clip_t needs one prompt per image; got {len(images)} images, {len(prompts)} prompts")
        if self.token and self.concept:  # the CLIP never saw the token: score what it stands for
            prompts = [p.replace(self.token, self.concept) for p in prompts]
        img = _normalize(image_embeddings(self.clip, images, device=self.device))
        txt = _normalize(text_embeddings(self.clip, prompts, device=self.device))
        per_item = 100 * (img * txt).sum(dim=-1)
        value = torch.clamp(per_item.mean(), min=0.0)
        return MetricResult(float(value), tuple(float(v) for v in per_item))


class ClipIScore(_ClipMetric):
    """CLIP-I: mean cosine similarity of each generated image to every reference image.

    DreamBooth's subject-fidelity metric (Ruiz et al. 2023, sec. 4.1: "average pairwise cosine
    similarity between CLIP embeddings of generated and real images"), reported as a plain cosine
    in [-1, 1] (their tables read e.g. 0.803), not x100 and not clamped: this keeps the number
    comparable with the paper. ``per_item[i]`` is image i's mean over the references.
    """

    name = "clip_i"
    subject_only = True

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None = None
    ) -> MetricResult:
        """Score ``images`` against ``references`` (the training images); prompts are unused."""
        if not references:
            raise ValueError("clip_i needs reference images (the training images); none were given")
        if not images:
            raise ValueError("clip_i needs at least one generated image")
        gen = _normalize(image_embeddings(self.clip, images, device=self.device))
        ref = _normalize(reference_embeddings(references, ("clip", self.clip, str(self.device)),
                                              lambda refs: image_embeddings(self.clip, refs, device=self.device)))
        per_item = (gen @ ref.T).mean(dim=1)
        return MetricResult(float(per_item.mean()), tuple(float(v) for v in per_item))


class DinoScore(_ClipMetric):
    """DINO-style subject fidelity: mean cosine of each generated image's backbone embedding to
    every reference image's (DreamBooth sec. 4.1 with a DINO ViT-S/16; any backbone here).

    Needs ``vision`` (a transformers vision model spec); range [-1, 1] like ``clip_i``.
    """

    name = "dino"
    scorer = "vision"
    subject_only = True

    def __init__(self, clip: str = DEFAULT_CLIP, vision: str | None = None, **kwargs: Any) -> None:
        if not vision:
            raise ValueError("metric 'dino' needs a vision model: set evaluation.images.vision_model "
                             "(e.g. facebook/dino-vits16, or builtin:tiny-vit for tests)")
        super().__init__(clip, vision, **kwargs)

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None = None
    ) -> MetricResult:
        """Score ``images`` against ``references``; prompts are unused."""
        if not references or not images:
            raise ValueError("dino needs generated images and reference images (the training images)")
        assert self.vision is not None
        vision = self.vision
        gen = _normalize(vision_embeddings(vision, images, device=self.device))
        ref = _normalize(reference_embeddings(references, ("vision", vision, str(self.device)),
                                              lambda refs: vision_embeddings(vision, refs, device=self.device)))
        per_item = (gen @ ref.T).mean(dim=1)
        return MetricResult(float(per_item.mean()), tuple(float(v) for v in per_item))


def drift_values(name: str, own: Mapping[Any, torch.Tensor],
                 table: Mapping[Any, torch.Tensor] | None, placement: str,
                 have: Sequence[str]) -> dict[Any, float]:
    """Drift per image: the cosine of each unit-norm embedding in ``own`` with the base model's at
    the same (prompt, seed) in ``table`` (None: the base model has none at ``placement``; ``have``
    names the placements it has). Every drift score, in a trial, in the baseline and deferred in
    the confirmation, is computed here."""
    if table is None:
        raise ValueError(f"{name}: no base-model embeddings for sampling placement {placement!r} "
                         f"(have: {list(have)}); the sweep's baseline makes them")
    missing = [k for k in own if k not in table]
    if missing:
        raise ValueError(f"{name}: the base model has no image at (prompt, seed) {missing[:3]}; "
                         "its baseline was made with other evaluation prompts or seeds")
    return {k: float((e.float() * table[k].float()).sum()) for k, e in own.items()}


class DriftScore(_ClipMetric):
    """Drift: how far the images of prompts *without* the concept token moved away from what the
    base model draws for them, which is what prior preservation protects. ``per_item[i]`` is the
    cosine between image i's embedding and the base model's image at the same prompt and seed (on
    the same sampling placement); the value is their mean: 1 = drawn as the base model draws it.

    ``base`` holds the base model's embeddings, one per scored image, in order
    (``trainers.evaluate.Evaluator`` looks them up by prompt and seed). Needs no judge, so a real
    sweep computes it. ``drift`` embeds with the CLIP image tower, ``drift_dino`` with the vision
    backbone (``vision_model``). Validated against the toy world's checker in docs/BENCHMARKS.md.
    """

    name = "drift"
    prior_only = True

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings in this metric's space."""
        return _normalize(image_embeddings(self.clip, images, device=self.device))

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None = None,
        base: torch.Tensor | None = None,
    ) -> MetricResult:
        """Score ``images`` against the base model's embeddings ``base`` (same order)."""
        if base is None or len(base) != len(images) or not images:
            raise ValueError(f"{self.name} needs the base model's embedding of each image's prompt and seed "
                             f"({len(images)} images, {0 if base is None else len(base)} base embeddings)")
        values = drift_values(self.name, dict(enumerate(self.embed(images).cpu())), dict(enumerate(base)), "", [])
        per_item = [values[i] for i in range(len(images))]
        return MetricResult(sum(per_item) / len(per_item), tuple(per_item))


class DriftDinoScore(DriftScore):
    """``drift_dino``: :class:`DriftScore` in the vision backbone's space (``vision_model``)."""

    name = "drift_dino"
    scorer = "vision"

    def __init__(self, clip: str = DEFAULT_CLIP, vision: str | None = None, **kwargs: Any) -> None:
        if not vision:
            raise ValueError("metric 'drift_dino' needs a vision model: set evaluation.images.vision_model "
                             "(e.g. facebook/dinov2-base, or builtin:tiny-vit for tests)")
        super().__init__(clip, vision, **kwargs)

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        assert self.vision is not None
        return _normalize(vision_embeddings(self.vision, images, device=self.device))


class PickScore(_ClipMetric):
    """``pickscore``: a human-preference score of each image for its prompt (Kirstain et al. 2023,
    "Pick-a-Pic"): a CLIP fine-tuned on people's choices between images of one prompt, scoring
    ``exp(logit_scale) * cos(E_img, E_text)`` as the authors' code does (PickScore_v1's scale is
    100, so values read like CLIP-T's; ``scale`` 0.01 puts them on the composite's cosine scale).

    The model is ``preference`` (e.g. ``yuvalkirstain/PickScore_v1``, a CLIP-H in transformers),
    its tokenizer and image processor read from ``preference_processor`` instead of its own folder
    when set (PickScore_v1's folder has none; its authors use ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s). Prompts are
    tokenized as the authors do (padding, truncation at 77 tokens), and the token is replaced by
    ``concept`` when one is set, as for ``clip_t``. Scores every image; a preference model judges
    how well an image answers its prompt, not whether it shows the subject.
    """

    name = "pickscore"
    scale = 0.01
    scorer = "preference"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.preference:
            raise ValueError("metric 'pickscore' needs a preference model: set evaluation.images.preference_model "
                             "(e.g. yuvalkirstain/PickScore_v1 with preference_processor "
                             "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")

    @torch.no_grad()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None = None
    ) -> MetricResult:
        """Score each image against its own prompt (``prompts[i]`` for ``images[i]``)."""
        if len(images) != len(prompts) or not images:
            raise ValueError(f"pickscore needs one prompt per image; got {len(images)} images, {len(prompts)} prompts")
        if self.token and self.concept:
            prompts = [p.replace(self.token, self.concept) for p in prompts]
        where = dict(device=self.device, processor_spec=self.preference_processor, what=PREFERENCE)
        img = image_embeddings(self.preference, images, **where)
        txt = text_embeddings(self.preference, prompts, truncate=True, **where)
        model = get_clip(self.preference, self.device, self.preference_processor, PREFERENCE)[0]
        scale = float(model.logit_scale.exp())
        per_item = scale * (_normalize(img) * _normalize(txt)).sum(dim=-1)
        return MetricResult(float(per_item.mean()), tuple(float(v) for v in per_item))


class _TruthRate(_ClipMetric):
    """Ground truth from a judge (the toy world's checker): the share of images drawn right.

    An image is right when the checker sees the shape, colour and background its prompt asks
    for, with the concept token read as ``concept`` ("a red sks shape on a blue background" asks
    for a red star on blue). Range [0, 1]; ``per_item`` is 1.0/0.0 per judged image, ``None``
    for the images this rate does not judge.
    """

    scorer = "checker"
    concept_prompts: bool  # True: judge the prompts with the token; False: those without

    def __init__(self, clip: str = DEFAULT_CLIP, vision: str | None = None, checker: str | None = None,
                 token: str | None = None, concept: str | None = None, device: Device = None,
                 **kwargs: Any) -> None:
        if not checker or not token or not concept:
            raise ValueError(f"metric {self.name!r} needs evaluation.images.checker (e.g. builtin:toyworld), "
                             "generation.token (e.g. 'sks shape') and evaluation.images.concept (what the token "
                             "means to the checker, e.g. 'star')")
        super().__init__(clip, vision, checker, token, concept, device, **kwargs)

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image] | None = None
    ) -> MetricResult:
        """Judge the images of the prompts this rate is about; references are unused."""
        from trainers.toyworld.checker import judge

        assert self.checker and self.token and self.concept
        if len(images) != len(prompts):
            raise ValueError(f"{self.name} needs one prompt per image; got {len(images)} images, {len(prompts)} prompts")
        picked = [i for i, p in enumerate(prompts) if (self.token in p) == self.concept_prompts]
        if not picked:
            which = "contain" if self.concept_prompts else "lack"
            raise ValueError(f"{self.name}: no evaluation prompt {which}s the token {self.token!r}; add such "
                             f"prompts to evaluation.images.generation.prompts")
        texts = [prompts[i].replace(self.token, self.concept) for i in picked]
        verdicts = judge(get_checker(self.checker, self.device), [images[i] for i in picked], texts)
        per_item: list[float | None] = [None] * len(images)
        for i, v in zip(picked, verdicts):
            per_item[i] = 1.0 if v.correct else 0.0
        return MetricResult(sum(v.correct for v in verdicts) / len(verdicts), tuple(per_item))


class ConceptRate(_TruthRate):
    """``concept_rate``: the share of the concept prompts' images the checker finds right."""

    name = "concept_rate"
    concept_prompts = True


class PriorKept(_TruthRate):
    """``prior_kept``: the share of the other prompts' images (known concepts) still drawn right."""

    name = "prior_kept"
    concept_prompts = False


# Plain dict registry (docs/ARCHITECTURE.md): one line per metric.
METRICS: dict[str, type] = {
    "clip_t": ClipTScore,
    "clip_i": ClipIScore,
    "dino": DinoScore,
    "drift": DriftScore,
    "drift_dino": DriftDinoScore,
    "pickscore": PickScore,
    "concept_rate": ConceptRate,
    "prior_kept": PriorKept,
}
# Metrics that need a ground-truth judge (evaluation.images.checker).
GROUND_TRUTH = ("concept_rate", "prior_kept")


def get_metric(name: str, **kwargs: Any) -> Metric:
    """An instance of metric ``name``; an unknown name lists the valid ones."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; valid metrics: {', '.join(sorted(METRICS))}")
    metric: Metric = METRICS[name](**kwargs)
    return metric


def composite(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean of metric values on one scale: ``sum w_k s_k v_k / sum w_k``.

    ``s_k`` is metric k's ``scale`` (CLIP-T's 0..100 becomes a cosine like CLIP-I's and DINO's).
    A metric missing from ``values`` is an error, never silently a zero.
    """
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"composite weights {dict(weights)} must be non-negative with a positive sum")
    missing = sorted(set(weights) - set(values))
    if missing:
        raise KeyError(f"composite needs {missing}, which were not scored; scored: {sorted(values)}")
    total = sum(weights.values())
    return sum(w * METRICS[k].scale * float(values[k]) for k, w in weights.items()) / total


