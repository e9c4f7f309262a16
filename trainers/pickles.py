"""Pickle-format weight files (``.ckpt``/``.pt``/``.pth``/``.bin``): refused by default, and when the
user opts in, read only with ``torch.load(weights_only=True)`` (:func:`load_weights_only`).

When torch refuses a file, its own message is unfit for a user: its first line advises re-running
with the unsafe setting, and a malformed zip surfaces a C++ internal (``Expected
hasRecord("version")``). The refusals here say instead what made the file unsafe: the Python
globals its pickle references, read with :mod:`pickletools` (which parses opcodes and executes
nothing), or what is wrong with a zip's layout.

Why not ``torch.serialization.get_unsafe_globals_in_checkpoint`` (torch 2.13.0): it does the same
kind of static scan (``_weights_only_unpickler.get_globals_in_pkl`` reads opcodes and runs nothing:
no malicious file below ran its payload), but only on part of what we must name. Checked by running
it on files made with torch 2.13 (``tests/test_models_safety.py::test_torch_own_scan_is_no_substitute``):

* a legacy (non-zip) ``torch.save(..., _use_new_zipfile_serialization=False)`` file, or a plain
  pickle: ``ValueError: Expected input to be a checkpoint returned by torch.save``, no names;
* a zip that is not torch.save's layout (``archive/data.pkl`` without ``version``, or a flat
  ``data.pkl``): the C++ reader's ``RuntimeError`` (``Expected hasRecord("version")``, ``file in
  archive is not in a subdirectory``), the message this module exists to keep from users;
* a pickle of protocol 4 or 5 inside torch.save's own layout (``torch.save(obj, f,
  pickle_protocol=4)``): its scanner knows the opcodes torch.save's default protocol 2 uses and
  raises ``UnpicklingError: Unsupported operand 149`` (``FRAME``), so a malicious file of that kind
  is refused without naming what it would run. (``torch.load(weights_only=True)`` refuses such
  files too, harmless ones included, with the same operand error.)

Where it does answer (a protocol-2 pickle in torch.save's layout) it names the same globals as
:func:`unsafe_globals` (as a set; its allowlist is also whatever ``add_safe_globals`` put in the
process). The hand-written scan is kept for the rest; revisit when torch's scanner grows.

Imports no other loader (only ``trainers.errors``), so every loader may import it.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from trainers.errors import ModelLoadError, PickleRefusedError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# What a tensors-only torch.save pickle may reference: torch's own names (tensor/storage rebuild
# functions, dtypes) plus the non-torch globals torch 2.13's weights_only unpickler allows by
# default (torch._weights_only_unpickler._get_allowed_globals). Anything else is what that
# unpickler blocks and what a malicious file needs.
_TENSOR_MODULES = ("torch",)
_TENSOR_GLOBALS = frozenset({"collections.OrderedDict", "collections.Counter", "_codecs.encode",
                             "builtins.bytearray", "builtins.set", "builtins.complex"})
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                         "SHORT_BINSTRING", "BINSTRING", "STRING"})
_MARK = object()
_MAX_PICKLES = 16  # the legacy (non-zip) torch.save format is a few pickles in a row


def _globals_of_one(stream: BinaryIO) -> list[str]:
    """Globals referenced by the pickle starting at ``stream``'s position (read up to its STOP).

    Simulates only as much of the unpickler's stack as naming ``STACK_GLOBAL`` operands needs:
    strings and memo references are tracked, every other value is an anonymous placeholder.
    """
    found: list[str] = []
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):  # protocols 0-3: "module name" in the operand
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
        elif name == "STACK_GLOBAL":  # protocol 4+: module and name are the two topmost strings
            module, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
            found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str)
                         else "<a global named by computed strings>")
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1] if stack else None
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
            continue
        before, after = op.stack_before, op.stack_after
        if pickletools.stackslice in before:  # pops everything down to (and including) the mark
            while stack and stack.pop() is not _MARK:
                pass
            below = before.index(pickletools.markobject)
        else:
            below = len(before)
        if below:
            del stack[max(0, len(stack) - below):]
        for kind in after:
            if kind is pickletools.markobject:
                stack.append(_MARK)
            elif name in _STRING_OPS:
                stack.append(arg)
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(int(arg)))
            else:
                stack.append(None)
    return found


def pickle_globals(stream: BinaryIO) -> list[str]:
    """Every ``module.name`` global the pickle(s) read from ``stream`` reference, in order, without
    unpickling. A truncated or non-pickle tail ends the scan (what was found so far is kept)."""
    found: list[str] = []
    for _ in range(_MAX_PICKLES):
        start = stream.tell()
        if not stream.read(1):
            break
        stream.seek(start)
        try:
            found += _globals_of_one(stream)
        except Exception:  # noqa: BLE001 - raw tensor bytes or garbage after the last pickle
            break
    return found


def _zip_pickle(z: zipfile.ZipFile) -> bytes | None:
    pkl = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    return z.read(min(pkl, key=len)) if pkl else None


def unsafe_globals(path: Path) -> list[str]:
    """The globals ``path``'s pickle references beyond what a tensors-only checkpoint needs,
    deduplicated in order of appearance (empty if none or if the file holds no readable pickle)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                found = pickle_globals(io.BytesIO(_zip_pickle(z) or b""))
        else:
            with open(path, "rb") as f:  # streamed: a legacy-format file can be gigabytes
                found = pickle_globals(f)
    except (OSError, zipfile.BadZipFile):
        return []
    names: list[str] = []
    for g in found:
        if g.startswith("__builtin__."):  # protocol 2 spells builtins the Python 2 way
            g = "builtins." + g.removeprefix("__builtin__.")
        module = g.split(".", 1)[0]
        if module in _TENSOR_MODULES or g in _TENSOR_GLOBALS or g in names:
            continue
        names.append(g)
    return names


def zip_layout_problem(path: Path) -> str | None:
    """What keeps zip archive ``path`` from being a checkpoint torch.save wrote, or None.

    torch.save writes every entry under one top-level folder, with ``<folder>/data.pkl`` and a
    ``<folder>/version`` (or ``<folder>/.data/version``) record; torch.load's C++ reader rejects
    anything else with internal messages.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"the zip archive cannot be read ({e})"
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or any("/" not in n for n in names):
        return "its entries are not all inside one top-level folder, as torch.save writes them"
    top = next(iter(tops))
    if f"{top}/data.pkl" not in names:
        return f"it has no {top}/data.pkl (the pickle torch.save writes)"
    if f"{top}/version" not in names and f"{top}/.data/version" not in names:
        return f"it has no {top}/version record (torch.save writes one)"
    return None


def refuse_pickle(path: Path) -> PickleRefusedError:
    """The refusal of a pickle weight file the user has not opted in to."""
    return PickleRefusedError(
        f"{path}: refusing to load a pickle-format weight file. Unpickling can run arbitrary code "
        "hidden in the file, so sdsweep only reads .safetensors by default. Prefer a .safetensors "
        "copy of this model. If you trust the file, opt in with `model.allow_pickle: true` in the "
        "sweep config (allow_pickle=True in Python); it is then read with "
        "torch.load(weights_only=True), which accepts tensors only and never executes code."
    )


BY_TORCH = "torch.load(weights_only=True) blocked it"
BY_SCAN = ("sdsweep refused it from its pickle's instructions, read without running any, before "
           "torch.load(weights_only=True) saw it")


def unsafe_pickle(path: Path, blocked: list[str], how: str = BY_TORCH) -> PickleRefusedError:
    """The refusal of an opted-in pickle that references code. Never repeats torch's advice to
    re-run with the unsafe setting: for a file like this, that advice runs the attacker's code."""
    what = (f"references the Python global(s) {', '.join(blocked[:5])}" if blocked
            else "holds Python objects other than tensors")
    return PickleRefusedError(
        f"{path}: refused, this file is unsafe. Its pickle {what}, which a checkpoint of weights "
        f"never needs and which unpickling would run as code. {how}; nothing in the file was run. "
        "Do not load it in any other way: get the model as .safetensors from a source you trust."
    )


def load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """The opted-in pickle path: tensors only, never ``weights_only=False``.

    torch's own messages are not passed on: a refusal's first line advises the unsafe setting,
    and a zip it cannot parse surfaces C++ internals (``Expected hasRecord("version")``).
    """
    if zipfile.is_zipfile(path) and (problem := zip_layout_problem(path)) is not None:
        if blocked := unsafe_globals(path):
            raise unsafe_pickle(path, blocked, BY_SCAN)
        raise ModelLoadError(
            f"{path}: a zip archive but not a checkpoint torch.save wrote: {problem}. sdsweep does "
            "not read it. Get the model as .safetensors (or as a torch.save file) from its source."
        )
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise unsafe_pickle(path, unsafe_globals(path)) from e
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable torch checkpoint: {type(e).__name__}: {e}") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # CompVis/Lightning checkpoints nest the weights
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)] if isinstance(obj, dict) else ["<root>"]
    if bad:
        raise ModelLoadError(f"{path}: expected a state dict of tensors; non-tensor entries: {bad[:5]}")
    return obj
