"""What a sweep checks before Ray, the cache build or the baseline start (``sdsweep run`` and
``resume``), and before ``sdsweep init`` writes a file: every image of the dataset (one error
listing every bad file), then each searched method's own check of the trial run configs its
search space can produce (``Trainer.check_run``: textual inversion's placeholder and captions),
against the base model's tokenizer loaded alone. A problem found here costs seconds; found in a
trial it costs the Ray start, the cache build and the baseline first.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

from sweeps.config import SweepConfig, trial_run_config
from trainers.errors import ConfigError

def preflight_sweep(cfg: SweepConfig, source: str | None = None) -> None:
    """Check ``cfg``'s dataset (every data configuration its space can produce,
    ``sweeps.searched.data_variants``) and every searched method's trial run configs against the
    captions of the data they train on. Raises ``DatasetError`` or ``ConfigError`` (naming
    ``source``, default the sweep's name, the method, the values checked and the key at fault)."""
    from sweeps.searched import data_variants
    from trainers import get_trainer_class
    from trainers.data import preflight, split_validation
    from trainers.model_configs import load_tokenizer
    from trainers.run import validation_records

    source = source or f"sweep {cfg.name!r}"
    tokenizer = functools.cache(lambda: load_tokenizer(cfg.base.model))
    space = cfg.search_space()
    defaults = space_defaults(cfg)
    for data, methods in data_variants(cfg, source).values():
        records = preflight(data, require_captions=True)
        captions = [r.caption for r in split_validation(records, data)[0]]
        held = validation_records(cfg.base.model_copy(update={"data": data}), records)
        validation_captions = [r.caption for r in held[0]] if held else []
        for method in methods:
            trainer = get_trainer_class(method)
            for values in checked_values(space.candidates(method), trainer.check_keys):
                params = {**defaults.get(method, {}), "method": method, **values}
                where = f"{source}: {method} trials" + (f" with {_shown(values)}" if values else "")
                run_cfg = trial_run_config(cfg, params, source=where)
                try:
                    trainer.check_run(run_cfg, captions, validation_captions, tokenizer)
                except ValueError as err:
                    raise ConfigError(f"{where}: {err}") from None


def space_defaults(cfg: SweepConfig) -> dict[str, dict[str, Any]]:
    """Each searched method's search-space defaults (the values its warm-start trial uses)."""
    from search_spaces import load_space

    return {s.method: s.defaults() for s in (load_space(x) for x in cfg.search.spaces)}


def checked_values(candidates: dict[str, list[Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The values of ``keys`` to check: every combination of the values that bound each searched
    one (``SearchSpace.candidates``); one empty mapping (the base's values) when none is searched."""
    searched = {k: candidates[k] for k in keys if k in candidates}
    if not searched:
        return [{}]
    return [dict(zip(searched, combo)) for combo in itertools.product(*searched.values())]


def _shown(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())
