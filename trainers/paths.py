"""Where sdsweep keeps what it builds once and reuses: built-in models, demo data, latent caches.

The root is ``$SDSWEEP_CACHE`` when set, else ``~/.cache/sdsweep``. Tests point it at a temporary
directory so they never touch a user's cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV = "SDSWEEP_CACHE"


def cache_root() -> Path:
    """Return the sdsweep cache root directory (created if missing)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdsweep")
    root.mkdir(parents=True, exist_ok=True)
    return root


def materialize_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory once, atomically: ``build(tmp)`` fills a temporary sibling that is then
    renamed to ``final``. A crash mid-build leaves only a temp dir (never a half-built ``final``);
    two concurrent builders both succeed and the loser's copy is discarded.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (rename onto a non-empty dir fails): keep theirs.
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
