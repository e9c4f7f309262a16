"""Where sdsweep keeps what it builds once and reuses: built-in models, demo data, latent caches.

The root is ``$SDSWEEP_CACHE`` when set, else ``~/.cache/sdsweep``. Tests point it at a temporary
directory so they never touch a user's cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from trainers.tensor_files import fsync_path, fsync_tree, temp_beside, usual_modes

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
    # Made with the mode any new directory gets (0o777 & ~umask), which the rename keeps, and so
    # is everything in it: tempfile.mkdtemp's 0700 (and save_pretrained's 0600 weight files) made
    # the built-in models and datasets private to their builder. Complete on disk before the rename.
    tmp = temp_beside(final, directory=True)
    try:
        build(tmp)
        usual_modes(tmp)
        fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (rename onto a non-empty dir fails): keep theirs.
            if not final.is_dir():
                raise
        fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----- paths in config files --------------------------------------------------------------------
# One rule for every path a config holds: it is made absolute against the directory the config was
# loaded from (``resolve_config_paths``), once, at load. Ray runs each trial (and the cache,
# baseline and confirmation tasks) in a working directory of its own, where a relative path would
# point elsewhere. A config field that holds a path says so with ``json_schema_extra=LOCAL_PATH``
# (always a filesystem path, unless ``builtin:``) or ``MAYBE_PATH`` (a path when it exists there,
# else something else, e.g. a Hub id); tests/test_config_paths.py checks every path-like field
# carries one.
PATH_KIND = "sdsweep_path"
LOCAL_PATH: dict[str, str] = {PATH_KIND: "local"}
MAYBE_PATH: dict[str, str] = {PATH_KIND: "maybe"}


def absolute_path(value: str | None, root: Path, *, must_exist: bool = False) -> str | None:
    """``value`` made absolute against ``root`` (``builtin:`` names and absolute paths unchanged;
    with ``must_exist``, a value that names nothing under ``root`` stays as given: a Hub id)."""
    if value is None or value.startswith("builtin:"):
        return value
    if Path(value).expanduser().is_absolute():  # "~/data" too: no reader in a Ray task expands it
        return str(Path(value).expanduser())
    candidate = root / Path(value).expanduser()
    if must_exist and not candidate.exists():
        return value
    return str(candidate.resolve())


def path_kind(field: Any) -> str | None:
    """``"local"``, ``"maybe"`` or None: what a pydantic field's ``json_schema_extra`` says it holds."""
    extra = getattr(field, "json_schema_extra", None)
    return extra.get(PATH_KIND) if isinstance(extra, dict) else None


def resolve_config_paths(config: Any, root: Path) -> Any:
    """A copy of the pydantic ``config`` with every path field (nested sections included) made
    absolute against ``root``; other values are untouched."""
    from pydantic import BaseModel

    updates: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        kind = path_kind(field)
        if kind is not None and isinstance(value, str):
            new: Any = absolute_path(value, root, must_exist=kind == "maybe")
        elif isinstance(value, BaseModel):
            new = resolve_config_paths(value, root)
        else:
            continue
        if new is not value and new != value:
            updates[name] = new
    return config.model_copy(update=updates) if updates else config
