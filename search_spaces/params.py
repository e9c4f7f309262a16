"""One tunable parameter: its validated declaration and the single ``trial.suggest_*`` call it makes.

Each class mirrors one Optuna suggest method, and its validators reject exactly what that method
would reject, warn about or silently adjust (Optuna rounds ``high`` down to the step grid with a
warning; we refuse instead, docs/ARCHITECTURE.md rule 1). Values are checked strictly: YAML ``true`` is not
a number and ``8.0`` is not an int.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Annotated, Any, Literal, Union

from optuna.trial import BaseTrial
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from search_spaces.errors import problem

Number = Annotated[float, Strict(), AllowInfNan(False)]  # strict float still accepts YAML ints
Integer = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]
Scalar = Union[None, bool, int, float, str]  # what Optuna's CategoricalDistribution stores


def _on_grid(value: float, low: float, step: float) -> bool:
    """Whether ``value`` is ``low + k * step`` for an integer ``k``.

    Decimal of the shortest repr, because binary floats misjudge it: (0.3 - 0.0) / 0.05 is
    5.999999999999999 in floats but exactly 6 for the numbers the user wrote.
    """
    q = (Decimal(str(value)) - Decimal(str(low))) / Decimal(str(step))
    return q == q.to_integral_value()


class _Param(BaseModel):
    """Shared config: unknown fields are errors, a validated parameter never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def has_default(self) -> bool:
        """Whether the file gave a ``default`` (for categoricals ``default: null`` is a value)."""
        return "default" in self.model_fields_set

    def suggest(self, trial: BaseTrial, name: str) -> Any:
        """Ask ``trial`` for this parameter under the Optuna name ``name``."""
        raise NotImplementedError


class _RangeParam(_Param):
    """Checks shared by float and int ranges."""

    def _check_range(self, low: float, high: float, log: bool, default: float | None) -> None:
        if low >= high:
            raise problem(
                "high",
                f"high ({high}) must be greater than low ({low})",
                "swap low and high, or fix the value in the run config instead of tuning it",
            )
        if log and low <= 0:
            raise problem(
                "low",
                f"log: true needs low > 0 (got {low}); a log scale cannot reach zero",
                "set low to a positive value, or drop `log: true`",
            )
        if "default" in self.model_fields_set:
            if default is None:
                raise problem("default", "null is not a number", "give a number or remove `default`")
            if not low <= default <= high:
                raise problem(
                    "default",
                    f"default {default} is outside [low, high] = [{low}, {high}]",
                    "set default inside the range or widen the range",
                )


class FloatParam(_RangeParam):
    """``trial.suggest_float(name, low, high, step=step, log=log)``."""

    type: Literal["float"]
    low: Number
    high: Number
    log: Flag = False
    step: Number | None = None
    default: Number | None = None

    @model_validator(mode="after")
    def _valid(self) -> "FloatParam":
        if self.log and self.step is not None:
            raise problem(
                "step",
                "`log: true` and `step` are mutually exclusive (as in Optuna's suggest_float)",
                "remove `step` for a log scale, or remove `log` for an evenly stepped grid",
            )
        self._check_range(self.low, self.high, self.log, self.default)
        if self.step is not None:
            if self.step <= 0:
                raise problem("step", f"step must be > 0 (got {self.step})", "use a positive step")
            if not _on_grid(self.high, self.low, self.step):
                raise problem(
                    "step",
                    f"step {self.step} does not divide high - low = {self.high} - {self.low}",
                    "choose low/high/step so that (high - low) / step is a whole number",
                )
            if self.default is not None and not _on_grid(self.default, self.low, self.step):
                raise problem(
                    "default",
                    f"default {self.default} is not on the grid low + k * step "
                    f"({self.low} + k * {self.step})",
                    "pick a default on the grid",
                )
        return self

    def suggest(self, trial: BaseTrial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


class IntParam(_RangeParam):
    """``trial.suggest_int(name, low, high, step=step, log=log)``."""

    type: Literal["int"]
    low: Integer
    high: Integer
    log: Flag = False
    step: Integer = 1
    default: Integer | None = None

    @model_validator(mode="after")
    def _valid(self) -> "IntParam":
        if self.log and self.step != 1:
            # Optuna's suggest_int rejects log=True with step != 1.
            raise problem(
                "step",
                f"`log: true` and `step: {self.step}` are mutually exclusive (Optuna's suggest_int "
                "allows only step 1 on a log scale)",
                "remove `step` for a log scale, or remove `log` for an evenly stepped grid",
            )
        self._check_range(self.low, self.high, self.log, self.default)
        if self.step <= 0:
            raise problem("step", f"step must be >= 1 (got {self.step})", "use a positive step")
        if (self.high - self.low) % self.step:
            raise problem(
                "step",
                f"step {self.step} does not divide high - low = {self.high - self.low}",
                "choose low/high/step so that (high - low) / step is a whole number",
            )
        if self.default is not None and (self.default - self.low) % self.step:
            raise problem(
                "default",
                f"default {self.default} is not on the grid {self.low} + k * {self.step}",
                "pick a default on the grid",
            )
        return self

    def suggest(self, trial: BaseTrial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type: Python says ``1 == 1.0 == True``, a config must not."""
    return type(a) is type(b) and a == b


class CategoricalParam(_Param):
    """``trial.suggest_categorical(name, choices)``; choices are scalars, ``null`` included."""

    type: Literal["categorical"]
    choices: tuple[Any, ...]
    default: Any = None

    @field_validator("choices")
    @classmethod
    def _scalar_choices(cls, choices: tuple[Any, ...]) -> tuple[Any, ...]:
        if not choices:
            raise problem("choices", "choices is empty", "list at least one value")
        for c in choices:
            if not isinstance(c, (type(None), bool, int, float, str)):
                raise problem(
                    "choices",
                    f"{c!r} is a {type(c).__name__}; Optuna categoricals hold only "
                    "null, booleans, numbers and strings",
                    "list scalar values only",
                )
            if isinstance(c, float) and not math.isfinite(c):
                raise problem("choices", f"{c!r} is not a finite number", "remove it")
        for i, c in enumerate(choices):
            # Optuna stores a categorical as the index of choices.index(value), which uses ==,
            # so 1, 1.0 and True in one list would be conflated.
            if any(c == d for d in choices[:i]):
                raise problem(
                    "choices",
                    f"{c!r} is listed twice (or equals an earlier choice, as 1 == 1.0 == true do)",
                    "list each value once",
                )
        return choices

    @model_validator(mode="after")
    def _default_is_a_choice(self) -> "CategoricalParam":
        if self.has_default and not any(_same(self.default, c) for c in self.choices):
            raise problem(
                "default",
                f"default {self.default!r} ({type(self.default).__name__}) is not among choices "
                f"{list(self.choices)!r}",
                "set default to one of the choices (same type: 8 is not 8.0), or add it to choices",
            )
        return self

    def suggest(self, trial: BaseTrial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))


Param = Union[FloatParam, IntParam, CategoricalParam]
# The `type` field picks the class, so an error names the fields of that type only.
ParamSpec = Annotated[Param, Field(discriminator="type")]
PARAM_TYPES: dict[str, type[_Param]] = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}
