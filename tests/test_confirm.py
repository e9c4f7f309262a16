"""Held-out confirmation statistics: the paired bootstrap against closed-form references."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from sweeps.confirm import paired_bootstrap, verdict
from trainers.metrics import composite


def _rows(values: dict[str, list[float | None]]) -> list[dict]:
    n = len(next(iter(values.values())))
    return [{"prompt": f"p{i % 4}", "seed": i, **{m: v[i] for m, v in values.items()}} for i in range(n)]


def test_margin_of_one_metric_matches_the_paired_mean_difference_and_its_standard_error():
    rng = random.Random(0)
    n = 400
    a = [rng.gauss(0.30, 0.05) for _ in range(n)]
    b = [x - 0.004 + rng.gauss(0, 0.02) for x in a]  # paired: b tracks a, a little lower
    stats = paired_bootstrap(_rows({"clip_i": a}), _rows({"clip_i": b}), ["clip_i"], "clip_i", {"clip_i": 1.0},
                             resamples=4000, seed=1)
    d = np.array(a) - np.array(b)
    assert stats["margin"] == pytest.approx(d.mean(), abs=1e-12)
    se = d.std(ddof=1) / math.sqrt(n)  # the textbook standard error of a paired mean difference
    assert stats["se"] == pytest.approx(se, rel=0.1)
    assert stats["low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.3 * se)
    assert stats["high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.3 * se)
    assert stats["separated"] == (stats["low"] > 0)


def test_composite_margin_uses_each_metrics_own_images_and_scales():
    # clip_i scores only the token prompts' images, concept_rate likewise, clip_t every image.
    a = {"clip_t": [30.0, 28.0, 26.0, 31.0], "clip_i": [0.8, None, 0.7, None]}
    b = {"clip_t": [29.0, 29.0, 25.0, 30.0], "clip_i": [0.6, None, 0.5, None]}
    w = {"clip_t": 0.2, "clip_i": 0.8}
    stats = paired_bootstrap(_rows(a), _rows(b), ["clip_t", "clip_i"], "composite", w, resamples=200)

    def score(v: dict) -> float:
        means = {m: float(np.mean([x for x in xs if x is not None])) for m, xs in v.items()}
        return composite(means, w)  # the evaluator's own composite of the per-metric means

    assert stats["margin"] == pytest.approx(score(a) - score(b), abs=1e-12)


def test_indistinguishable_models_get_how_many_images_would_separate_them():
    n = 32
    a = [1.0] * 16 + [0.0] * 16
    b = [0.0, 0.0] + a[2:16] + [1.0] + a[17:]  # two images lost, one gained: margin 1/32
    stats = paired_bootstrap(_rows({"concept_rate": a}), _rows({"concept_rate": b}), ["concept_rate"],
                             "concept_rate", {"concept_rate": 1.0}, resamples=2000)
    assert stats["margin"] == pytest.approx(1 / 32) and not stats["separated"]
    # Independent reference: the closed-form standard error of the paired mean difference, and
    # n' = n (z se / margin)^2 from se ~ 1/sqrt(n).
    d = np.array(a) - np.array(b)
    se = d.std(ddof=1) / math.sqrt(n)
    expected = n * (1.959964 * se / d.mean()) ** 2
    assert stats["images_needed"] > n and stats["images_needed"] == pytest.approx(expected, rel=0.25)
    line = verdict({"runner_up": stats}, "concept_rate", n, 4)[0]
    assert "indistinguishable" in line and f"{stats['images_needed']} images per model" in line
    same = paired_bootstrap(_rows({"concept_rate": a}), _rows({"concept_rate": a}), ["concept_rate"],
                            "concept_rate", {"concept_rate": 1.0}, resamples=200)
    assert same["margin"] == 0 and same["images_needed"] is None


def test_images_must_be_paired():
    a = _rows({"clip_t": [1.0, 2.0]})
    b = list(reversed(_rows({"clip_t": [1.0, 2.0]})))
    with pytest.raises(ValueError, match="same \\(prompt, seed\\)"):
        paired_bootstrap(a, b, ["clip_t"], "clip_t", {"clip_t": 1.0})
