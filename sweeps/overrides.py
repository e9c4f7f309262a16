"""``--set KEY=VALUE`` overrides of a config file, shared by the commands that read one (``train``,
``run``, ``plan``). Light: imported by ``sdsweep --help``."""

from __future__ import annotations

from typing import Any, Sequence

from trainers.errors import ConfigError


def apply_overrides(data: Any, overrides: Sequence[str], source: str) -> Any:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a raw config mapping."""
    for key, value in parse_set(overrides).items():
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            if isinstance(node.get(p), str) and p == "model":
                node[p] = {"source": node[p]}
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: --set {key}: {p} is not a mapping")
        node[parts[-1]] = value
    return data


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as ``{dotted key: value parsed as YAML}``; an item without ``=``
    or with an empty key is an error (it would otherwise set the key to null, silently)."""
    from trainers.config import yaml_load

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_train_steps=20")
        out[key.strip()] = yaml_load(raw)
    return out
