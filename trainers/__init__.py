"""Everything that runs inside one trial: models, data, latent cache, trainers, evaluation.

Never imports ray, optuna or wandb (DESIGN.md: frameworks at the edges).
"""

from __future__ import annotations

import importlib
from typing import Any

# method name -> (module, Trainer subclass, settings section in the run config)
TRAINERS: dict[str, tuple[str, str, str]] = {
    "lora": ("trainers.lora", "LoraTrainer", "lora"),
    "textual_inversion": ("trainers.textual_inversion", "TextualInversionTrainer", "textual_inversion"),
    "dreambooth": ("trainers.dreambooth", "DreamBoothTrainer", "dreambooth"),
}


def get_trainer_class(method: str) -> Any:
    """The Trainer subclass for ``method``; an unknown name lists the valid ones."""
    if method not in TRAINERS:
        raise KeyError(f"unknown training method {method!r}; valid methods: {', '.join(sorted(TRAINERS))}")
    module, cls, _ = TRAINERS[method]
    return getattr(importlib.import_module(module), cls)
