"""Everything that runs inside one trial: models, data, latent cache, trainers, evaluation.

Never imports ray, optuna or wandb (docs/ARCHITECTURE.md: frameworks at the edges).
"""

from __future__ import annotations

import importlib
import logging
import re
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


# transformers 5 without torchvision (never installed here: docs/ARCHITECTURE.md, "Environment facts") logs,
# once per class, that `CLIPImageProcessor` (and `SiglipImageProcessor`) "requires torchvision;
# falling back to `...Pil`" the first time anything looks the name up -- diffusers' pipeline
# modules do on import, so every `import trainers.*` that reaches diffusers printed two lines.
# The fallback is what we want (load_clip asks for the PIL backend itself). This filter drops
# exactly that notice, and only while transformers' verbosity is at its default (warning):
# TRANSFORMERS_VERBOSITY=info shows it again. Every other record passes, including the PIL
# fallback's own failure (logged at debug) and the error raised when a class really is missing.
_TORCHVISION_FALLBACK = re.compile(r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to "
                                   r"`\w+ImageProcessorPil` for backward compatibility")


class _TorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("transformers").getEffectiveLevel() <= logging.INFO:
            return True
        return not _TORCHVISION_FALLBACK.match(record.getMessage())


# The logger transformers' lazy module logs that notice on (transformers/utils/import_utils.py);
# a filter on the logger that emits a record applies before its handlers, whoever configured them.
_NOTICE_LOGGER = logging.getLogger("transformers.utils.import_utils")
if not any(isinstance(f, _TorchvisionFallbackNotice) for f in _NOTICE_LOGGER.filters):
    _NOTICE_LOGGER.addFilter(_TorchvisionFallbackNotice())
