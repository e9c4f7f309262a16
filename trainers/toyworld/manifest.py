"""``manifest.json``: the sha256 of every file of a toy-world directory, plus build facts.

``verify`` re-hashes every file and names each one that is missing, extra or changed, so a
corrupted or hand-edited weight file is caught before anyone trusts a gate measured with it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from trainers.tensor_files import atomic_write_text

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """The directory does not match its manifest; the message names every offending file."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``root`` except the manifest itself."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    }


def write_manifest(root: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under ``root`` and write ``manifest.json`` with ``info`` alongside."""
    manifest = {**info, "files": file_hashes(root)}
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """The parsed manifest of ``root``; ManifestError if it is missing or unreadable."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; build the directory with `python -m trainers.toyworld build`")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path}: has no 'files' table")
    return manifest


def verify(root: Path) -> int:
    """Check every file of ``root`` against its manifest; return the number of files checked."""
    expected: dict[str, str] = read_manifest(root)["files"]
    actual = file_hashes(root)
    problems = [f"{root / n}: missing" for n in sorted(set(expected) - set(actual))]
    problems += [f"{root / n}: not in the manifest" for n in sorted(set(actual) - set(expected))]
    problems += [
        f"{root / n}: sha256 {actual[n][:12]}... does not match the manifest's {expected[n][:12]}..."
        for n in sorted(set(expected) & set(actual))
        if actual[n] != expected[n]
    ]
    if problems:
        raise ManifestError(f"{len(problems)} file(s) do not match {root / MANIFEST_NAME}:\n  " + "\n  ".join(problems))
    return len(expected)
