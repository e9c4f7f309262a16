"""The models the evaluator scores with (a CLIP, any transformers vision backbone, the toy
world's checker): loading, the per-process and per-device caches, and their embeddings.

Both accept the same specs as base models where that makes sense: a built-in tiny model
(``builtin:tiny-clip``, ``builtin:tiny-vit``, ``builtin:toyworld`` for the toy world's CLIP), a local directory in the transformers layout, or a
Hugging Face Hub id. Safetensors only (unpickling can run code). The image processor is always
transformers' PIL backend: the default backend needs torchvision (not installable beside our
torch), and one backend everywhere keeps scores comparable across machines.

Scoring models run in fp32 on the device they are asked for (a trial's GPU), without autocast,
so a score depends on the images only, never on the trial's precision (trainers/devices.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel, PreTrainedTokenizerBase

from trainers.models import (
    _HUB_ID,
    BUILTIN_PREFIX,
    PICKLE_SUFFIXES,
    ModelLoadError,
    PickleRefusedError,
    _guard,
    _hub_snapshot,
    BUILTIN_ROLES,
    builtin_dir,
    module_fingerprint,
)
from trainers.devices import SCORING_DTYPE, place

# The CLIP most text-to-image papers (and torchmetrics' CLIPScore default) score with. Needs the
# Hub or a local copy; tests and the demo use builtin:tiny-clip.
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# The optional human-preference scorer (PickScore), as errors name it: by its sweep-file key.
PREFERENCE = "preference_model"

# transformers' weight names only: CLIP/DINO repos also carry open_clip/flax/tf copies.
_HUB_PATTERNS = ["*.json", "*.txt", "model.safetensors", "model-*.safetensors"]
_CONFIG_ONLY = ["*.json", "*.txt"]  # a tokenizer and image processor without the weights beside them


def _resolve(spec: str, what: str, patterns: list[str] = _HUB_PATTERNS) -> Path:
    """The local directory of scoring model ``spec`` (built-in, directory or Hub snapshot of the
    files ``patterns`` match)."""
    if spec.startswith(BUILTIN_PREFIX) and what in BUILTIN_ROLES:
        return builtin_dir(spec, what)
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    if _HUB_ID.match(spec):
        return _hub_snapshot(spec, None, patterns, what=what)
    builtins = "".join(BUILTIN_PREFIX + n + " or " for n in BUILTIN_ROLES.get(what, ()))
    raise ModelLoadError(f"{what} {spec!r}: not {builtins}an existing directory or a Hub id 'org/name'")


def _require_safetensors(root: Path, spec: str, what: str, cls: str) -> None:
    if any(root.glob("*.safetensors")):
        return
    if any(p.suffix in PICKLE_SUFFIXES for p in root.iterdir()):
        raise PickleRefusedError(
            f"{what} {spec!r} ({root}) has only pickle weights; the evaluator reads .safetensors "
            f"only (unpickling can run code). Convert it once where you trust the file: "
            f"{cls}.from_pretrained(dir, use_safetensors=False).save_pretrained(new_dir)."
        )
    raise ModelLoadError(f"{what} {spec!r} ({root}): no *.safetensors weights found")


def load_clip(spec: str, processor: str | None = None,
              what: str = "CLIP model") -> tuple[CLIPModel, PreTrainedTokenizerBase, Any]:
    """Load ``(CLIPModel, tokenizer, image processor)`` for scoring, in eval mode.

    ``processor``: where the tokenizer and image processor come from instead of the model's own
    folder (PickScore's repo holds weights only; its authors score with the tokenizer and
    processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); only its config files are fetched.
    """
    root = _resolve(spec, what)
    _require_safetensors(root, spec, what, "CLIPModel")
    model = _guard(
        f"{what} {root}",
        lambda: CLIPModel.from_pretrained(root, use_safetensors=True, local_files_only=True),
    )
    text_root = root if processor is None else _resolve(processor, f"{what} processor", _CONFIG_ONLY)
    tokenizer = _guard(f"{what} tokenizer {text_root}",
                       lambda: AutoTokenizer.from_pretrained(text_root, local_files_only=True))
    image_processor = _guard(
        f"{what} image processor {text_root}",
        lambda: AutoImageProcessor.from_pretrained(text_root, backend="pil", local_files_only=True),
    )
    model.eval()
    return model, tokenizer, image_processor


def load_vision_model(spec: str) -> tuple[Any, Any]:
    """Load ``(vision model, image processor)`` for the DINO-style metric, in eval mode.

    Any transformers vision backbone ``AutoModel`` resolves (DINO/DINOv2 ViTs, CLIP vision
    towers, ConvNeXt, ...); ``trainers.metrics.vision_embeddings`` says which output is used.
    """
    root = _resolve(spec, "vision model")
    _require_safetensors(root, spec, "vision model", "AutoModel")
    model = _guard(
        f"vision model {root}", lambda: AutoModel.from_pretrained(root, use_safetensors=True, local_files_only=True)
    )
    processor = _guard(
        f"vision model image processor {root}",
        lambda: AutoImageProcessor.from_pretrained(root, backend="pil", local_files_only=True),
    )
    model.eval()
    return model, processor


# --------------------------------------------------------------------------------------------
# Scoring models, loaded once per process and device; their embeddings
# --------------------------------------------------------------------------------------------

Device = torch.device | str | None  # None: the CPU
_CLIP_CACHE: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}
_VISION_CACHE: dict[tuple[str, str], tuple[Any, Any]] = {}
_CHECKER_CACHE: dict[tuple[str, str], Any] = {}
_FINGERPRINTS: dict[tuple[str, str], str] = {}
_CLIP_LOCK = threading.Lock()


def _key(spec: str, device: Device) -> tuple[str, str]:
    return spec, str(torch.device(device or "cpu"))


def _on_device(model: torch.nn.Module, device: Device) -> torch.nn.Module:
    # Loaded on the CPU, then moved once: ``Module.to`` replaces each tensor in place, so no CPU
    # copy stays behind. fp32 always: a score must not depend on the trial's precision.
    place(model, torch.device(device or "cpu"), SCORING_DTYPE)
    return model


def get_clip(spec: str = DEFAULT_CLIP, device: Device = None, processor: str | None = None,
             what: str = "CLIP model") -> tuple[Any, Any, Any]:
    """``(CLIPModel, tokenizer, image processor)`` for ``spec`` on ``device``, loaded on first use
    (``processor``: see :func:`load_clip`).

    A sweep evaluates every few hundred steps; ViT-L/14 takes seconds to load (1.7 GB), so it is
    loaded once per process and device (the trial's GPU in a GPU sweep). The cached model is
    shared: do not train or move it.
    """
    with _CLIP_LOCK:
        key = (*_key(spec, device), processor or "", what)
        if key not in _CLIP_CACHE:
            model, tokenizer, image_processor = load_clip(spec, processor, what)
            _CLIP_CACHE[key] = (_on_device(model, device), tokenizer, image_processor)
        return _CLIP_CACHE[key]


def get_vision_model(spec: str, device: Device = None) -> tuple[Any, Any]:
    """``(vision model, image processor)`` for ``spec`` on ``device``, loaded on first use."""
    with _CLIP_LOCK:
        key = _key(spec, device)
        if key not in _VISION_CACHE:
            model, processor = load_vision_model(spec)
            _VISION_CACHE[key] = (_on_device(model, device), processor)
        return _VISION_CACHE[key]


def get_checker(spec: str, device: Device = None) -> Any:
    """The ground-truth checker ``spec`` (``builtin:toyworld`` or a checker directory) on ``device``."""
    with _CLIP_LOCK:
        key = _key(spec, device)
        if key not in _CHECKER_CACHE:
            _CHECKER_CACHE[key] = _on_device(load_checker_spec(spec), device)
        return _CHECKER_CACHE[key]


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


def scorer_identity(kind: str, spec: str, device: Device = None, processor: str | None = None) -> dict[str, str]:
    """``{"spec", "weights_sha256"}`` of a scoring model (``kind`` "clip", "vision", "preference"
    -- a CLIP-architecture preference model whose tokenizer and image processor may come from
    ``processor`` -- or "checker").

    The fingerprint hashes every weight (``module_fingerprint``), so two scores are comparable
    only if their scorer identities are equal, whatever path or Hub id named the model. It is
    taken from the copy on ``device`` (the one that scores; the weights are fp32 everywhere).
    """
    key = (kind, spec)
    if key not in _FINGERPRINTS:
        if kind == "checker":
            model = get_checker(spec, device)
        elif kind == "preference":
            model = get_clip(spec, device, processor, PREFERENCE)[0]
        else:
            model = get_clip(spec, device)[0] if kind == "clip" else get_vision_model(spec, device)[0]
        _FINGERPRINTS[key] = module_fingerprint(model)
    out = {"spec": spec, "weights_sha256": _FINGERPRINTS[key]}
    if processor:
        out["processor"] = processor
    return out


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# Within ``shared_embeddings()``: {(scorer kind, spec, device, id(image)): (image, embedding)}.
_SHARED: contextvars.ContextVar[dict[tuple[str, str, str, int], tuple[Image.Image, torch.Tensor]] | None] = (
    contextvars.ContextVar("sdsweep_shared_embeddings", default=None))


@contextlib.contextmanager
def shared_embeddings() -> Any:
    """Within the block, each image is embedded once per scoring model: metrics that read the same
    generated images (CLIP-T all of them, CLIP-I the subject's, drift the others') share the
    embeddings instead of each running the scorer again. The evaluator scores one evaluation in
    one block; the cache holds the images it keyed, so an id is never reused inside it."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _embed_shared(kind: str, spec: str, device: Device, images: Sequence[Image.Image],
                  compute: Callable[[list[Image.Image]], torch.Tensor]) -> torch.Tensor:
    """``compute(images)``, reusing within ``shared_embeddings()`` the rows of images already embedded."""
    memo = _SHARED.get()
    if memo is None:
        return compute(list(images))
    keys = [(kind, spec, str(torch.device(device or "cpu")), id(im)) for im in images]
    todo = list({k: im for k, im in zip(keys, images) if k not in memo}.items())
    if todo:
        for (k, im), row in zip(todo, compute([im for _, im in todo])):
            memo[k] = (im, row)
    return torch.stack([memo[k][1] for k in keys])


@torch.no_grad()
def image_embeddings(spec: str, images: Sequence[Image.Image], chunk: int = 32, device: Device = None,
                     processor_spec: str | None = None, what: str = "CLIP model") -> torch.Tensor:
    """Projected CLIP image embeddings (not normalised), one row per image, float32 on CPU
    (``processor_spec``, ``what``: see :func:`get_clip`)."""
    model, _, processor = get_clip(spec, device, processor_spec, what)

    def compute(todo: list[Image.Image]) -> torch.Tensor:
        rows = []
        for i in range(0, len(todo), chunk):
            pixels = processor(images=todo[i : i + chunk], return_tensors="pt")["pixel_values"]
            # transformers 5: the projected embedding is the output object's pooler_output.
            rows.append(model.get_image_features(pixel_values=pixels.to(_device(model))).pooler_output.float().cpu())
        return torch.cat(rows)

    return _embed_shared(f"{what}|{processor_spec or ''}", spec, device, images, compute)


@torch.no_grad()
def text_embeddings(spec: str, texts: Sequence[str], device: Device = None, processor_spec: str | None = None,
                    what: str = "CLIP model", truncate: bool = False) -> torch.Tensor:
    """Projected CLIP text embeddings (not normalised), tokenized exactly as torchmetrics does.

    torchmetrics pads to the longest prompt and, for prompts over the model's
    ``max_position_embeddings``, slices ids and mask to that length (it does not use the
    tokenizer's truncation); we copy that so scores match its CLIPScore. ``truncate``: the
    tokenizer's own truncation at that length instead (it keeps the end-of-text token; PickScore's
    authors tokenize so). ``processor_spec``, ``what``: see :func:`get_clip`.
    """
    model, tokenizer, _ = get_clip(spec, device, processor_spec, what)
    limit = int(model.config.text_config.max_position_embeddings)
    enc = tokenizer(list(texts), padding=True, truncation=truncate, max_length=limit if truncate else None,
                    return_tensors="pt")
    ids, mask = enc["input_ids"][..., :limit], enc["attention_mask"][..., :limit]
    dev = _device(model)
    return model.get_text_features(input_ids=ids.to(dev), attention_mask=mask.to(dev)).pooler_output.float().cpu()


@torch.no_grad()
def vision_embeddings(spec: str, images: Sequence[Image.Image], chunk: int = 32,
                      device: Device = None) -> torch.Tensor:
    """One embedding per image from a vision backbone, float32 on CPU.

    A transformer's class token of the last hidden state (what DINO's paper and DreamBooth's
    DINO metric use); for a backbone without a token sequence (a ConvNet), its pooled output.
    """
    model, processor = get_vision_model(spec, device)

    def compute(todo: list[Image.Image]) -> torch.Tensor:
        rows = []
        for i in range(0, len(todo), chunk):
            pixels = processor(images=todo[i : i + chunk], return_tensors="pt")["pixel_values"]
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

    return _embed_shared("vision", spec, device, images, compute)


class References(SequenceABC):
    """Reference images that remember their embeddings: computed once per scorer and reused.

    The evaluator scores every checkpoint against the same references; recomputing their
    embeddings at every evaluation would cost as much as embedding the generated images again.
    A plain list works wherever a ``References`` does (embeddings are then computed per call).
    """

    def __init__(self, images: Sequence[Image.Image]) -> None:
        self.images = tuple(images)
        self._embeddings: dict[tuple[str, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: Any) -> Any:
        return self.images[i]

    def embeddings(self, key: tuple[str, ...], compute: Callable[[list[Image.Image]], torch.Tensor]) -> torch.Tensor:
        """``compute(images)``, computed on the first call for ``key`` and cached."""
        if key not in self._embeddings:
            self._embeddings[key] = compute(list(self.images))
        return self._embeddings[key]


def reference_embeddings(references: Sequence[Image.Image], key: tuple[str, ...],
                         compute: Callable[[list[Image.Image]], torch.Tensor]) -> torch.Tensor:
    """Embeddings of ``references``: cached when they are :class:`References`, else computed."""
    if isinstance(references, References):
        return references.embeddings(key, compute)
    return compute(list(references))
