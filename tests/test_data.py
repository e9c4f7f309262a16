"""Tests for trainers/data.py: config validation, preflight problems, captions, pixels, demo data.

Every bad file is made in code under tmp_path; images are tiny so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from pydantic import ValidationError

from trainers.data import (
    DataConfig,
    DatasetError,
    ImageRecord,
    Problem,
    load_pixels,
    preflight,
    resolve_data_path,
)
from trainers.demo_data import write_demo_dataset

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(folder: Path, name: str, img: Image.Image, caption: str | None = "a photo", **kw: object) -> Path:
    """Save ``img`` as ``folder/name`` (format from ``kw`` or the extension) with a .txt caption."""
    path = folder / name
    img.save(path, **kw)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def solid(size: tuple[int, int] = (64, 64), color: int | tuple[int, ...] = RED, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def noise(size: int = 64) -> Image.Image:
    """Random pixels, so that a truncated file really misses image data."""
    arr = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, mode="RGB")


def problems_by_file(err: DatasetError) -> dict[str, str]:
    """File name -> all its reasons joined (one string per file, easy to assert on)."""
    out: dict[str, str] = {}
    for p in err.problems:
        out[Path(p.path).name] = out.get(Path(p.path).name, "") + " | " + p.reason
    return out


def fail(cfg: DataConfig, **kw: bool) -> dict[str, str]:
    with pytest.raises(DatasetError) as info:
        preflight(cfg, **kw)
    return problems_by_file(info.value)


def cfg_for(folder: Path, **kw: object) -> DataConfig:
    return DataConfig(path=str(folder), **{"resolution": 64, **kw})


# --- config ---------------------------------------------------------------------------------


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="center_crp"):
        DataConfig(path="x", center_crp=True, resolution=64)


def test_config_is_frozen() -> None:
    cfg = DataConfig(path="x", resolution=64)
    with pytest.raises(ValidationError):
        cfg.resolution = 128  # type: ignore[misc]


@pytest.mark.parametrize("resolution", [0, -8, 60])
def test_resolution_must_be_a_positive_multiple_of_8(resolution: int) -> None:
    with pytest.raises(ValidationError, match="multiple of 8"):
        DataConfig(path="x", resolution=resolution)


def test_instance_source_requires_instance_prompt() -> None:
    with pytest.raises(ValidationError, match="instance_prompt"):
        DataConfig(path="x", caption_source="instance", resolution=64)
    with pytest.raises(ValidationError, match="instance_prompt"):
        DataConfig(path="x", caption_source="instance", instance_prompt="  ", resolution=64)


def test_instance_prompt_that_would_be_ignored_is_rejected() -> None:
    with pytest.raises(ValidationError, match="instance_prompt is unused"):
        DataConfig(path="x", caption_source="txt", instance_prompt="sks dog", resolution=64)


def test_caption_extension_must_not_be_an_image_extension() -> None:
    with pytest.raises(ValidationError, match="caption_extension"):
        DataConfig(path="x", caption_extension=".png", resolution=64)


# --- folder-level problems ------------------------------------------------------------------


def test_missing_folder_names_the_data_path_key(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data.path does not exist"):
        preflight(cfg_for(tmp_path / "nope"))


def test_unknown_builtin_lists_valid_names() -> None:
    with pytest.raises(DatasetError, match="builtin:demo"):
        resolve_data_path("builtin:cats")


def test_empty_folder_is_reported(tmp_path: Path) -> None:
    assert "folder is empty" in fail(cfg_for(tmp_path))[tmp_path.name]


def test_folder_without_images_is_reported(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("hi")
    found = fail(cfg_for(tmp_path))
    assert "no images" in found[tmp_path.name]
    assert "unsupported extension .md" in found["notes.md"]


def test_unsupported_extension_is_reported_and_hidden_files_ignored(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid())
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / "sub").mkdir()
    found = fail(cfg_for(tmp_path))
    assert set(found) == {"anim.gif", "sub"}
    assert "not an image (unsupported extension .gif): remove it" in found["anim.gif"]
    assert "subfolders are not read" in found["sub"]


# --- per-file problems ----------------------------------------------------------------------


def test_zero_byte_file_is_reported(tmp_path: Path) -> None:
    save(tmp_path, "ok.png", solid())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("cap")
    found = fail(cfg_for(tmp_path))
    assert list(found) == ["empty.png"] and "empty file (0 bytes)" in found["empty.png"]


@pytest.mark.parametrize("fmt,name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_truncated_file_is_reported_even_if_pil_was_told_to_tolerate_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, name: str
) -> None:
    buf = io.BytesIO()
    noise().save(buf, format=fmt)
    (tmp_path / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / name).with_suffix(".txt").write_text("cap")
    # Other code may flip this global; preflight must still catch truncation (and restore it).
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "truncated or corrupt" in fail(cfg_for(tmp_path))[name]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_garbage_bytes_with_image_extension_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (tmp_path / "junk.txt").write_text("cap")
    assert "not an image (PIL cannot identify" in fail(cfg_for(tmp_path))["junk.jpg"]


def test_unsupported_format_behind_an_image_extension_is_named_not_decoded(tmp_path: Path) -> None:
    save(tmp_path, "anim.png", solid(), format="GIF")
    assert "contents are GIF, which is not supported: convert it to PNG" in fail(cfg_for(tmp_path))["anim.png"]


def test_jpeg_named_png_is_reported_as_lying_extension(tmp_path: Path) -> None:
    save(tmp_path, "liar.png", solid(), format="JPEG")
    reason = fail(cfg_for(tmp_path))["liar.png"]
    assert "contents are JPEG but it is named .png" in reason and "rename it to .jpg" in reason


def test_unreadable_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = save(tmp_path, "locked.png", solid())
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        # chmod 000 does not stop root (the CI user here), so simulate the permission error.
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert "permission denied" in fail(cfg_for(tmp_path))["locked.png"]


def test_image_smaller_than_resolution_is_reported(tmp_path: Path) -> None:
    save(tmp_path, "small.png", solid((200, 48)))
    save(tmp_path, "ok.png", solid((64, 200)))
    found = fail(cfg_for(tmp_path, resolution=64))
    assert list(found) == ["small.png"]
    assert "200x48 is smaller than data.resolution 64" in found["small.png"]


# --- mode policy ----------------------------------------------------------------------------


def test_rgba_refused_by_default_and_converted_on_opt_in(tmp_path: Path) -> None:
    img = solid((64, 64), (255, 0, 0, 0), mode="RGBA")  # transparent left half
    img.paste((255, 0, 0, 255), (32, 0, 64, 64))  # opaque red right half
    save(tmp_path, "a.png", img)
    assert "unsupported mode RGBA" in fail(cfg_for(tmp_path))["a.png"]
    assert "data.convert_modes: true" in fail(cfg_for(tmp_path))["a.png"]
    cfg = cfg_for(tmp_path, convert_modes=True)
    px = load_pixels(preflight(cfg)[0], cfg)
    assert torch.all(px[:, :, :32] == 1.0)  # transparent composited over white
    assert px[:, 0, 63].tolist() == [1.0, -1.0, -1.0]  # opaque red kept


def test_16bit_refused_by_default_and_scaled_on_opt_in(tmp_path: Path) -> None:
    arr = np.zeros((64, 64), dtype=np.uint16)
    arr[:, 16:32], arr[:, 32:] = 128 * 257, 65535
    save(tmp_path, "deep.png", Image.fromarray(arr))
    assert "unsupported mode I;16" in fail(cfg_for(tmp_path))["deep.png"]
    cfg = cfg_for(tmp_path, convert_modes=True)
    px = load_pixels(preflight(cfg)[0], cfg)
    assert px[0, 0, [0, 20, 40]].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    assert torch.equal(px[0], px[1]) and torch.equal(px[1], px[2])  # grey stays grey


def test_cmyk_refused_by_default_and_converted_on_opt_in(tmp_path: Path) -> None:
    save(tmp_path, "print.jpg", solid((64, 64), (255, 0, 0, 0), mode="CMYK"), quality=95)
    assert "unsupported mode CMYK" in fail(cfg_for(tmp_path))["print.jpg"]
    cfg = cfg_for(tmp_path, convert_modes=True)
    px = load_pixels(preflight(cfg)[0], cfg)
    assert px[:, 32, 32].tolist() == pytest.approx([-1.0, 1.0, 1.0], abs=0.05)  # pure cyan


def test_palette_refused_by_default_and_transparency_composited_on_opt_in(tmp_path: Path) -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (32, 0, 64, 64))
    save(tmp_path, "pal.png", img, transparency=0)  # palette index 0 (red) is transparent
    assert "unsupported mode P" in fail(cfg_for(tmp_path))["pal.png"]
    cfg = cfg_for(tmp_path, convert_modes=True)
    px = load_pixels(preflight(cfg)[0], cfg)
    assert px[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and px[:, 0, 63].tolist() == [-1.0, -1.0, 1.0]


def test_grayscale_is_accepted_without_opt_in(tmp_path: Path) -> None:
    save(tmp_path, "g.png", solid(color=255, mode="L"))
    cfg = cfg_for(tmp_path)
    px = load_pixels(preflight(cfg)[0], cfg)
    assert px.shape == (3, 64, 64) and torch.all(px == 1.0)


# --- captions -------------------------------------------------------------------------------


def test_txt_sidecar_captions_are_read_stripped_and_records_sorted(tmp_path: Path) -> None:
    save(tmp_path, "b.jpg", solid((80, 64)), caption="  second\n")
    save(tmp_path, "a.png", solid(), caption="first")
    records = preflight(cfg_for(tmp_path))
    assert [(r.id, r.caption, r.width, r.height) for r in records] == [
        ("a.png", "first", 64, 64), ("b.jpg", "second", 80, 64)]
    assert records[0].sha256 == hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()


def test_metadata_jsonl_captions_are_read(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid(), caption=None)
    lines = [{"file_name": "a.png", "text": " a red square ", "extra": 1}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert [r.caption for r in preflight(cfg_for(tmp_path, caption_source="metadata"))] == ["a red square"]
    assert [r.caption for r in preflight(cfg_for(tmp_path))] == ["a red square"]  # auto picks it


def test_metadata_bad_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        save(tmp_path, name, solid(), caption=None)
    (tmp_path / "metadata.jsonl").write_text("\n".join([
        '{"file_name": "a.png", "text": "ok"}',
        '{"file_name": "a.png", "text": oops',
        '{"file_name": "gone.png", "text": "x"}',
        '{"file_name": "a.png", "text": "again"}',
        '{"file_name": "b.png"}',
    ]))
    found = fail(cfg_for(tmp_path))
    meta = found["metadata.jsonl"]
    assert "line 2: not valid JSON" in meta
    assert "line 3: names 'gone.png'" in meta
    assert "line 4: duplicate entry for 'a.png' (first on line 1)" in meta
    assert 'line 5: needs string "file_name" and "text"' in meta
    assert "no caption" in found["b.png"]


def test_metadata_source_without_metadata_file_is_reported(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid())
    assert "caption_source is 'metadata'" in fail(cfg_for(tmp_path, caption_source="metadata"))["metadata.jsonl"]


def test_txt_and_metadata_disagreement_is_a_problem(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid(), caption="a red square")
    save(tmp_path, "b.png", solid(), caption="a blue square")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "a red square"}\n{"file_name": "b.png", "text": "a cat"}\n')
    save(tmp_path, "c.png", solid(), caption="only a sidecar")
    found = fail(cfg_for(tmp_path))
    assert list(found) == ["b.png", "c.png"]
    assert "no caption (caption source: metadata): add a metadata.jsonl line" in found["c.png"]
    assert "captions disagree: metadata.jsonl says 'a cat', the sidecar says 'a blue square'" in found["b.png"]
    # An explicit source is the user's choice: no cross-check.
    assert [r.caption for r in preflight(cfg_for(tmp_path, caption_source="txt"))] == [
        "a red square", "a blue square", "only a sidecar"]


def test_instance_prompt_mode_captions_every_image(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid(), caption="ignored")
    save(tmp_path, "b.png", solid(), caption=None)
    cfg = cfg_for(tmp_path, caption_source="instance", instance_prompt=" a photo of sks dog ")
    assert [r.caption for r in preflight(cfg)] == ["a photo of sks dog"] * 2


def test_auto_uses_instance_prompt_only_when_no_caption_files_exist(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid(), caption=None)
    assert preflight(cfg_for(tmp_path, instance_prompt="sks dog"))[0].caption == "sks dog"
    save(tmp_path, "b.png", solid(), caption="own caption")
    found = fail(cfg_for(tmp_path, instance_prompt="sks dog"))  # sidecars exist: no silent fallback
    assert list(found) == ["a.png"] and "no caption" in found["a.png"]


def test_missing_caption_is_reported_when_required_and_empty_when_not(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid())
    save(tmp_path, "b.png", solid(), caption=None)
    found = fail(cfg_for(tmp_path))
    assert list(found) == ["b.png"] and "no caption" in found["b.png"] and "b.txt" in found["b.png"]
    assert [r.caption for r in preflight(cfg_for(tmp_path), require_captions=False)] == ["a photo", ""]


def test_empty_caption_is_reported(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid(), caption="  \n")
    assert "empty caption" in fail(cfg_for(tmp_path))["a.png"]


def test_orphan_and_shared_caption_files_are_reported(tmp_path: Path) -> None:
    save(tmp_path, "a.png", solid())
    save(tmp_path, "a.jpg", solid())  # shares a.txt with a.png
    (tmp_path / "lost.txt").write_text("where is my image")
    found = fail(cfg_for(tmp_path))
    assert "caption file with no matching image" in found["lost.txt"]
    assert "is the caption of 2 images (a.jpg, a.png)" in found["a.txt"]


# --- all at once ----------------------------------------------------------------------------


def test_preflight_reports_all_bad_files_at_once(tmp_path: Path) -> None:
    save(tmp_path, "good.png", solid())
    (tmp_path / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    noise().save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])
    (tmp_path / "junk.webp").write_bytes(b"RIFF garbage")
    save(tmp_path, "liar.png", solid(), format="JPEG")
    save(tmp_path, "small.png", solid((32, 32)))
    save(tmp_path, "alpha.png", solid(color=(1, 2, 3, 4), mode="RGBA"))
    save(tmp_path, "nocap.png", solid(), caption=None)
    (tmp_path / "notes.md").write_text("todo")
    for name in ("empty", "cut", "junk"):
        (tmp_path / f"{name}.txt").write_text("cap")
    with pytest.raises(DatasetError) as info:
        preflight(cfg_for(tmp_path))
    err = info.value
    expected = {
        "empty.png": "empty file (0 bytes)", "cut.png": "truncated or corrupt",
        "junk.webp": "not an image", "liar.png": "extension lies", "small.png": "smaller than",
        "alpha.png": "unsupported mode RGBA", "nocap.png": "no caption",
        "notes.md": "unsupported extension .md",
    }
    found = problems_by_file(err)
    assert set(found) == set(expected)
    for name, reason in expected.items():
        assert reason in found[name], name
    text = str(err)
    assert text.splitlines()[0] == f"dataset {tmp_path}: {len(err.problems)} problem(s):"
    assert all(str(tmp_path / name) in text for name in expected)


def test_dataset_error_survives_pickling(tmp_path: Path) -> None:
    err = DatasetError(tmp_path, [Problem("x.png", "bad: fix it")])
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems and str(copy) == str(err)


# --- pixels ---------------------------------------------------------------------------------


def one_record(folder: Path, img: Image.Image, **cfg_kw: object) -> tuple[ImageRecord, DataConfig]:
    save(folder, "x.png", img)
    cfg = cfg_for(folder, **cfg_kw)
    return preflight(cfg)[0], cfg


def test_pixels_are_normalised_to_minus_one_one(tmp_path: Path) -> None:
    img = solid((64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 32, 64, 64))
    px = load_pixels(*one_record(tmp_path, img))
    assert px.dtype == torch.float32 and px.shape == (3, 64, 64)
    assert torch.all(px[:, :32] == -1.0) and torch.all(px[:, 32:] == 1.0)


def test_short_side_is_resized_and_centre_or_top_left_cropped(tmp_path: Path) -> None:
    arr = np.zeros((64, 256, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(256)  # red encodes the source column
    save(tmp_path, "x.png", Image.fromarray(arr))
    centre = load_pixels(preflight(cfg := cfg_for(tmp_path, resolution=32))[0], cfg)
    top_left = load_pixels(preflight(cfg := cfg_for(tmp_path, resolution=32, center_crop=False))[0], cfg)
    assert centre.shape == top_left.shape == (3, 32, 32)
    # Halved to 128x32: the centre crop starts at resized column 48 = source column ~96; top-left at 0.
    assert (centre[0, 0, 0] + 1) * 127.5 == pytest.approx(96.5, abs=2)
    assert (top_left[0, 0, 0] + 1) * 127.5 == pytest.approx(0.5, abs=2)


def test_flip_mirrors_pixels_horizontally_and_loading_is_deterministic(tmp_path: Path) -> None:
    record, cfg = one_record(tmp_path, noise(80))
    plain = load_pixels(record, cfg)
    assert torch.equal(plain, load_pixels(record, cfg))
    assert torch.equal(load_pixels(record, cfg, flip=True), torch.flip(plain, dims=[2]))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = solid((96, 64), RED)
    img.paste(BLUE, (48, 0, 96, 64))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored left becomes displayed top
    save(tmp_path, "x.jpg", img, exif=exif.tobytes(), quality=95)
    cfg = cfg_for(tmp_path)
    record = preflight(cfg)[0]
    assert (record.width, record.height) == (64, 96)
    px = load_pixels(record, cfg)
    assert px[0, 0, 32] > 0.8 and px[2, 0, 32] < -0.8  # top row red
    assert px[2, 63, 32] > 0.8 and px[0, 63, 32] < -0.8  # bottom row blue


def test_load_pixels_rejects_a_file_changed_since_preflight(tmp_path: Path) -> None:
    record, cfg = one_record(tmp_path, solid())
    solid(color=BLUE).save(record.path)
    with pytest.raises(DatasetError, match="changed since preflight"):
        load_pixels(record, cfg)


# --- demo dataset ---------------------------------------------------------------------------


def test_demo_dataset_is_deterministic_and_passes_preflight(tmp_path: Path) -> None:
    a = write_demo_dataset(tmp_path / "a", n_images=4, seed=3, size=64)
    b = write_demo_dataset(tmp_path / "b", n_images=4, seed=3, size=64)
    c = write_demo_dataset(tmp_path / "c", n_images=4, seed=4, size=64)
    files = sorted(p.name for p in a.iterdir())
    assert len(files) == 8 and files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.endswith(".png"))
    records = preflight(cfg_for(a, resolution=64))
    assert len(records) == 4
    assert all(r.caption.startswith("a photo of sks toy on a ") for r in records)
    assert all(Image.open(r.path).mode == "RGB" and (r.width, r.height) == (64, 64) for r in records)


def test_builtin_demo_is_materialized_once_in_the_cache(sdsweep_cache: Path) -> None:
    folder = resolve_data_path("builtin:demo")
    assert folder == sdsweep_cache / "builtin" / "demo-v1"
    assert resolve_data_path("builtin:demo") == folder
    records = preflight(DataConfig(path="builtin:demo", resolution=64))
    assert len(records) == 8 and records[0].path.parent == folder
