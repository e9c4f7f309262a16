"""Load the models the evaluator scores with: a CLIP, and any transformers vision backbone.

Both accept the same specs as base models where that makes sense: a built-in tiny model
(``builtin:tiny-clip``, ``builtin:tiny-vit``, ``builtin:toyworld`` for the toy world's CLIP), a local directory in the transformers layout, or a
Hugging Face Hub id. Safetensors only (unpickling can run code). The image processor is always
transformers' PIL backend: the default backend needs torchvision (not installable beside our
torch), and one backend everywhere keeps scores comparable across machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
)

# transformers' weight names only: CLIP/DINO repos also carry open_clip/flax/tf copies.
_HUB_PATTERNS = ["*.json", "*.txt", "model.safetensors", "model-*.safetensors"]


def _resolve(spec: str, what: str) -> Path:
    """The local directory of scoring model ``spec`` (built-in, directory or Hub snapshot)."""
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_dir(spec, what)
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    if _HUB_ID.match(spec):
        return _hub_snapshot(spec, None, _HUB_PATTERNS, what=what)
    builtins = " or ".join(BUILTIN_PREFIX + n for n in BUILTIN_ROLES[what])
    raise ModelLoadError(f"{what} {spec!r}: not {builtins}, an existing directory or a Hub id 'org/name'")


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


def load_clip(spec: str) -> tuple[CLIPModel, PreTrainedTokenizerBase, Any]:
    """Load ``(CLIPModel, tokenizer, image processor)`` for scoring, in eval mode."""
    root = _resolve(spec, "CLIP model")
    _require_safetensors(root, spec, "CLIP model", "CLIPModel")
    model = _guard(
        f"CLIP model {root}",
        lambda: CLIPModel.from_pretrained(root, use_safetensors=True, local_files_only=True),
    )
    tokenizer = _guard(f"CLIP tokenizer {root}", lambda: AutoTokenizer.from_pretrained(root, local_files_only=True))
    processor = _guard(
        f"CLIP image processor {root}",
        lambda: AutoImageProcessor.from_pretrained(root, backend="pil", local_files_only=True),
    )
    model.eval()
    return model, tokenizer, processor


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
