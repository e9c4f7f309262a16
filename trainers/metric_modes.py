"""The direction in which each metric improves, standard library only.

``sdsweep results``, ``best`` and ``report`` rank checkpoints by a metric's direction without
importing the metrics themselves (``trainers.metrics`` needs torch and the scoring models).
``tests/test_metric_modes.py`` checks :data:`IMAGE_METRIC_MODES` against every metric registered
in ``trainers.metrics.METRICS``, so a new metric without a direction here fails the tests.
"""

from __future__ import annotations

COMPOSITE = "composite"

# Each registered image metric (trainers.metrics.METRICS) by its ``higher_is_better``.
IMAGE_METRIC_MODES = {
    "clip_t": "max",
    "clip_i": "max",
    "dino": "max",
    "drift": "max",
    "drift_dino": "max",
    "pickscore": "max",
    "concept_rate": "max",
    "prior_kept": "max",
}

# What every trial reports at each evaluation, with its natural direction; with
# ``evaluation.images`` set, trials also report each image metric and ``composite`` (all "max").
REPORTED_METRICS = {
    "fixed_train_loss": "min",
    "val_loss": "min",  # only with held-out images (base.data.validation_split / validation_path)
    "train_loss": "min",
    "steps_per_s": "max",
    "samples_per_s": "max",
}


def natural_mode(metric: str) -> str:
    """The direction in which ``metric`` improves (anything unknown: lower is better, as a loss)."""
    if metric in REPORTED_METRICS:
        return REPORTED_METRICS[metric]
    if metric == COMPOSITE:
        return "max"
    return IMAGE_METRIC_MODES.get(metric, "min")
