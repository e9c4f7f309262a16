"""What a search space may change from one trial to the next, and what that costs the sweep.

Every searched key must take effect in the trial or be refused when the sweep file loads: a key a
trial silently ignores gives a leaderboard that looks right and is wrong.

* **Refused keys** (:data:`FIXED_PER_SWEEP`): things one sweep holds for all its trials (the base
  model, the dataset the references and baseline come from, the held-out images). Searching one is
  an error at load, naming the key and why. (Top-level keys such as ``token`` or ``cache_dir`` are
  no dotted ``section.key`` and the space loader refuses them already.)
* **Data keys** (``data.*``, e.g. ``data.resolution``, ``data.random_flip``, ``data.center_crop``):
  each distinct data configuration the space can produce gets its own latent cache, built once per
  sweep by the cache task (content-addressed, so values shared with another sweep are reused) and
  handed to exactly the trials that train on it (:func:`data_variants`, :func:`data_variant_id`).
  They must be searched as categorical choices: a range would need a cache per value.
* **Budgets**: a searched ``train.max_train_steps`` (or batch size) is each trial's own; the
  scheduler's horizon (ASHA's ``max_t``) is the largest any trial can have
  (:func:`largest_value`), and the leaderboard and console read each trial's own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from trainers.errors import ConfigError  # light: `sdsweep results` imports this module

# Keys (and key prefixes) a trial cannot change, with the reason and the fix.
FIXED_PER_SWEEP: dict[str, str] = {
    "model": "a sweep fine-tunes one base model: it is loaded once per worker, and its latent cache and "
             "baseline are built from it; run one sweep per base model",
    "data.path": "the evaluation's reference images, the baseline and the latent cache come from base.data.path; "
                 "compare datasets with one sweep each",
    "data.validation_split": "val_loss compares trials only when every trial is measured on the same held-out images; "
                             "set it in base.data",
    "data.validation_path": "val_loss compares trials only when every trial is measured on the same held-out images; "
                            "set it in base.data",
}
DATA_PREFIX = "data."
MAX_DATA_VARIANTS = 16  # each is a full encode of the dataset (and of DreamBooth's class images)


def refusal(key: str) -> str | None:
    """Why ``key`` cannot be searched (None: it can)."""
    for fixed, why in FIXED_PER_SWEEP.items():
        if key == fixed or key.startswith(fixed + "."):
            return why
    return None


def check_searched_keys(space: Any, source: str) -> None:
    """Refuse a compiled ``SearchSpace`` that searches a key a trial cannot change (the sweep's, or
    one its method builds once for every trial: ``Trainer.fixed_keys``), or a data key as a range
    (each value would need its own latent cache)."""
    from trainers import get_trainer_class  # here: `sdsweep results` imports this module, light

    for method, entries in zip(space.methods, space.entries):
        own = get_trainer_class(method).fixed_keys
        for p in entries:
            why = own.get(p.key) or refusal(p.key)
            if why is not None:
                raise ConfigError(f"{source}: search space of {method} searches {p.key!r}, which a trial cannot "
                                  f"change: {why}")
            if p.key.startswith(DATA_PREFIX) and not hasattr(p.spec, "choices"):
                raise ConfigError(f"{source}: search space of {method} searches {p.key!r} as a range; each value "
                                  "of a data key needs its own latent cache: search it as categorical choices "
                                  f"(e.g. {{type: categorical, choices: [...]}})")


def data_variant_id(data: Any) -> str:
    """A stable short name of one data configuration (its every setting), which a trial computes
    from its own run config to find its latent cache."""
    text = json.dumps(data.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_variants(sweep: Any, source: str = "sweep") -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Every distinct data configuration a trial of ``sweep`` can train on, with the methods whose
    trials can use it: ``{data_variant_id: (DataConfig, methods)}``, ``base.data`` first when some
    method searches no data key. A combination the data section rejects (e.g. a resolution that is
    not a multiple of 8) is an error naming it."""
    from trainers.data import DataConfig

    space = sweep.search_space()
    base = sweep.base.data
    out: dict[str, tuple[Any, list[str]]] = {}
    for method, entries in zip(space.methods, space.entries):
        searched = [(p.key[len(DATA_PREFIX):], tuple(p.spec.choices)) for p in entries
                    if p.key.startswith(DATA_PREFIX) and hasattr(p.spec, "choices")]
        names = [k for k, _ in searched]
        for values in itertools.product(*(c for _, c in searched)):
            try:
                data = DataConfig.model_validate({**base.model_dump(mode="json"), **dict(zip(names, values))})
            except ValueError as err:
                combo = ", ".join(f"data.{k}={v!r}" for k, v in zip(names, values))
                errors = getattr(err, "errors", None)
                why = "; ".join(e["msg"].removeprefix("Value error, ") for e in errors()) if errors else str(err)
                raise ConfigError(f"{source}: search space of {method}: {combo} is not a valid data section: "
                                  f"{why}") from None
            out.setdefault(data_variant_id(data), (data, []))[1].append(method)
    if len(out) > MAX_DATA_VARIANTS:
        raise ConfigError(f"{source}: the search spaces produce {len(out)} distinct data configurations (searched "
                          f"data.* keys multiply); each needs its own latent cache, at most {MAX_DATA_VARIANTS}: "
                          "search fewer data keys or fewer choices")
    return {vid: (data, tuple(methods)) for vid, (data, methods) in out.items()}


def largest_value(sweep: Any, key: str) -> Any:
    """The largest value ``key`` (a dotted run-config key such as ``train.max_train_steps``) takes
    in any trial of ``sweep``: the largest of each method's search space where it is searched,
    else the base run config's value."""
    space = sweep.search_space()
    node: Any = sweep.base
    for part in key.split("."):
        node = getattr(node, part)
    values = [node if (v := space.largest(m, key)) is None else v for m in space.methods]
    return max(values)


def trial_value(params: dict[str, Any], key: str, default: Any) -> Any:
    """A trial's value of ``key`` from its flat parameters (plain or ``<method>:<key>`` qualified,
    as OptunaSearch's configs carry them), else ``default`` (the base run config's)."""
    if key in params:
        return params[key]
    qualified = [v for k, v in params.items() if k.endswith(":" + key)]
    return qualified[0] if qualified else default
