"""Error classes a user can act on, in a module of their own (standard library only).

Every loader can raise them without importing each other (``trainers.models``, ``trainers.pickles``,
``trainers.scoring_models``), and the ``sdsweep`` command line can catch them by class without
importing torch, diffusers or transformers: ``sdsweep results``, ``best`` and ``report`` must stay
quick. The modules that raise them re-export them (``trainers.config.ConfigError``,
``trainers.data.DatasetError``, ``trainers.base.NonFiniteLossError``, ``trainers.models.ModelLoadError``);
import them from there or from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ModelLoadError(ValueError):
    """A base model or CLIP model could not be loaded; the message names the input and the fix."""


class PickleRefusedError(ModelLoadError):
    """A pickle-format weight file was refused (or could not be read safely)."""


class ConfigError(ValueError):
    """A config file or mapping that cannot be used; the message names the file, key and fix."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing from that step was applied or saved."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the file (or folder) at fault, what is wrong and the fix."""

    path: str
    reason: str


class DatasetError(ValueError):
    """Every problem found in one dataset folder; ``str()`` lists them one per line."""

    def __init__(self, folder: str | Path, problems: list[Problem]) -> None:
        # Both go to args so the error pickles (it crosses process boundaries under Ray).
        super().__init__(str(folder), list(problems))
        self.folder = str(folder)
        self.problems = list(problems)

    def __str__(self) -> str:
        lines = [f"dataset {self.folder}: {len(self.problems)} problem(s):"]
        lines += [f"  {p.path}: {p.reason}" for p in self.problems]
        return "\n".join(lines)
