"""The light table of metric directions (trainers/metric_modes.py) agrees with the metric registry."""

from __future__ import annotations

from trainers.metric_modes import IMAGE_METRIC_MODES, natural_mode
from trainers.metrics import COMPOSITE, METRICS


def test_every_registered_metric_has_its_direction_in_the_light_table() -> None:
    assert set(IMAGE_METRIC_MODES) == set(METRICS)
    for name, cls in METRICS.items():
        assert IMAGE_METRIC_MODES[name] == ("max" if cls.higher_is_better else "min"), name
        assert natural_mode(name) == IMAGE_METRIC_MODES[name]


def test_losses_go_down_scores_and_the_composite_go_up() -> None:
    assert natural_mode(COMPOSITE) == "max" and natural_mode("steps_per_s") == "max"
    assert [natural_mode(m) for m in ("val_loss", "fixed_train_loss", "train_loss", "unknown_thing")] == ["min"] * 4
