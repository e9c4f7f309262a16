"""Load one training method's search space: a shipped name, a YAML path or an inline mapping.

A space file has exactly two keys::

    method: lora                    # the training method these parameters belong to
    params:                         # dotted run-config key -> one parameter declaration
      train.learning_rate: {type: float, low: 1.0e-5, high: 3.0e-3, log: true, default: 1.0e-4}
      lora.rank:           {type: categorical, choices: [4, 8, 16, 32], default: 8}

Every problem in a file is reported at once, each naming the source, the parameter, the field
and the fix (docs/ARCHITECTURE.md rule 1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, StrictStr, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from search_spaces.errors import SearchSpaceError
from search_spaces.params import PARAM_TYPES, Param, ParamSpec
from trainers.config import YamlLoader

_PACKAGE = "search_spaces"  # where the shipped *.yaml files live (package data)
METHOD = "method"  # the flat-dict key (and Optuna name) that holds the chosen training method
# A parameter is a key of the nested run config written with dots: `section.key` or deeper.
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_METHOD_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PARAM_ADAPTER: TypeAdapter[Param] = TypeAdapter(ParamSpec)
_NUMBER_FIELDS = ("low", "high", "step", "default")
_HINTS = {
    "float": "a number like 1.0e-4 (not true/false or quoted text)",
    "int": "a whole number like 8 (not 8.0)",
    "log": "true or false",
    "choices": "a list of scalars like [4, 8, 16] or [null, 5.0]",
}


_Yaml12Loader = YamlLoader  # shared with run and sweep files (trainers/config.py)


class _SpaceDoc(BaseModel):
    """The top level of a space file; parameters are validated one by one afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: StrictStr
    params: dict[StrictStr, Any]


@dataclass(frozen=True)
class MethodSpace:
    """The validated search space of one training method.

    ``params`` keeps the file's order (tuples, not dicts, so the object is hashable and pickles
    into Ray's searcher checkpoints); ``source`` is the file path or ``inline``.
    """

    method: str
    params: tuple[tuple[str, Param], ...]
    source: str

    def param_map(self) -> dict[str, Param]:
        """The parameters as a fresh dict, dotted key -> declaration."""
        return dict(self.params)

    def defaults(self) -> dict[str, Any]:
        """The known-good values the file declares (parameters without ``default`` are absent)."""
        return {name: p.default for name, p in self.params if p.has_default}


def available_spaces() -> list[str]:
    """Names of the space files shipped in this package (``lora`` for ``lora.yaml``)."""
    return sorted(
        entry.name[: -len(".yaml")]
        for entry in resources.files(_PACKAGE).iterdir()
        if entry.name.endswith(".yaml")
    )


def load_space(spec: str | Path | Mapping[str, Any]) -> MethodSpace:
    """Load and validate one method's space.

    ``spec`` is an inline mapping (reported as ``inline`` in errors), a ``Path`` or a string that
    looks like a path (has a ``/`` or ends in ``.yaml``/``.yml``), or the bare name of a shipped
    space such as ``"lora"``. An unknown shipped name is an error listing the available ones.
    """
    if isinstance(spec, Mapping):
        return parse_space(spec, source="inline")
    if isinstance(spec, Path) or "/" in spec or spec.endswith((".yaml", ".yml")):
        return _load_file(Path(spec))
    entry = resources.files(_PACKAGE) / f"{spec}.yaml"
    if not entry.is_file():
        raise SearchSpaceError(
            f"no shipped search space for method {spec!r}; available: {available_spaces()}. "
            "Fix: use one of those names, or pass the path of your own space file "
            "(e.g. spaces/mine.yaml) or an inline mapping"
        )
    space = _parse_text(entry.read_text(encoding="utf-8"), source=str(entry))
    if space.method != spec:
        raise SearchSpaceError(
            f"search space {entry}: says `method: {space.method}` but is shipped as {spec!r}. "
            f"Fix: set `method: {spec}` in the file"
        )
    return space


def _load_file(path: Path) -> MethodSpace:
    if not path.is_file():
        raise SearchSpaceError(
            f"search space file {path} does not exist. Fix: correct the path, or use a shipped "
            f"space by name: {available_spaces()}"
        )
    return _parse_text(path.read_text(encoding="utf-8"), source=str(path))


def _parse_text(text: str, source: str) -> MethodSpace:
    try:
        data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise SearchSpaceError(f"search space {source}: not valid YAML: {err}. Fix the syntax") from err
    if not isinstance(data, Mapping):
        raise SearchSpaceError(
            f"search space {source}: the top level must be a mapping with `method` and `params`, "
            f"got {type(data).__name__}. Fix: see search_spaces/lora.yaml for the format"
        )
    return parse_space(data, source)


def parse_space(data: Mapping[str, Any], source: str) -> MethodSpace:
    """Validate an already-parsed mapping; ``source`` names it in errors."""
    try:
        doc = _SpaceDoc.model_validate(dict(data))
    except ValidationError as err:
        raise SearchSpaceError(_report(source, [_explain_top(e) for e in err.errors()])) from None
    problems: list[str] = []
    if not _METHOD_NAME.fullmatch(doc.method):
        problems.append(
            f"`method: {doc.method}` is not a method name. Fix: use lowercase letters, digits and "
            "underscores, as the trainer registry names methods (lora, textual_inversion)"
        )
    if not doc.params:
        problems.append("`params` is empty. Fix: declare at least one parameter to tune")
    parsed: list[tuple[str, Param]] = []
    for name, raw in doc.params.items():
        name_problem = _check_name(name)
        if name_problem:
            problems.append(f"parameter `{name}`: {name_problem}")
            continue
        try:
            parsed.append((name, _PARAM_ADAPTER.validate_python(raw)))
        except ValidationError as err:
            problems.extend(f"parameter `{name}`, {_explain_param(e, raw)}" for e in err.errors())
    if problems:
        raise SearchSpaceError(_report(source, problems))
    return MethodSpace(method=doc.method, params=tuple(parsed), source=source)


def _report(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"search space {source}: {problems[0]}"
    return f"search space {source} has {len(problems)} problems:\n  - " + "\n  - ".join(problems)


def _check_name(name: str) -> str | None:
    if name == METHOD:
        return (
            "`method` cannot be tuned inside one method's space: the top-level `method:` names "
            "the method, and combining several spaces makes `method` a categorical. Fix: remove it"
        )
    if not _PARAM_NAME.fullmatch(name):
        return (
            "not a dotted run-config key. Fix: write the config section and key, "
            "e.g. `train.learning_rate` or `lora.rank`"
        )
    return None


def _explain_top(err: ErrorDetails) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown top-level key `{key}`. Fix: a space file has only `method` and `params`"
    if err["type"] == "missing":
        return f"top-level key `{key}` is missing. Fix: add it (see search_spaces/lora.yaml)"
    return f"top-level key `{key}`: {err['msg']}. Fix: `method` is a name, `params` a mapping"


def _explain_param(err: ErrorDetails, raw: Any) -> str:
    """Re-word one pydantic error about one parameter as `field ...: what. Fix: how`."""
    kind, loc = err["type"], [str(p) for p in err["loc"]]
    if kind == "value_error":  # our validators: the text already names the field and the fix
        return str(err.get("ctx", {}).get("error", err["msg"]))
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        got = f" (got {raw.get('type')!r})" if isinstance(raw, Mapping) and "type" in raw else ""
        return f"field `type`: missing or unknown{got}. Fix: set `type:` to one of {list(PARAM_TYPES)}"
    if kind in ("model_attributes_type", "dict_type", "model_type") or not loc:
        return (
            f"value {raw!r} is not a mapping of fields. Fix: write e.g. "
            "{type: float, low: 1.0e-5, high: 1.0e-3}"
        )
    ptype, field = loc[0], loc[-1] if len(loc) > 1 else loc[0]
    if kind == "extra_forbidden":
        allowed = ", ".join(PARAM_TYPES[ptype].model_fields)
        return f"field `{field}`: unknown for type {ptype}. Fix: remove it; type {ptype} takes {allowed}"
    if kind == "missing":
        return f"field `{field}`: required for type {ptype}. Fix: add it"
    hint = _HINTS.get(ptype if field in _NUMBER_FIELDS else field, "a value of the right type")
    return f"field `{field}`: {err['msg']} (got {err.get('input')!r}). Fix: write {hint}"
