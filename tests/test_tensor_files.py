"""The atomic writers: complete files or none, and the usual file mode for other readers."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from trainers.tensor_files import atomic_save_safetensors, atomic_write_text


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a known umask (restored afterwards: it is process-wide)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_umask_mode_not_the_temp_files_0600(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask  # what open(path, "w") gives a new file
    text = tmp_path / "report" / "best.json"
    atomic_write_text(text, '{"ok": true}\n')
    tensors = tmp_path / "export" / "lora.safetensors"
    atomic_save_safetensors({"w": torch.ones(2)}, tensors, {"format": "pt"})
    assert (oct(_mode(text)), oct(_mode(tensors))) == (oct(expected), oct(expected))
    # Replacing an existing file gives the new file the same mode (not the old one's, not 0600).
    os.chmod(text, 0o600)
    atomic_write_text(text, "{}\n")
    assert oct(_mode(text)) == oct(expected)
    assert text.read_text() == "{}\n" and torch.equal(load_file(tensors)["w"], torch.ones(2))


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def interrupted(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")  # anything between writing and renaming

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new")
    with pytest.raises(OSError, match="No space"):
        atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors", {})
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002], indirect=True, ids=lambda m: f"umask{m:03o}")
def test_the_builtin_model_and_dataset_folders_under_a_fresh_cache_get_the_usual_modes(
        tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """What mkdir and open give a new entry under this umask (0755 / 0644 with umask 022), for every
    folder and file sdsweep builds into its cache: not mkdtemp's 0700, nor the 0600 that
    safetensors leaves on the weights diffusers' save_pretrained writes."""
    from trainers.data import resolve_data_path
    from trainers.models import ensure_builtin
    from trainers.paths import cache_root

    os.mkdir(tmp_path / "a-dir")
    (tmp_path / "a-file").write_text("")
    dir_mode, file_mode = _mode(tmp_path / "a-dir"), _mode(tmp_path / "a-file")
    monkeypatch.setenv("SDSWEEP_CACHE", str(tmp_path / "fresh-cache"))
    built = [ensure_builtin("tiny-sd"), resolve_data_path("builtin:demo"), resolve_data_path("builtin:toystar")]
    assert all(p.parent == cache_root() / "builtin" for p in built)
    entries = [p for b in built for p in [b, *b.rglob("*")]]
    assert any(p.suffix == ".safetensors" for p in entries)
    wrong = {str(p.relative_to(cache_root())): oct(_mode(p)) for p in entries
             if _mode(p) != (dir_mode if p.is_dir() else file_mode)}
    assert not wrong, f"expected {oct(dir_mode)} / {oct(file_mode)}: {wrong}"
    if umask == 0o022:
        assert (oct(dir_mode), oct(file_mode)) == ("0o755", "0o644")


def test_atomic_writes_fsync_the_file_before_the_rename_and_its_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records each fsync (by the path its descriptor is open on) and each rename, in order: without
    the file's fsync a crash can leave the new name on empty or partial contents, and without the
    directory's the rename itself may be lost."""
    from trainers.paths import materialize_dir
    from trainers.tensor_files import atomic_directory

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def moved(real):
        def move(src: object, dst: object) -> None:
            real(src, dst)
            events.append(("rename", str(dst)))
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))

    def check(target: Path, files: list[str]) -> None:
        """Every file's contents (and a new directory's entries) synced before the rename to
        ``target``, ``target``'s directory after it."""
        at = events.index(("rename", str(target)))
        before = [Path(p) for kind, p in events[:at] if kind == "fsync"]
        temp = f".{target.name}."  # the temp file or directory beside target, renamed to it
        under_temp = [p for p in before if p.name.startswith(temp) or any(q.name.startswith(temp) for q in p.parents)]
        assert any(p.name.startswith(temp) for p in under_temp), before  # the file, or the directory itself
        assert set(files) <= {p.name for p in under_temp} | {target.name}, (files, before)  # a directory's files
        assert ("fsync", str(target.parent)) in events[at + 1:], events[at:]
        events.clear()

    text = tmp_path / "out" / "best.json"
    atomic_write_text(text, "{}")
    check(text, [text.name])
    tensors = tmp_path / "out" / "w.safetensors"
    atomic_save_safetensors({"w": torch.ones(2)}, tensors, {"format": "pt"})
    check(tensors, [tensors.name])
    ckpt = tmp_path / "checkpoint-10"
    with atomic_directory(ckpt) as tmp:
        (tmp / "state.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"x")
    check(ckpt, ["state.json", "a.bin"])
    built = materialize_dir(tmp_path / "cache" / "model-v1", lambda d: (d / "config.json").write_text("{}"))
    check(built, ["config.json"])
