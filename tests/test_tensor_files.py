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
