"""The Optuna sampler and storage a sweep uses, from typed settings and a URL.

Every sampler setting is passed explicitly so a new Optuna release cannot change a sweep's
behaviour behind our back (Optuna 5's TPESampler, for one, defaults ``constant_liar`` to True and
deprecates seven of its other arguments).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import optuna
from optuna.storages.journal import JournalFileBackend
from pydantic import BaseModel, ConfigDict, Field, model_validator

from search_spaces.errors import SearchSpaceError, problem

# TPE's expected-improvement candidates per suggestion: Optuna's default, pinned (see module doc).
N_EI_CANDIDATES = 24
_TPE_ONLY = ("multivariate", "constant_liar", "n_startup_trials", "group")


class SamplerSettings(BaseModel):
    """How Optuna proposes hyperparameters (the sweep file's sampler section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["tpe", "random"] = "tpe"
    # numpy's RandomState takes seeds in [0, 2**32).
    seed: int = Field(default=0, ge=0, lt=2**32)
    # Multivariate TPE models parameters jointly (lr and rank interact) instead of one by one.
    multivariate: bool = True
    # Parallel trials: running trials count as bad "lied" results, so concurrent proposals differ.
    constant_liar: bool = True
    # Random proposals before TPE starts modelling; warm-start (enqueued) trials count toward it.
    n_startup_trials: int = Field(default=4, ge=0)
    # Model each group of co-occurring parameters separately: the per-method (conditional)
    # spaces would otherwise fall back to independent sampling. Needs multivariate.
    group: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "SamplerSettings":
        if self.type == "tpe" and self.group and not self.multivariate:
            raise problem(
                "group",
                "group: true needs multivariate: true (Optuna's TPESampler rejects it otherwise)",
                "set multivariate: true, or group: false",
            )
        if self.type == "random":
            # Compare with the defaults, not model_fields_set: a dumped-and-reloaded config (Ray
            # ships configs to workers, resume reloads sweep.json) sets every field explicitly.
            defaults = type(self).model_fields
            given = sorted(k for k in _TPE_ONLY if getattr(self, k) != defaults[k].default)
            if given:
                raise problem(
                    given[0],
                    f"{given} only apply to type: tpe and would be ignored by the random sampler",
                    "remove them, or use type: tpe",
                )
        return self


def make_sampler(s: SamplerSettings) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``s``, every setting passed explicitly.

    TPE arguments that Optuna 5 deprecated (``consider_prior``, ``prior_weight``,
    ``consider_magic_clip``, ``consider_endpoints``, ``gamma``, ``weights``,
    ``warn_independent_sampling``) warn when passed at all, so those stay at Optuna's values.
    """
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with warnings.catch_warnings():
        # `group` is marked experimental since Optuna 2.8 and warns on every construction; we
        # chose it deliberately (see SamplerSettings.group), so that one warning is noise.
        warnings.filterwarnings(
            "ignore", category=optuna.exceptions.ExperimentalWarning, message=".*group.*"
        )
        return optuna.samplers.TPESampler(
            seed=s.seed,
            multivariate=s.multivariate,
            group=s.group,
            constant_liar=s.constant_liar,
            n_startup_trials=s.n_startup_trials,
            n_ei_candidates=N_EI_CANDIDATES,
        )


_STORAGE_FORMS = (
    "omit it (in-memory), `sqlite:///relative/path.db` / `sqlite:////absolute/path.db`, "
    "or `journal:path/to/file.log`"
)


def make_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """The Optuna storage for the sweep file's ``search.storage`` URL.

    * ``None``: ``None`` -- Optuna's in-memory storage (gone when the driver exits).
    * ``sqlite:///path/to.db`` (relative; four slashes for an absolute path): an ``RDBStorage``.
      View it with ``optuna-dashboard sqlite:///path/to.db``.
    * ``journal:path/to/file.log``: a ``JournalStorage`` over a ``JournalFileBackend`` (an
      append-only file, safe on file systems where SQLite locking is not). View it with
      ``optuna-dashboard path/to/file.log``.

    Parent directories are created. Anything else raises :class:`SearchSpaceError` naming
    ``search.storage`` and the accepted forms.
    """
    parsed = parse_storage_url(url)
    if parsed is None:
        return None
    kind, path = parsed
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        return optuna.storages.RDBStorage(url)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def parse_storage_url(url: str | None) -> tuple[str, Path] | None:
    """Check a ``search.storage`` URL without touching the disk: ``("sqlite" | "journal", file)``,
    or ``None`` for in-memory. Raises :class:`SearchSpaceError` naming the key and the forms."""
    if url is None:
        return None
    for kind, prefix in (("sqlite", "sqlite:///"), ("journal", "journal:")):
        if url.startswith(prefix):
            path = url[len(prefix):].split("?", 1)[0]
            if not path or path == ":memory:":
                raise SearchSpaceError(
                    f"search.storage: {url!r} names no {kind} file. Fix: use {_STORAGE_FORMS}"
                )
            return kind, Path(path)
    raise SearchSpaceError(
        f"search.storage: {url!r} is not a storage URL this tool accepts. Fix: {_STORAGE_FORMS}"
    )
