"""What a base-model spec says without loading its weights: where its configs and tokenizer are,
its native resolution, its tokenizer alone.

Found the way :func:`trainers.models.load_base_model` finds the model (the same built-in
directories, diffusers directories, single-file configs and Hub snapshots), so a sweep file can be
completed and checked (``data.resolution``'s default, textual inversion's placeholder) before
anything loads: reading a few JSON files and a tokenizer takes well under a second where loading
SD 1.5's weights takes many.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainers.errors import ModelLoadError
from trainers.models import (
    _CONFIG_PATTERNS,
    _HUB_ID,
    ACCEPTED_FORMS,
    BUILTIN_PREFIX,
    PICKLE_SUFFIXES,
    _guard,
    _hub_snapshot,
    _offline,
    _single_file_config_dir,
    builtin_dir,
)


def config_dir(spec: Any) -> Path:
    """The local diffusers-layout directory holding the configs and tokenizer of the base model
    ``spec`` (a ``ModelSpec``): a built-in's directory, a diffusers directory, a single file's
    ``model.single_file_config`` (inferred from the file's safetensors header when online without
    one, as the loader infers it from the keys), or a Hub id's configs (fetched alone when online,
    else from the local Hugging Face cache). No weights are read."""
    source = spec.source
    if source.startswith(BUILTIN_PREFIX):
        return builtin_dir(source, "base model")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: directory has no model_index.json, so it is not a diffusers pipeline "
                                 f"(save one with pipe.save_pretrained(dir)). Accepted forms: {ACCEPTED_FORMS}")
        return path
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or suffix in PICKLE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such checkpoint file")
        config = spec.single_file_config
        if config is None and not _offline():
            config = _inferred_config(path)
        return _single_file_config_dir(path, config)
    if path.exists():
        raise ModelLoadError(f"{path}: unsupported file type {suffix!r}. Accepted forms: {ACCEPTED_FORMS}")
    if _HUB_ID.match(source):
        return _hub_snapshot(source, spec.revision, _CONFIG_PATTERNS, what="model")
    raise ModelLoadError(f"model {source!r}: no such file or directory, and not a Hub id. "
                         f"Accepted forms: {ACCEPTED_FORMS}")


class _Shape:
    """A stand-in for a tensor that has only its ``shape`` (all architecture inference reads)."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)


def header_shapes(path: Path) -> dict[str, _Shape]:
    """``{tensor name: an object with its .shape}`` from a safetensors file's JSON header alone
    (8 bytes of length, then the header): names and shapes, none of the weights."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: _Shape(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _inferred_config(path: Path) -> str:
    """The Hub id of ``path``'s architecture, from diffusers' own inference (what the loader
    uses online without ``single_file_config``) run on the header's names and shapes."""
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: a pickle checkpoint's architecture cannot be read without loading it; set "
                             "model.single_file_config to a diffusers directory or Hub id of the same architecture")
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    shapes = _guard(f"{path}: not a readable safetensors file", lambda: header_shapes(path))
    inferred = _guard(f"{path}: cannot infer its architecture", lambda: fetch_diffusers_config(shapes))
    return str(inferred["pretrained_model_name_or_path"])


def native_resolution_of(unet_config: Any, vae_config: Any, where: str = "the model") -> int:
    """The image side a Stable Diffusion model was trained at, which diffusers' pipelines draw by
    default: the UNet's ``sample_size`` (latent pixels) times the VAE's scale factor
    ``2 ** (len(block_out_channels) - 1)``."""
    try:
        return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: unet/config.json sample_size or vae/config.json block_out_channels is "
                             f"missing or not a number ({type(e).__name__}: {e})") from None


def native_resolution(spec: Any) -> int:
    """The native resolution (:func:`native_resolution_of`) of the base model ``spec`` (a
    ``ModelSpec``), from its ``unet/`` and ``vae/`` configs: 512 for SD 1.5, 64 for
    ``builtin:tiny-sd``, 32 for ``builtin:toyworld``. ``data.resolution`` defaults to it."""
    root = config_dir(spec)
    configs = []
    for sub in ("unet", "vae"):
        path = root / sub / "config.json"
        configs.append(_guard(str(path), lambda: json.loads(path.read_text(encoding="utf-8"))))
    return native_resolution_of(*configs, where=f"model {spec.source!r} ({root})")


def load_tokenizer(spec: Any) -> Any:
    """The tokenizer of the base model ``spec`` alone, from the files :func:`load_base_model` gives
    the model its tokenizer from: checks that need only the tokenizer load no weights."""
    from transformers import CLIPTokenizer

    root = config_dir(spec)
    return _guard(f"{root}/tokenizer",
                  lambda: CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True))
