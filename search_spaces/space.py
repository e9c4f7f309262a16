"""Combine method spaces into one Optuna define-by-run space for Ray Tune's ``OptunaSearch``.

Naming, the one subtle part:

* Every hyperparameter comes out of :meth:`SearchSpace.define_by_run` under its plain dotted
  run-config key (``train.learning_rate``), plus ``method``.
* With one method, the Optuna parameter names *are* those keys (optuna-dashboard shows readable
  names) and ``method`` is a constant (:meth:`SearchSpace.fixed`).
* With several methods, ``method`` is an Optuna categorical and each method's parameters are
  suggested only when that method is drawn (conditional space: ``lora.rank`` never appears in a
  textual-inversion trial). A key declared by more than one method is suggested under the
  method-qualified Optuna name ``<method>:<key>`` (``lora:train.learning_rate``): Optuna keeps
  one distribution per name per study, and TPE should not model LoRA's and textual inversion's
  learning rates as one variable. The separator is ``:`` rather than ``/`` because Ray's
  ``OptunaSearch`` un-flattens the trial config on ``/``.
* Ray's ``OptunaSearch`` merges every captured ``suggest_*`` value into the trial config next
  to the returned dict, so in a multi-method sweep the config also carries the qualified names;
  :meth:`SearchSpace.flat_params` takes just the plain keys back out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import BaseTrial

from search_spaces.errors import SearchSpaceError
from search_spaces.loading import METHOD, MethodSpace
from search_spaces.params import Param

QUALIFIER = ":"  # <method>:<key>; see the module docstring for why not "/"


@dataclass(frozen=True)
class SuggestedParam:
    """One parameter of one method as the define-by-run function asks for it."""

    key: str  # plain dotted run-config key, as returned
    optuna_name: str  # name given to trial.suggest_*: the key, or <method>:<key> when shared
    spec: Param


@dataclass(frozen=True)
class SearchSpace:
    """A frozen define-by-run search space over one or more training methods.

    Build it with :func:`build_search_space`. Plain data only (no Optuna objects), so it pickles
    with Ray's searcher checkpoints.
    """

    methods: tuple[str, ...]
    entries: tuple[tuple[SuggestedParam, ...], ...]  # aligned with ``methods``

    def define_by_run(self, trial: BaseTrial) -> dict[str, Any]:
        """Suggest one trial's hyperparameters; the callable for ``OptunaSearch(space=...)``.

        Only ``trial.suggest_*`` calls and constants (Ray times this function and warns above
        1 s). Returns the flat dict ``{"method": ..., "<dotted key>": value, ...}``. Also works on
        a finished ``FrozenTrial`` (its suggest methods return the stored values), which turns a
        stored Optuna trial back into plain keys.
        """
        if len(self.methods) == 1:
            method = self.methods[0]
        else:
            method = trial.suggest_categorical(METHOD, list(self.methods))
        out: dict[str, Any] = {METHOD: method}
        for p in self._entries_of(method):
            out[p.key] = p.spec.suggest(trial, p.optuna_name)
        return out

    def warm_start_points(self) -> list[dict[str, Any]]:
        """The known-good defaults, one point per method, for ``points_to_evaluate``.

        Ray's ``OptunaSearch`` with a callable space passes each point unchanged to
        ``study.enqueue_trial``, whose keys are *Optuna* parameter names: so points use exactly
        the names :meth:`define_by_run` suggests under (``method`` and the qualified names in a
        multi-method space). Parameters without a ``default`` are left out and sampled as usual;
        a single-method space whose file declares no defaults gives no point.
        """
        points: list[dict[str, Any]] = []
        for method, entries in zip(self.methods, self.entries):
            point = {p.optuna_name: p.spec.default for p in entries if p.spec.has_default}
            if len(self.methods) > 1:
                point = {METHOD: method, **point}
            if point:
                points.append(point)
        return points

    def param_names(self) -> set[str]:
        """The keys define_by_run *tunes* (plain dotted keys, and ``method`` if it is tuned).

        ``param_names() | fixed().keys()`` is every key define_by_run can return.
        """
        names = {p.key for entries in self.entries for p in entries}
        return names | ({METHOD} if len(self.methods) > 1 else set())

    def fixed(self) -> dict[str, Any]:
        """Constants define_by_run returns without suggesting them (``method`` when one method)."""
        return {METHOD: self.methods[0]} if len(self.methods) == 1 else {}

    def largest(self, method: str, key: str) -> Any:
        """The largest value ``key`` can take in ``method``'s space (a range's ``high``, a
        categorical's largest numeric choice); None when the key is not searched. For data built
        once per sweep and sized by a searched key (DreamBooth's class images)."""
        for p in self._entries_of(method):
            if p.key == key:
                spec = p.spec
                if hasattr(spec, "high"):
                    return spec.high
                numbers = [c for c in getattr(spec, "choices", ()) if isinstance(c, (int, float))
                           and not isinstance(c, bool)]
                return max(numbers) if numbers else None
        return None

    def candidates(self, method: str) -> dict[str, list[Any]]:
        """Every key ``method``'s space searches, with the values that bound it: a range's ``low``
        and ``high``, a categorical's choices. For worst-case planning (``sdsweep plan``)."""
        out: dict[str, list[Any]] = {}
        for p in self._entries_of(method):
            spec = p.spec
            out[p.key] = [spec.low, spec.high] if hasattr(spec, "high") else list(getattr(spec, "choices", ()))
        return out

    def optuna_names(self, method: str) -> dict[str, str]:
        """For one method: plain key -> the Optuna parameter name it is suggested under."""
        return {p.key: p.optuna_name for p in self._entries_of(method)}

    def flat_params(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """One trial's hyperparameters from its (Ray) config, under plain keys only.

        Drops the qualified aliases that ``OptunaSearch`` adds and any other config entries; a
        missing key is an error naming it.
        """
        method = config.get(METHOD, self.fixed().get(METHOD))
        keys = [p.key for p in self._entries_of(method)]
        missing = [k for k in keys if k not in config]
        if missing:
            raise SearchSpaceError(
                f"trial config lacks {missing} of the {method} search space. Fix: pass the config "
                "that SearchSpace.define_by_run produced (via OptunaSearch)"
            )
        return {METHOD: method, **{k: config[k] for k in keys}}

    def _entries_of(self, method: Any) -> tuple[SuggestedParam, ...]:
        try:
            return self.entries[self.methods.index(method)]
        except ValueError:
            raise SearchSpaceError(
                f"method {method!r} is not in this search space; its methods are "
                f"{list(self.methods)}. Fix: add that method's space to the sweep's search spaces"
            ) from None


def build_search_space(spaces: Sequence[MethodSpace]) -> SearchSpace:
    """Combine one space per method into a :class:`SearchSpace` (see the module docstring).

    Errors: no spaces at all, or two spaces for the same method (naming both sources).
    """
    if not spaces:
        raise SearchSpaceError(
            "no search spaces given. Fix: list at least one method's space (e.g. `lora`)"
        )
    seen: dict[str, str] = {}
    for s in spaces:
        if s.method in seen:
            raise SearchSpaceError(
                f"two search spaces for method {s.method!r}: {seen[s.method]} and {s.source}. "
                "Fix: keep one space per method (merge their parameters into one file)"
            )
        seen[s.method] = s.source
    many = len(spaces) > 1
    uses = Counter(name for s in spaces for name, _ in s.params)
    entries = tuple(
        tuple(
            SuggestedParam(
                key=name,
                optuna_name=f"{s.method}{QUALIFIER}{name}" if many and uses[name] > 1 else name,
                spec=spec,
            )
            for name, spec in s.params
        )
        for s in spaces
    )
    return SearchSpace(methods=tuple(s.method for s in spaces), entries=entries)
