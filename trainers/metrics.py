"""Image metrics the evaluator scores checkpoints with, and the scoring models behind them.

Every metric implements the interface of DESIGN.md ("New metric"): ``name``,
``higher_is_better``, ``scale`` and ``score(images, prompts, references)``; one line in
:data:`METRICS` registers it. Shipped metrics:

* ``clip_t`` -- prompt-image alignment, torchmetrics' CLIPScore definition (x100, 0..100).
* ``clip_i`` -- similarity of generated to reference (training) images in CLIP image space,
  DreamBooth's subject-fidelity metric (a cosine).
* ``dino`` -- the same with any transformers vision backbone (DreamBooth's DINO metric uses a
  self-supervised ViT-S/16: unlike CLIP it is not trained to ignore appearance details, so it
  separates subjects of one class better).
* ``concept_rate`` / ``prior_kept`` -- ground truth where a judge exists (the toy world's
  checker, docs/TOYWORLD.md): the share of concept-prompt images drawn right with the token read
  as the concept, and the share of the other prompts' images still drawn right.

When some prompts carry the concept token and some do not, the reference metrics (``clip_i``,
``dino``) score only the images of prompts with the token: those are the images that should
look like the references. An image of "a red circle" is meant not to look like the subject,
and scoring it against the subject would reward a model that forgets everything else.

``composite`` (:func:`composite`) is the weighted mean of metrics on one scale (each value times
its ``scale``, so CLIP-T's x100 is undone and every term is a cosine). Scoring models load once
per process (:func:`get_clip`, :func:`get_vision_model`), with a weights fingerprint that is
stored beside every score (:func:`scorer_identity`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from PIL import Image

from trainers.models import module_fingerprint
from trainers.scoring_models import load_clip, load_vision_model

# The CLIP most text-to-image papers (and torchmetrics' CLIPScore default) score with. Needs the
# Hub or a local copy; tests and the demo use builtin:tiny-clip.
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
COMPOSITE = "composite"

# --------------------------------------------------------------------------------------------
# Scoring models, loaded once per process
# --------------------------------------------------------------------------------------------

_CLIP_CACHE: dict[str, tuple[Any, Any, Any]] = {}
_VISION_CACHE: dict[str, tuple[Any, Any]] = {}
_CHECKER_CACHE: dict[str, Any] = {}
_FINGERPRINTS: dict[tuple[str, str], str] = {}
_CLIP_LOCK = threading.Lock()


def get_clip(spec: str = DEFAULT_CLIP) -> tuple[Any, Any, Any]:
    """``(CLIPModel, tokenizer, image processor)`` for ``spec``, loaded on first use and cached.

    A sweep evaluates every few hundred steps; ViT-L/14 takes seconds to load (1.7 GB), so it is
    loaded once per process. The cached model is shared: do not train or move it.
    """
    with _CLIP_LOCK:
        if spec not in _CLIP_CACHE:
            _CLIP_CACHE[spec] = load_clip(spec)
        return _CLIP_CACHE[spec]


def get_vision_model(spec: str) -> tuple[Any, Any]:
    """``(vision model, image processor)`` for ``spec``, loaded on first use and cached."""
    with _CLIP_LOCK:
        if spec not in _VISION_CACHE:
            _VISION_CACHE[spec] = load_vision_model(spec)
        return _VISION_CACHE[spec]


def get_checker(spec: str) -> Any:
    """The ground-truth checker ``spec`` (``builtin:toyworld`` or a checker directory), cached."""
    with _CLIP_LOCK:
        if spec not in _CHECKER_CACHE:
            _CHECKER_CACHE[spec] = load_checker_spec(spec)
        return _CHECKER_CACHE[spec]


def load_checker_spec(spec: str) -> Any:
    """Load a checker: ``builtin:toyworld`` (the shipped one) or a directory ``save_checker`` wrote."""
    from trainers.models import BUILTIN_PREFIX, ModelLoadError, shipped_dir
    from trainers.toyworld.checker import CONFIG_NAME, load_checker

    if spec == BUILTIN_PREFIX + "toyworld":
        return load_checker(shipped_dir("toyworld") / "checker")
    root = Path(spec).expanduser()
    if not (root / CONFIG_NAME).is_file():
        raise ModelLoadError(f"checker {spec!r}: not builtin:toyworld nor a directory holding {CONFIG_NAME} "
                             "and checker.safetensors (trainers.toyworld.checker.save_checker writes one)")
    return load_checker(root)


def clear_clip_cache() -> None:
    """Drop every cached scoring model (frees memory; the next ``get_*`` reloads)."""
    with _CLIP_LOCK:
        _CLIP_CACHE.clear()
        _VISION_CACHE.clear()
        _CHECKER_CACHE.clear()
        _FINGERPRINTS.clear()


def scorer_identity(kind: str, spec: str) -> dict[str, str]:
    """``{"spec", "weights_sha256"}`` of a scoring model (``kind`` "clip", "vision" or "checker").

    The fingerprint hashes every weight (``module_fingerprint``), so two scores are comparable
    only if their scorer identities are equal, whatever path or Hub id named the model.
    """
    key = (kind, spec)
    if key not in _FINGERPRINTS:
        if kind == "checker":
            model = get_checker(spec)
        else:
            model = get_clip(spec)[0] if kind == "clip" else get_vision_model(spec)[0]
        _FINGERPRINTS[key] = module_fingerprint(model)
    return {"spec": spec, "weights_sha256": _FINGERPRINTS[key]}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def image_embeddings(spec: str, images: Sequence[Image.Image], chunk: int = 32) -> torch.Tensor:
    """Projected CLIP image embeddings (not normalised), one row per image, float32 on CPU."""
    model, _, processor = get_clip(spec)
    rows = []
    for i in range(0, len(images), chunk):
        pixels = processor(images=list(images[i : i + chunk]), return_tensors="pt")["pixel_values"]
        # transformers 5: the projected embedding is the output object's pooler_output.
        rows.append(model.get_image_features(pixel_values=pixels.to(_device(model))).pooler_output.float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def text_embeddings(spec: str, texts: Sequence[str]) -> torch.Tensor:
    """Projected CLIP text embeddings (not normalised), tokenized exactly as torchmetrics does.

    torchmetrics pads to the longest prompt and, for prompts over the model's
    ``max_position_embeddings``, slices ids and mask to that length (it does not use the
    tokenizer's truncation); we copy that so scores match its CLIPScore.
    """
    model, tokenizer, _ = get_clip(spec)
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    limit = int(model.config.text_config.max_position_embeddings)
    ids, mask = enc["input_ids"][..., :limit], enc["attention_mask"][..., :limit]
    dev = _device(model)
    return model.get_text_features(input_ids=ids.to(dev), attention_mask=mask.to(dev)).pooler_output.float().cpu()


@torch.no_grad()
def vision_embeddings(spec: str, images: Sequence[Image.Image], chunk: int = 32) -> torch.Tensor:
    """One embedding per image from a vision backbone, float32 on CPU.

    A transformer's class token of the last hidden state (what DINO's paper and DreamBooth's
    DINO metric use); for a backbone without a token sequence (a ConvNet), its pooled output.
    """
    model, processor = get_vision_model(spec)
    rows = []
    for i in range(0, len(images), chunk):
        pixels = processor(images=list(images[i : i + chunk]), return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pixels.to(_device(model)))
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is not None and hidden.dim() == 3:
            emb = hidden[:, 0]
        elif getattr(out, "pooler_output", None) is not None:
            emb = out.pooler_output.flatten(1)
        else:
            raise ValueError(f"vision model {spec!r} ({type(model).__name__}) returns neither a token "
                             "sequence nor a pooled output; use a ViT/DINO-style backbone")
        rows.append(emb.float().cpu())
    return torch.cat(rows)


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
    """The metric interface (DESIGN.md "New metric"): register the class in ``METRICS``.

    ``scale`` maps a value onto the composite's common scale (a cosine-like 0..1 range),
    ``scorer`` names the scoring model a value depends on (``"clip"``, ``"vision"``,
    ``"checker"`` or ``None``), and ``subject_only`` says the metric compares images with the
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
    """Shared by every metric: which scoring models to use (loaded once per process).

    Every metric class takes the same keywords, so the evaluator builds any registered metric
    the same way; a metric uses the models it needs. ``token`` is the concept token of the
    prompts (``{token}``'s value) and ``concept`` what it means in the judge's vocabulary.
    """

    name: str
    higher_is_better = True
    scale = 1.0
    scorer: str | None = "clip"
    subject_only = False

    def __init__(self, clip: str = DEFAULT_CLIP, vision: str | None = None, checker: str | None = None,
                 token: str | None = None, concept: str | None = None) -> None:
        self.clip, self.vision, self.checker, self.token, self.concept = clip, vision, checker, token, concept


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
        img = _normalize(image_embeddings(self.clip, images))
        txt = _normalize(text_embeddings(self.clip, prompts))
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
        gen = _normalize(image_embeddings(self.clip, images))
        ref = _normalize(image_embeddings(self.clip, references))
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
        gen = _normalize(vision_embeddings(self.vision, images))
        ref = _normalize(vision_embeddings(self.vision, references))
        per_item = (gen @ ref.T).mean(dim=1)
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
                 token: str | None = None, concept: str | None = None) -> None:
        if not checker or not token or not concept:
            raise ValueError(f"metric {self.name!r} needs evaluation.images.checker (e.g. builtin:toyworld), "
                             "generation.token (e.g. 'sks shape') and evaluation.images.concept (what the token "
                             "means to the checker, e.g. 'star')")
        super().__init__(clip, vision, checker, token, concept)

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
        verdicts = judge(get_checker(self.checker), [images[i] for i in picked], texts)
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


# Plain dict registry (DESIGN.md): one line per metric.
METRICS: dict[str, type] = {
    "clip_t": ClipTScore,
    "clip_i": ClipIScore,
    "dino": DinoScore,
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


