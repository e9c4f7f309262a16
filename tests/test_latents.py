"""Latent cache: content keys, reuse, verification, atomic writes, alignment."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainers.data import DataConfig, load_pixels, preflight
from trainers.latents import build_latent_cache, encode_prompts
from trainers.models import module_fingerprint


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"resolution": 64, **kw})


def _build(model, cfg: DataConfig, root: Path, **kw):
    return build_latent_cache(preflight(cfg), cfg, model, root=root, **kw)


@pytest.fixture
def data_copy(demo_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "data"
    shutil.copytree(demo_dir, dest)
    return dest


def test_each_image_is_encoded_once_and_an_unchanged_dataset_reencodes_nothing(
        tiny_model, demo_dir, tmp_path, encode_counter):
    cfg = _cfg(demo_dir)
    counter = encode_counter(tiny_model.vae)
    first = _build(tiny_model, cfg, tmp_path / "c")
    n = len(first)
    assert n == 8
    assert counter.images == n and first.report.images_encoded == n
    second = _build(tiny_model, cfg, tmp_path / "c")
    assert counter.images == n, "second build called the VAE"
    assert second.report.images_encoded == 0 and second.report.entries_reused == n
    assert second.key == first.key
    assert torch.equal(second.mean, first.mean) and torch.equal(second.std, first.std)


def test_flip_stores_the_flipped_variant_and_doubles_encodes(tiny_model, demo_dir, tmp_path, encode_counter):
    cfg = _cfg(demo_dir, random_flip=True)
    counter = encode_counter(tiny_model.vae)
    data = _build(tiny_model, cfg, tmp_path / "c")
    assert counter.images == 2 * len(data) == data.report.images_encoded
    assert data.flip_mean is not None and data.flip_mean.shape == data.mean.shape
    rec = preflight(cfg)[3]
    with torch.no_grad():
        direct = tiny_model.vae.encode(load_pixels(rec, cfg, flip=True)[None]).latent_dist.mean[0]
    assert torch.allclose(data.flip_mean[data.ids.index(rec.id)], direct, atol=1e-5)
    assert not torch.allclose(data.flip_mean, data.mean)


def test_changing_one_image_reencodes_only_that_image(tiny_model, data_copy, tmp_path, encode_counter):
    cfg = _cfg(data_copy)
    _build(tiny_model, cfg, tmp_path / "c")
    victim = sorted(data_copy.glob("*.png"))[2]
    img = Image.open(victim).convert("RGB")
    img.putpixel((5, 5), (0, 0, 0) if img.getpixel((5, 5)) != (0, 0, 0) else (255, 255, 255))
    img.save(victim)
    counter = encode_counter(tiny_model.vae)
    data = _build(tiny_model, cfg, tmp_path / "c")
    assert counter.images == 1 and data.report.images_encoded == 1
    assert data.report.entries_reused == len(data) - 1


def test_changing_the_vae_or_resolution_reencodes_everything(tiny_model, demo_dir, tmp_path, encode_counter):
    _build(tiny_model, _cfg(demo_dir), tmp_path / "c")
    counter = encode_counter(tiny_model.vae)
    data = _build(tiny_model, _cfg(demo_dir, resolution=96), tmp_path / "c")
    assert data.report.images_encoded == len(data) == counter.images
    assert data.mean.shape[-1] == 96 // 8
    with torch.no_grad():
        next(tiny_model.vae.parameters()).add_(1e-3)
    changed = dataclasses.replace(tiny_model, vae_identity=module_fingerprint(tiny_model.vae))
    assert changed.vae_identity != tiny_model.vae_identity
    data2 = _build(changed, _cfg(demo_dir), tmp_path / "c")
    assert data2.report.images_encoded == len(data2)


def _entry_files(root: Path) -> list[Path]:
    return sorted((root / "entries").rglob("*.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "empty"])
def test_damaged_cache_file_is_detected_and_rebuilt(tiny_model, demo_dir, tmp_path, damage):
    cfg = _cfg(demo_dir)
    good = _build(tiny_model, cfg, tmp_path / "c")
    victim = _entry_files(tmp_path / "c")[0]
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_byte":
        raw[-3] ^= 0xFF  # inside the tensor data, past the header: only the digest can notice
        victim.write_bytes(raw)
    else:
        victim.write_bytes(b"")
    data = _build(tiny_model, cfg, tmp_path / "c")
    assert data.report.entries_rebuilt == 1 and data.report.images_encoded == 1
    # Re-encoded alone rather than in a batch of 8: equal up to float rounding of batched convs.
    assert torch.allclose(data.mean, good.mean, atol=1e-5)


def test_a_crash_mid_write_leaves_nothing_that_reads_as_valid(tiny_model, demo_dir, tmp_path, monkeypatch):
    import trainers.tensor_files as tensor_files

    real = tensor_files.save_file

    def dying_save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half-written file
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(tensor_files, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_model, _cfg(demo_dir), tmp_path / "c")
    assert _entry_files(tmp_path / "c") == [], "a partial write became visible under the final name"
    assert not list((tmp_path / "c").rglob("*.tmp")), "temp file left behind"
    monkeypatch.setattr(tensor_files, "save_file", real)
    data = _build(tiny_model, _cfg(demo_dir), tmp_path / "c")
    assert data.report.images_encoded == len(data)


def _build_in_process(root: str, demo: str, cache: str, out: "mp.Queue") -> None:
    import os

    os.environ["SDSWEEP_CACHE"] = cache
    torch.set_num_threads(1)  # two processes on two cores: more threads only spin against each other
    from trainers.models import load_base_model

    model = load_base_model("builtin:tiny-sd")
    cfg = DataConfig(path=demo, resolution=64, random_flip=True)
    data = build_latent_cache(preflight(cfg), cfg, model, root=Path(root))
    out.put((data.key, data.mean.sum().item(), data.report.images_encoded))


def test_two_concurrent_writers_both_succeed_and_leave_valid_files(tiny_sd_dir, demo_dir, sdsweep_cache, tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "c"), str(demo_dir), str(sdsweep_cache), q))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    results = [q.get(timeout=5) for _ in procs]
    assert results[0][:2] == results[1][:2]
    files = _entry_files(tmp_path / "c")
    assert len(files) == 8
    from trainers.models import load_base_model

    again = build_latent_cache(preflight(_cfg(demo_dir, random_flip=True)), _cfg(demo_dir, random_flip=True),
                               load_base_model("builtin:tiny-sd"), root=tmp_path / "c")
    assert again.report.images_encoded == 0 and again.report.entries_rebuilt == 0


def test_latents_stay_aligned_with_their_captions(tiny_model, data_copy, tmp_path):
    # Give every image a unique caption, then check each row against a direct encode of its image.
    for i, txt in enumerate(sorted(data_copy.glob("*.txt"))):
        txt.write_text(f"caption number {i} of sks toy")
    cfg = _cfg(data_copy)
    records = {r.id: r for r in preflight(cfg)}
    data = _build(tiny_model, cfg, tmp_path / "c")
    for row in torch.randperm(len(data), generator=torch.Generator().manual_seed(1)).tolist():
        rec = records[data.ids[row]]
        assert data.captions[row] == rec.caption
        with torch.no_grad():
            direct = tiny_model.vae.encode(load_pixels(rec, cfg)[None]).latent_dist.mean[0]
        assert torch.allclose(data.mean[row], direct, atol=1e-5)
        emb = data.text_embeds[data.caption_index[row]]
        assert torch.allclose(emb, encode_prompts(tiny_model.text_encoder, tiny_model.tokenizer, [rec.caption])[0],
                              atol=1e-5)


def test_text_embeddings_are_cached_once_per_caption(tiny_model, demo_dir, tmp_path):
    cfg = _cfg(demo_dir)
    first = _build(tiny_model, cfg, tmp_path / "c")
    n_unique = len(set(first.captions))
    assert first.report.texts_encoded == n_unique and first.text_embeds.shape[0] == n_unique
    second = _build(tiny_model, cfg, tmp_path / "c")
    assert second.report.texts_encoded == 0 and torch.equal(second.text_embeds, first.text_embeds)
    no_text = _build(tiny_model, cfg, tmp_path / "c", cache_text=False)
    assert no_text.text_embeds is None


def test_each_draw_is_a_fresh_sample_of_the_stored_distribution(tiny_model, demo_dir, tmp_path):
    data = _build(tiny_model, _cfg(demo_dir), tmp_path / "c")
    idx, flip = torch.tensor([0, 1]), torch.tensor([False, False])
    a = data.sample_latents(idx, flip, torch.Generator().manual_seed(0))
    b = data.sample_latents(idx, flip, torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    draws = torch.stack([data.sample_latents(idx, flip, torch.Generator().manual_seed(s)) for s in range(400)])
    expected = (data.mean[idx] - data.shift_factor) * data.scaling_factor
    assert torch.allclose(draws.mean(0), expected, atol=4 * data.scaling_factor * data.std.max().item() / 20)


def test_manifest_lists_every_image_with_its_entry(tiny_model, demo_dir, tmp_path):
    import json

    data = _build(tiny_model, _cfg(demo_dir), tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifests" / f"{data.key}.json").read_text())
    assert [e["id"] for e in manifest["images"]] == data.ids
    for e in manifest["images"]:
        assert (tmp_path / "c" / "entries" / e["entry"][:2] / f"{e['entry']}.safetensors").is_file()
