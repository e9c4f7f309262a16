"""Content-addressed latent (and text-embedding) cache.

Every image is VAE-encoded once per (image bytes, VAE weights, preprocessing) and the result is
reused by every step of every trial. What is stored is the VAE's latent *distribution* (mean and
std), not one sample, so each epoch can draw a fresh sample as the reference scripts do when they
call ``latent_dist.sample()`` every step. With flip augmentation the flipped image is encoded too
(the VAE is not flip-equivariant, so flipping the latent would be an approximation).

Layout under ``<root>`` (default ``cache_root()/"latents"``)::

    entries/<k[:2]>/<k>.safetensors     one image: mean, std (+ flip_mean, flip_std)
    text/<k[:2]>/<k>.safetensors         one caption: the frozen text encoder's hidden states
    manifests/<dataset_key>.json         image id -> entry key and caption -> text key

Entry key = sha256 of (image bytes hash, VAE identity, resolution, crop, flip, dtype, scaling and
shift factors, format version): change one image and only that image is re-encoded; change the VAE
or the resolution and all are. Every file is written atomically (temp file + ``os.replace``) and
carries its key and a sha256 of its tensor bytes in the safetensors metadata, so a truncated or
corrupt file is detected on load and rebuilt instead of being read as valid.

Latents are addressed by image id (never by step), so shuffling cannot misalign them with their
captions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from trainers import progress
from trainers.data import DataConfig, ImageRecord, load_pixels
from trainers.devices import ENCODE_DTYPE, place
from trainers.paths import cache_root
from trainers.tensor_files import atomic_save_safetensors, atomic_write_text, tensors_digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def load_verified(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """Load a cache file if it is complete and is the entry for ``key``; None if missing or bad."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        log.warning("latent cache: %s is unreadable (%s); rebuilding it", path, err)
        return None
    if meta.get("key") != key or meta.get("digest") != tensors_digest(tensors):
        log.warning("latent cache: %s failed verification; rebuilding it", path)
        return None
    return tensors


@dataclass(frozen=True)
class CacheSettings:
    """Everything besides the image bytes that determines a latent."""

    vae_identity: str
    resolution: int
    center_crop: bool
    random_flip: bool
    dtype: str
    scaling_factor: float
    shift_factor: float

    def entry_key(self, image_sha256: str) -> str:
        return _sha({"v": FORMAT_VERSION, "image": image_sha256, **self.__dict__})


@dataclass
class BuildReport:
    """What a cache build did; ``images_encoded`` counts VAE encodes (flipped copies included)."""

    images_encoded: int = 0
    entries_reused: int = 0
    entries_rebuilt: int = 0
    texts_encoded: int = 0
    texts_reused: int = 0
    encode_device: str = "cpu"  # where the VAE and text encoder ran (a GPU task: its GPU)


@dataclass
class CachedDataset:
    """The whole cached dataset in memory: what every trial trains from.

    Plain tensors and strings, so it pickles cheaply into Ray's object store. ``caption_index[i]``
    points image ``i`` at its row of ``text_embeds`` (identical captions share one row).
    """

    key: str
    ids: list[str]
    captions: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    flip_mean: torch.Tensor | None
    flip_std: torch.Tensor | None
    scaling_factor: float
    shift_factor: float
    text_embeds: torch.Tensor | None
    caption_index: torch.Tensor
    settings: CacheSettings
    report: BuildReport = field(default_factory=BuildReport)

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> "CachedDataset":
        """The first ``n`` images (in id order): a trial that uses fewer class images than were
        cached (DreamBooth's ``num_class_images`` searched below the largest value)."""
        if n >= len(self):
            return self
        cut = slice(0, n)
        return dataclasses.replace(
            self, key=f"{self.key}:head{n}", ids=self.ids[cut], captions=self.captions[cut], mean=self.mean[cut],
            std=self.std[cut], flip_mean=None if self.flip_mean is None else self.flip_mean[cut],
            flip_std=None if self.flip_std is None else self.flip_std[cut], caption_index=self.caption_index[cut])

    def sample_latents(self, idx: torch.Tensor, flip: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Draw fresh latents for images ``idx`` (flipped where ``flip``), scaled for the UNet."""
        mean, std = self.mean[idx], self.std[idx]
        if self.flip_mean is not None and bool(flip.any()):
            f = flip.view(-1, 1, 1, 1)
            mean = torch.where(f, self.flip_mean[idx], mean)
            std = torch.where(f, self.flip_std[idx], std)  # type: ignore[index]
        eps = torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
        return ((mean + std * eps).float() - self.shift_factor) * self.scaling_factor


def _encode(vae: torch.nn.Module, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(pixels.to(p.device, p.dtype)).latent_dist
    return dist.mean.to("cpu", dtype), dist.std.to("cpu", dtype)


def _build_entries(
    todo: list[tuple[ImageRecord, str, Path]],
    vae: torch.nn.Module,
    data_cfg: DataConfig,
    settings: CacheSettings,
    batch_size: int,
    report: BuildReport,
) -> None:
    """Encode the images in ``todo`` (batched) and write one verified entry file each."""
    dtype = _DTYPES[settings.dtype]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        views = [False, True] if settings.random_flip else [False]
        out: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        for flip in views:
            pixels = torch.stack([load_pixels(rec, data_cfg, flip=flip) for rec, _, _ in chunk])
            out[flip] = _encode(vae, pixels, dtype)
            report.images_encoded += len(chunk)
        for i, (rec, key, path) in enumerate(chunk):
            tensors = {"mean": out[False][0][i].clone(), "std": out[False][1][i].clone()}
            if settings.random_flip:
                tensors["flip_mean"] = out[True][0][i].clone()
                tensors["flip_std"] = out[True][1][i].clone()
            meta = {"key": key, "digest": tensors_digest(tensors), "image_id": rec.id,
                    "image_sha256": rec.sha256, "producer": "sdsweep.trainers.latents",
                    "settings": json.dumps(settings.__dict__, sort_keys=True)}
            atomic_save_safetensors(tensors, path, meta)
        progress.advance("encode", min(start + batch_size, len(todo)), len(todo))


def _text_embeddings(
    captions: list[str], text_encoder: torch.nn.Module, tokenizer, text_identity: str,
    root: Path, report: BuildReport,
) -> tuple[torch.Tensor, list[str]]:
    """Cached frozen-text-encoder hidden states for each unique caption, in ``captions`` order."""
    rows: list[torch.Tensor] = []
    for cap in captions:
        key = _sha({"v": FORMAT_VERSION, "caption": cap, "text_encoder": text_identity,
                    "max_length": tokenizer.model_max_length})
        path = root / "text" / key[:2] / f"{key}.safetensors"
        cached = load_verified(path, key)
        if cached is None:
            hidden = encode_prompts(text_encoder, tokenizer, [cap])[0].to("cpu", torch.float32)
            tensors = {"hidden": hidden}
            atomic_save_safetensors(tensors, path, {"key": key, "digest": tensors_digest(tensors),
                                                    "caption": cap, "producer": "sdsweep.trainers.latents"})
            report.texts_encoded += 1
            rows.append(hidden)
        else:
            report.texts_reused += 1
            rows.append(cached["hidden"])
    return torch.stack(rows), captions


def encode_prompts(text_encoder: torch.nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Text-encoder last hidden states for ``prompts`` padded to the tokenizer's max length (as SD)."""
    ids = tokenize(tokenizer, prompts)
    p = next(text_encoder.parameters())
    with torch.no_grad():
        return text_encoder(ids.to(p.device))[0]


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to ``model_max_length``, the way SD's pipelines tokenize."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def cache_settings(vae: torch.nn.Module, vae_identity: str, data_cfg: DataConfig, dtype: str) -> CacheSettings:
    """The non-image inputs of every entry key for this VAE and preprocessing."""
    if dtype not in _DTYPES:
        raise ValueError(f"latent cache dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    cfg = vae.config
    return CacheSettings(
        vae_identity=vae_identity, resolution=data_cfg.resolution, center_crop=data_cfg.center_crop,
        random_flip=data_cfg.random_flip, dtype=dtype,
        scaling_factor=float(cfg.scaling_factor),
        shift_factor=float(getattr(cfg, "shift_factor", None) or 0.0),
    )


def dataset_key(
    records: Iterable[ImageRecord], data_cfg: DataConfig, model, *, cache_text: bool = True, dtype: str = "float32"
) -> str:
    """The content key ``build_latent_cache`` gives this dataset, computed without encoding
    anything (image hashes, VAE/text identities and preprocessing only): a resumed sweep
    compares it with the key it started with before any encode."""
    records = sorted(records, key=lambda r: r.id)
    settings = cache_settings(model.vae, model.vae_identity, data_cfg, dtype)
    return _dataset_key(records, settings, model.text_encoder_identity if cache_text else None)


def _dataset_key(records: list[ImageRecord], settings: CacheSettings, text_identity: str | None) -> str:
    entry_keys = {r.id: settings.entry_key(r.sha256) for r in records}
    return _sha({"entries": entry_keys, "captions": [r.caption for r in records], "text": text_identity})


def build_latent_cache(
    records: Iterable[ImageRecord],
    data_cfg: DataConfig,
    model,
    *,
    root: Path | None = None,
    cache_text: bool = True,
    dtype: str = "float32",
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> CachedDataset:
    """Encode what is missing, reuse what is cached, and return the dataset in memory.

    ``model`` is a :class:`trainers.models.BaseModel`. With ``cache_text`` the frozen text
    encoder's outputs are cached as well (turn it off when the text encoder is trained).

    The VAE (and, with ``cache_text``, the text encoder) is put on ``device`` (default: where the
    VAE already is) in fp32 and left there: an entry's key does not name the compute dtype, so
    every entry is encoded in fp32 (``trainers.devices.ENCODE_DTYPE``; ``dtype`` is only how
    the result is stored).
    """
    records = sorted(records, key=lambda r: r.id)
    if not records:
        raise ValueError("build_latent_cache: the dataset has no images")
    root = Path(root) if root is not None else cache_root() / "latents"
    device = torch.device(device) if device is not None else next(model.vae.parameters()).device
    place(model.vae, device, ENCODE_DTYPE)
    if cache_text:
        place(model.text_encoder, device, ENCODE_DTYPE)
    settings = cache_settings(model.vae, model.vae_identity, data_cfg, dtype)
    report = BuildReport(encode_device=str(next(model.vae.parameters()).device))
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    todo: list[tuple[ImageRecord, str, Path]] = []
    for rec in records:
        key = settings.entry_key(rec.sha256)
        path = root / "entries" / key[:2] / f"{key}.safetensors"
        cached = load_verified(path, key)
        if cached is None:
            if path.exists():
                report.entries_rebuilt += 1
            todo.append((rec, key, path))
        else:
            report.entries_reused += 1
            loaded[rec.id] = cached
    if todo:
        _build_entries(todo, model.vae, data_cfg, settings, batch_size, report)
        for rec, key, path in todo:
            tensors = load_verified(path, key)
            if tensors is None:  # pragma: no cover - only if the disk lies to us
                raise RuntimeError(f"latent cache: {path} did not verify right after writing it")
            loaded[rec.id] = tensors
    return _assemble(records, loaded, settings, model, root, cache_text, report)


def _assemble(
    records: list[ImageRecord], loaded: dict[str, dict[str, torch.Tensor]], settings: CacheSettings,
    model, root: Path, cache_text: bool, report: BuildReport,
) -> CachedDataset:
    """Stack entries in id order, attach text embeddings, write the manifest."""
    ids = [r.id for r in records]
    captions = [r.caption for r in records]
    unique = sorted(set(captions))
    caption_index = torch.tensor([unique.index(c) for c in captions], dtype=torch.long)
    text_embeds = None
    if cache_text:
        text_embeds, _ = _text_embeddings(unique, model.text_encoder, model.tokenizer,
                                          model.text_encoder_identity, root, report)
    stack = lambda name: torch.stack([loaded[i][name] for i in ids])  # noqa: E731
    entry_keys = {r.id: settings.entry_key(r.sha256) for r in records}
    key = _dataset_key(records, settings, model.text_encoder_identity if cache_text else None)
    manifest = {"format_version": FORMAT_VERSION, "dataset_key": key, "settings": settings.__dict__,
                "images": [{"id": r.id, "entry": entry_keys[r.id], "caption": r.caption} for r in records]}
    atomic_write_text(root / "manifests" / f"{key}.json", json.dumps(manifest, indent=1, sort_keys=True))
    return CachedDataset(
        key=key, ids=ids, captions=captions, mean=stack("mean"), std=stack("std"),
        flip_mean=stack("flip_mean") if settings.random_flip else None,
        flip_std=stack("flip_std") if settings.random_flip else None,
        scaling_factor=settings.scaling_factor, shift_factor=settings.shift_factor,
        text_embeds=text_embeds, caption_index=caption_index, settings=settings, report=report,
    )
