"""Tensor and text files written the house way: safetensors, atomically, with verifiable digests.

Every writer goes through a temp file in the target directory plus ``os.replace``, so a reader sees
either nothing or the complete file (docs/ARCHITECTURE.md rule 6); ``atomic_directory`` does the same for a
directory of files (a checkpoint). Written files get the mode any new file
gets (``0o666 & ~umask``, directories ``0o777 & ~umask``), so reports and exports are readable where
the user's umask allows. The new file (every file of a new directory) is fsynced before the rename
and its directory after it, so after a crash or power loss the name points at complete contents.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported by the two tensor writers that need them: the text and
# directory helpers here serve `sdsweep results`/`report`, which must not pay for a torch import.


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    import torch

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


def temp_beside(path: Path, *, directory: bool = False) -> Path:
    """Create an empty, uniquely named temp file (or directory) next to ``path``; return its name.

    Created with mode ``0o666`` (``0o777`` for a directory) so the kernel applies the process
    umask, exactly as for ``open(path, "w")`` or ``mkdir``. ``tempfile.mkstemp``/``mkdtemp``
    create 0600/0700 entries and ``os.replace`` keeps that mode, which made reports,
    ``best.json`` and exports unreadable to anyone else on a shared machine or cluster.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # another writer drew the same name: draw again
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: could not create a temp entry beside {path.name}")


def usual_modes(root: Path) -> None:
    """Give every entry under ``root`` the mode a new one gets: ``root``'s own for directories
    (``temp_beside`` made it ``0o777 & ~umask``) and that ``& 0o666`` for files. Library writers
    leave narrower ones (safetensors' ``save_file``, under diffusers' and transformers'
    ``save_pretrained``, writes 0600), which made a built model unreadable to anyone else."""
    dir_mode = stat.S_IMODE(os.stat(root).st_mode)
    for folder, dirs, files in os.walk(root):
        for name, mode in [*((d, dir_mode) for d in dirs), *((f, dir_mode & 0o666) for f in files)]:
            entry = os.path.join(folder, name)
            if not os.path.islink(entry):
                os.chmod(entry, mode)


def fsync_path(path: Path) -> None:
    """``fsync`` a file or a directory by name (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """``fsync`` every file and directory under ``root`` (symbolic links are left alone), deepest
    first, then ``root`` itself: a directory about to be renamed into place is complete on disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Fill a directory that appears at ``path`` only complete: ``with atomic_directory(p) as tmp:``.

    Files go into a fresh temp directory beside ``path`` (same filesystem, so the final rename is
    atomic); when the block ends without an exception it is renamed to ``path``, otherwise it is
    deleted and ``path`` is left as it was. An existing empty ``path`` (e.g. a
    ``TemporaryDirectory``) is replaced directly; a non-empty one is first renamed aside and
    deleted afterwards, so for that moment ``path`` is absent but never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, directory=True)
    old: Path | None = None
    try:
        yield tmp
        usual_modes(tmp)
        fsync_tree(tmp)
        if path.is_dir() and any(path.iterdir()):
            old = temp_beside(path, directory=True)
            os.replace(path, old)  # rename(2) replaces an empty directory only
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the previous directory back rather than leave none
                os.replace(old, path)
                old = None
            raise
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_file(tensors: dict[str, torch.Tensor], filename: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, imported on first use (a module-level name, so tests can wrap it)."""
    from safetensors.torch import save_file as write

    write(tensors, filename, metadata=metadata)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that readers see either nothing or the complete file.

    The file gets the usual mode of a new file (``0o666 & ~umask``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        # safetensors 0.8's save_file leaves the file it writes at 0600 whatever was there, so
        # the mode the kernel gave our temp file (umask applied) is put back afterwards.
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file + rename), mode ``0o666 & ~umask``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
