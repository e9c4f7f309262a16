"""Tensor and text files written the house way: safetensors, atomically, with verifiable digests.

Every writer goes through a temp file in the target directory plus ``os.replace``, so a reader sees
either nothing or the complete file (DESIGN.md rule 6). Written files get the mode any new file
gets (``0o666 & ~umask``), so reports and exports are readable where the user's umask allows.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type == "meta":
            raise ValueError(f"cannot digest {name!r}: the tensor has no data (meta device)")
        t = t.contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-dim tensor (e.g. CLIP's logit_scale) cannot be viewed as bytes directly.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _temp_beside(path: Path) -> Path:
    """Create an empty, uniquely named temp file next to ``path`` and return its name.

    Created with ``os.open(..., 0o666)`` so the kernel applies the process umask, exactly as for
    a file opened with ``open(path, "w")``. ``tempfile.mkstemp`` creates 0600 files and
    ``os.replace`` keeps that mode, which made reports, ``best.json`` and exports unreadable to
    anyone else on a shared machine or cluster.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # another writer drew the same name: draw again
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: could not create a temp file beside {path.name}")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that readers see either nothing or the complete file.

    The file gets the usual mode of a new file (``0o666 & ~umask``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        # safetensors 0.8's save_file leaves the file it writes at 0600 whatever was there, so
        # the mode the kernel gave our temp file (umask applied) is put back afterwards.
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file + rename), mode ``0o666 & ~umask``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
