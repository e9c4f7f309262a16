"""Image-folder datasets: captions, a CPU preflight of every file, pixel loading.

The generated demo dataset lives in :mod:`trainers.demo_data`.

Layout: images sit at the TOP LEVEL of one folder (no recursion; a subfolder is reported, not
skipped). Image extensions: .png .jpg .jpeg .webp .bmp (any case). Hidden files are ignored.

Caption sources (``DataConfig.caption_source``):

- ``txt``: kohya sidecars, ``img.png`` + ``img.txt`` (``caption_extension``), text stripped.
- ``metadata``: diffusers imagefolder ``metadata.jsonl``, one ``{"file_name", "text"}`` object a
  line. Bad JSON, entries naming missing files and duplicate entries are problems (line number).
- ``instance``: every image gets ``instance_prompt`` (DreamBooth).
- ``auto`` (precedence): ``metadata.jsonl`` if present, else ``.txt`` sidecars if any exist, else
  ``instance_prompt`` if given, else no captions. When metadata.jsonl AND sidecars both give a
  caption for one image and the texts differ, that is a problem: we never silently pick one.

Mode policy (docs/ARCHITECTURE.md rule 1: never silently "fix" input): RGB is used as is; grayscale ``L``
and bilevel ``1`` are accepted because their RGB conversion is unambiguous (R=G=B). CMYK,
16-bit/float (``I;16*``, ``I``, ``F``), palette (``P``) and alpha (``RGBA``, ``LA``, ``PA``,
``RGBa``) images are refused unless ``convert_modes: true``; then alpha (and palette
transparency) is composited over white, CMYK is converted by PIL's naive formula, and
``I;16``/``I``/``F`` values are read as 16-bit (0..65535), clipped, and divided by 257.

Preflight opens every image once (bytes read once, hashed, fully decoded) and raises one
``DatasetError`` listing every problem with its fix, so a sweep never dies on file 9000.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.errors import DatasetError as DatasetError, Problem as Problem  # re-exported (defined light)
from trainers.paths import LOCAL_PATH, cache_root, materialize_dir

# Extension -> the format PIL must detect in the bytes (a mismatch is a lying extension).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
FORMAT_EXTENSION = {fmt: ext for ext, fmt in IMAGE_FORMATS.items() if ext != ".jpeg"}
METADATA_FILE = "metadata.jsonl"
ACCEPTED_MODES = frozenset({"RGB", "L", "1"})
CONVERTIBLE_MODES = frozenset(
    {"CMYK", "P", "PA", "RGBA", "RGBa", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
)
TOYSTAR_NAME = "toystar-v1"  # the toy world's star (trainers/toyworld/concept.py)
TOYTRIANGLE_NAME = "toytriangle-v1"  # a drawable toy-world shape under the token's name
DEMO_NAME = "demo-v1"  # bump when the demo drawing changes, so old materialized copies are not reused
_EXIF_ORIENTATION = 0x0112


class DataConfig(BaseModel):
    """Where the images are and how they become training pixels (frozen after validation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1, json_schema_extra=LOCAL_PATH)  # a folder, or "builtin:demo"
    # Training side length in pixels. Required here; in a run config (RunConfig, a sweep's base)
    # it defaults to the base model's native resolution (trainers/model_configs.py).
    resolution: int
    # True: resize the short side to `resolution`, crop the centre. False: same resize, crop the
    # top-left. diffusers' scripts crop at random instead; we need a deterministic crop because
    # the latent cache encodes each image once.
    center_crop: bool = True
    random_flip: bool = False  # horizontal flip augmentation; the latent cache stores the flip
    caption_source: Literal["auto", "txt", "metadata", "instance"] = "auto"
    instance_prompt: str | None = None
    caption_extension: str = ".txt"
    convert_modes: bool = False  # opt in to converting CMYK/16-bit/palette/alpha images to RGB
    # Held-out validation images for val_loss (never trained on): a share of `path`'s images,
    # picked by a hash of each file name (independent of listing order), or a separate folder.
    validation_split: float = Field(0.0, ge=0.0, lt=1.0)
    validation_path: str | None = Field(None, json_schema_extra=LOCAL_PATH)

    @property
    def has_validation(self) -> bool:
        """Whether val_loss is measured on images the model never trains on."""
        return self.validation_split > 0 or self.validation_path is not None

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.validation_split > 0 and self.validation_path is not None:
            raise ValueError("set validation_split or validation_path, not both")
        # SD's VAE downsamples by 8, so the latent side is resolution / 8.
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        ext = self.caption_extension
        if not ext.startswith(".") or len(ext) < 2 or ext.lower() in IMAGE_FORMATS or ext == ".jsonl":
            raise ValueError(f"caption_extension must look like '.txt' (not an image ext), got {ext!r}")
        prompt = (self.instance_prompt or "").strip()
        if self.caption_source == "instance" and not prompt:
            raise ValueError("instance_prompt is required (non-empty) when caption_source is 'instance'")
        if self.instance_prompt is not None and self.caption_source in ("txt", "metadata"):
            raise ValueError(
                f"instance_prompt is unused when caption_source is {self.caption_source!r}: "
                "remove it or set caption_source to 'instance' or 'auto'"
            )
        return self


@dataclass(frozen=True)
class ImageRecord:
    """One validated image. ``id`` (posix path relative to the folder) keys the latent cache."""

    id: str
    path: Path
    caption: str
    sha256: str
    width: int  # after EXIF orientation
    height: int


def _builtin_datasets() -> dict[str, tuple[str, Callable[[Path], Any]]]:
    """``{name: (cache folder, writer)}`` of the built-in datasets (imported on use)."""
    from trainers.demo_data import write_demo_dataset
    from trainers.toyworld.concept import write_star_dataset, write_triangle_dataset

    return {"builtin:demo": (DEMO_NAME, write_demo_dataset), "builtin:toystar": (TOYSTAR_NAME, write_star_dataset),
            "builtin:toytriangle": (TOYTRIANGLE_NAME, write_triangle_dataset)}


def resolve_data_path(path: str) -> Path:
    """Turn ``data.path`` into a folder: a built-in dataset is materialized once in the cache."""
    if path.startswith("builtin:"):
        datasets = _builtin_datasets()
        if path not in datasets:
            valid = ", ".join(datasets)
            raise DatasetError(path, [Problem(path, f"data.path: unknown builtin dataset; valid: {valid}")])
        name, writer = datasets[path]
        return materialize_dir(cache_root() / "builtin" / name, writer)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(path, [Problem(path, f"data.path {what}: point data.path at a folder of images")])
    return folder


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Force PIL to raise on truncated files (the global may have been flipped by other code)."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _mode_reason(mode: str, convert_modes: bool) -> str | None:
    """Why an image of ``mode`` cannot be used under the mode policy, or None if it can."""
    if mode in ACCEPTED_MODES or (convert_modes and mode in CONVERTIBLE_MODES):
        return None
    if mode in CONVERTIBLE_MODES:
        return (f"unsupported mode {mode} (CMYK, 16-bit, palette and alpha are not RGB): re-save it as "
                "8-bit RGB, or set data.convert_modes: true to convert it")
    return f"unsupported mode {mode}: re-save it as 8-bit RGB"


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation; orientations 5-8 rotate by 90 degrees (EXIF 2.32, tag 274)."""
    w, h = img.size
    return (h, w) if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def _identify(data: bytes) -> str | None:
    """The format PIL reads in a file's header (no pixel decode), or None if it is not an image."""
    try:
        return Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - any failure to parse a header means "not an image"
        return None


def _inspect_image(path: Path, cfg: DataConfig) -> tuple[str, int, int] | list[Problem]:
    """Read, hash and fully decode one image: ``(sha256, width, height)`` or its problems."""
    where = str(path)
    try:
        data = path.read_bytes()
    except PermissionError:
        return [Problem(where, "unreadable (permission denied): fix its permissions, e.g. chmod a+r")]
    except OSError as e:
        return [Problem(where, f"unreadable ({e.strerror or e}): fix or remove the file")]
    if not data:
        return [Problem(where, "empty file (0 bytes): re-export the image or remove it")]
    problems: list[Problem] = []
    with _strict_truncation():
        try:
            # Only our formats are decoded: others (EPS runs Ghostscript) are identified, never loaded.
            img = Image.open(io.BytesIO(data), formats=list(FORMAT_EXTENSION))
        except UnidentifiedImageError:
            fmt = _identify(data)
            if fmt is None:
                return [Problem(where, "not an image (PIL cannot identify its bytes): re-export it or remove it")]
            return [Problem(where, f"contents are {fmt}, which is not supported: convert it to PNG")]
        except Image.DecompressionBombError as e:
            return [Problem(where, f"too large to decode safely ({e}): downscale it")]
        ext, fmt = path.suffix.lower(), img.format or "unknown"
        if fmt != IMAGE_FORMATS[ext]:
            problems.append(Problem(where, f"extension lies: the contents are {fmt} but it is named {ext}: "
                                           f"rename it to {FORMAT_EXTENSION[fmt]}"))
        try:
            img.load()  # full decode: Image.open only parses the header
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            return problems + [Problem(where, f"truncated or corrupt ({e}): re-export the image or remove it")]
    mode_reason = _mode_reason(img.mode, cfg.convert_modes)
    if mode_reason:
        problems.append(Problem(where, mode_reason))
    width, height = _oriented_size(img)
    if min(width, height) < cfg.resolution:
        problems.append(Problem(where, f"{width}x{height} is smaller than data.resolution {cfg.resolution} "
                                       "(we never upscale): use a larger image, lower data.resolution, "
                                       "or remove it"))
    return problems or (hashlib.sha256(data).hexdigest(), width, height)


def _read_metadata(folder: Path, images: set[str]) -> tuple[dict[str, str], list[Problem]]:
    """Parse ``metadata.jsonl``: captions by file name, and a problem per bad line."""
    meta = folder / METADATA_FILE
    where = str(meta)
    captions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    problems: list[Problem] = []
    try:
        lines = meta.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return {}, [Problem(where, f"unreadable ({e}): fix it (UTF-8 JSON lines) or remove it")]

    def bad(reason: str) -> None:
        problems.append(Problem(where, f"line {n}: {reason}"))

    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no entry
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"not valid JSON ({e.msg}): fix or remove the line")
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                and isinstance(entry.get("text"), str)):
            bad('needs string "file_name" and "text" keys: fix the line')
            continue
        name = posixpath.normpath(entry["file_name"])
        if "/" in name:
            bad(f"{name!r} is in a subfolder (top level only): move the image up or remove the line")
        elif name not in images:
            bad(f"names {name!r}, which is not an image in the folder: add the image or remove the line")
        elif name in captions:
            bad(f"duplicate entry for {name!r} (first on line {first_line[name]}): keep one")
        else:
            captions[name], first_line[name] = entry["text"].strip(), n
    return captions, problems


def _read_sidecars(folder: Path, images: list[str], caption_files: set[str],
                   ext: str) -> tuple[dict[str, str], list[Problem]]:
    """Read ``.txt`` sidecars: captions by image name; orphans and shared sidecars are problems."""
    captions: dict[str, str] = {}
    problems: list[Problem] = []
    owners: dict[str, list[str]] = {}
    for name in images:
        owners.setdefault(Path(name).stem + ext, []).append(name)
    for side in sorted(caption_files):
        where, imgs = str(folder / side), owners.get(side, [])
        if not imgs:
            problems.append(Problem(where, "caption file with no matching image: add the image or remove it"))
            continue
        if len(imgs) > 1:
            problems.append(Problem(where, f"is the caption of {len(imgs)} images ({', '.join(imgs)}): "
                                           "rename them so each has its own caption file"))
            continue
        try:
            captions[imgs[0]] = (folder / side).read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(where, f"unreadable caption ({e}): re-save it as UTF-8 text"))
    return captions, problems


def _source(cfg: DataConfig, has_metadata: bool, caption_files: set[str]) -> str:
    """The caption source in effect: ``auto`` resolved by the precedence in the module docstring."""
    if cfg.caption_source != "auto":
        return cfg.caption_source
    if has_metadata:
        return "metadata"
    return "txt" if caption_files else "instance" if cfg.instance_prompt else "none"


def _captions(cfg: DataConfig, folder: Path, images: list[str], caption_files: set[str],
              source: str) -> tuple[dict[str, str], list[Problem]]:
    """Captions by image name from ``source``, plus every problem met reading them."""
    if source == "instance":
        return {name: (cfg.instance_prompt or "").strip() for name in images}, []
    if source == "txt":
        return _read_sidecars(folder, images, caption_files, cfg.caption_extension)
    if source == "none":
        return {}, []
    if not (folder / METADATA_FILE).is_file():
        return {}, [Problem(str(folder / METADATA_FILE),
                            "missing, but data.caption_source is 'metadata': add it or choose another source")]
    captions, problems = _read_metadata(folder, set(images))
    if cfg.caption_source == "auto" and caption_files:
        sidecars, side_problems = _read_sidecars(folder, images, caption_files, cfg.caption_extension)
        problems += side_problems
        for name in sorted(set(sidecars) & set(captions)):
            if sidecars[name] != captions[name]:
                problems.append(Problem(str(folder / name), (
                    f"captions disagree: metadata.jsonl says {captions[name]!r}, the sidecar says "
                    f"{sidecars[name]!r}: make them match, delete one, or set data.caption_source")))
    return captions, problems


def _scan(folder: Path, cfg: DataConfig) -> tuple[list[str], set[str], bool, list[Problem]]:
    """Sort the folder's entries into images, caption files and metadata; report everything else."""
    images: list[str] = []
    caption_files: set[str] = set()
    problems: list[Problem] = []
    has_metadata = False
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name, where = entry.name, str(folder / entry.name)
        if name.startswith("."):
            continue  # .DS_Store, .ipynb_checkpoints, editor swap files: never user data
        if entry.is_dir():
            problems.append(Problem(where, "subfolders are not read (top level only): move its images up "
                                           "or move it out of the folder"))
        elif name == METADATA_FILE:
            has_metadata = True
        elif Path(name).suffix.lower() in IMAGE_FORMATS:
            images.append(name)
        elif name.endswith(cfg.caption_extension):
            caption_files.add(name)
        else:
            ext = Path(name).suffix or "(none)"
            problems.append(Problem(where, f"not an image (unsupported extension {ext}): remove it or move it "
                                           f"out of the folder; images must be {' '.join(IMAGE_FORMATS)}"))
    if not entries:
        problems.append(Problem(str(folder), "folder is empty: add images"))
    elif not images:
        problems.append(Problem(str(folder), f"no images ({' '.join(IMAGE_FORMATS)}) in the folder: add some"))
    return images, caption_files, has_metadata, problems


def split_validation(records: list[ImageRecord], cfg: DataConfig) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, validation) records of ``data.validation_split``: the share of images whose
    sha256(file name) sorts first (at least one of each side), both in id order; with no split,
    (records, [])."""
    if cfg.validation_split <= 0:
        return records, []
    n_val = max(1, round(cfg.validation_split * len(records)))
    if n_val >= len(records):
        raise DatasetError(Path(cfg.path), [Problem(cfg.path, (
            f"data.validation_split {cfg.validation_split} of {len(records)} images leaves none to train on; "
            "lower it or use data.validation_path"))])
    by_hash = sorted(records, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
    val_ids = {r.id for r in by_hash[:n_val]}
    return [r for r in records if r.id not in val_ids], [r for r in records if r.id in val_ids]


def preflight(cfg: DataConfig, *, require_captions: bool = True) -> list[ImageRecord]:
    """Check every file on CPU before any training; records sorted by id, or one DatasetError.

    With ``require_captions`` False an uncaptioned image gets ``""`` (malformed caption files are
    still problems).
    """
    folder = resolve_data_path(cfg.path)
    images, caption_files, has_metadata, problems = _scan(folder, cfg)
    source = _source(cfg, has_metadata, caption_files)
    captions, caption_problems = _captions(cfg, folder, images, caption_files, source)
    problems += caption_problems
    fix = {"metadata": "add a metadata.jsonl line for it (metadata.jsonl takes precedence over sidecars)",
           "instance": "set data.instance_prompt"}
    records = []
    for name in images:
        info = _inspect_image(folder / name, cfg)
        caption = captions.get(name, "")
        if require_captions and not caption:
            why = "empty caption" if name in captions else "no caption"
            how = fix.get(source, f"write {Path(name).stem}{cfg.caption_extension} beside it"
                                  + (" or set data.instance_prompt" if source == "none" else ""))
            problems.append(Problem(str(folder / name), f"{why} (caption source: {source}): {how}"))
        if isinstance(info, list):
            problems += info
        else:
            records.append(ImageRecord(name, folder / name, caption, *info))
    if problems:
        raise DatasetError(folder, sorted(problems, key=lambda p: p.path))
    return sorted(records, key=lambda r: r.id)


def _to_rgb(img: Image.Image, convert_modes: bool, where: str) -> Image.Image:
    """Apply the mode policy (module docstring): RGB out, or a DatasetError naming the file."""
    reason = _mode_reason(img.mode, convert_modes)
    if reason:
        raise DatasetError(where, [Problem(where, reason)])
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 65535 / 257 = 255 exactly, so full-range 16-bit maps onto full-range 8-bit.
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA", "RGBA", "RGBa", "LA"):
        rgba = img.convert("RGBA")  # P -> RGBA keeps palette transparency
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def load_pixels(record: ImageRecord, cfg: DataConfig, *, flip: bool = False) -> torch.Tensor:
    """Deterministic training pixels: float32 ``[3, res, res]`` in ``[-1, 1]``.

    EXIF orientation, mode policy, short side resized to ``resolution`` (LANCZOS), crop per
    ``center_crop``, optional horizontal flip, then ``x / 127.5 - 1`` (SD's VAE input range).
    """
    where = str(record.path)
    data = record.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise DatasetError(where, [Problem(where, "changed since preflight (sha256 differs): rerun preflight")])
    with _strict_truncation():
        img = Image.open(io.BytesIO(data), formats=list(FORMAT_EXTENSION))
        img.load()
    img = _to_rgb(ImageOps.exif_transpose(img), cfg.convert_modes, where)
    res, (w, h) = cfg.resolution, img.size
    if min(w, h) < res:
        raise DatasetError(where, [Problem(where, f"{w}x{h} is smaller than data.resolution {res}")])
    if min(w, h) != res:
        scale = res / min(w, h)
        img = img.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.Resampling.LANCZOS)
    w, h = img.size
    # Same rounding as diffusers' CenterCrop-based scripts; top-left when center_crop is False.
    left, top = (int(round((w - res) / 2)), int(round((h - res) / 2))) if cfg.center_crop else (0, 0)
    img = img.crop((left, top, left + res, top + res))
    if flip:
        img = ImageOps.mirror(img)
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(127.5).sub(1.0).contiguous()
