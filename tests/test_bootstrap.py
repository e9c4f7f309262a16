"""The confirmation's two-way cluster bootstrap (sweeps/bootstrap.py) against simulations with a
known truth, the textbook two-way ANOVA mean squares, and its most degenerate design. Plain numpy
and scipy: no Ray, no torch, a few seconds. (The same through ``paired_bootstrap``, the degenerate
one-prompt and one-seed designs and the verdicts: tests/test_confirm.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sweeps.bootstrap import bootstrap_margins, paired_bootstrap

NOMINAL = 0.95
REPEATS = 2000
# Monte-Carlo standard error of a coverage estimate from REPEATS independent datasets at the
# nominal level: sqrt(0.95 * 0.05 / 2000) = 0.0049. Three of them (0.015) is the tolerance: a
# method whose true coverage is nominal lands outside it with probability ~0.3 %.
TOLERANCE = 3 * math.sqrt(NOMINAL * (1 - NOMINAL) / REPEATS)
MARGIN = 0.1  # the true margin of every simulated dataset


def _design(prompts: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """Every prompt x every seed, as the confirmation generates them."""
    return np.repeat(np.arange(prompts), seeds), np.tile(np.arange(seeds), prompts)


def _simulate(prompts: int, seeds: int, sd_prompt: float, sd_seed: float, sd_image: float,
              rng: np.random.Generator) -> np.ndarray:
    """REPEATS datasets of per-image margins: MARGIN + prompt effect + seed effect + noise."""
    p, s = _design(prompts, seeds)
    return (MARGIN + rng.normal(0, sd_prompt, (REPEATS, prompts))[:, p] + rng.normal(0, sd_seed, (REPEATS, seeds))[:, s]
            + rng.normal(0, sd_image, (REPEATS, prompts * seeds)))


def _iid_percentile(d: np.ndarray, rng: np.random.Generator, resamples: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The former method, written out as a reference: resample the images one by one with
    replacement and take the percentile interval of the resampled mean margin."""
    n = d.shape[1]
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) / n
    return tuple(np.quantile(d @ w.T, [(1 - NOMINAL) / 2, (1 + NOMINAL) / 2], axis=1))


# (sd of the prompt effect, of the seed effect, of the per-image noise) on the paired margin, and
# whether the two-way interval is expected to be near nominal from both sides: where prompts or
# seeds dominate. Where per-image noise dominates it counts that noise twice (once with the
# prompts, once with the seeds) and over-covers; never under.
MIXES = {
    "prompts dominate": ((1.0, 0.0, 1.0), True),
    "seeds dominate": ((0.0, 1.0, 1.0), True),
    "prompts and seeds, little noise": ((1.0, 1.0, 0.2), True),
    "all three": ((0.5, 0.5, 1.0), False),
    "noise only": ((0.0, 0.0, 1.0), False),
}


@pytest.mark.parametrize("mix", list(MIXES), ids=list(MIXES))
def test_two_way_interval_keeps_nominal_coverage_where_the_iid_bootstrap_does_not(mix: str) -> None:
    """6 prompts x 8 seeds (the default confirmation's design): the share of 2000 simulated
    datasets whose 95 % interval contains the true margin."""
    (sd_prompt, sd_seed, sd_image), two_sided = MIXES[mix]
    rng = np.random.default_rng(list(MIXES).index(mix))
    prompts, seeds = _design(6, 8)
    d = _simulate(6, 8, sd_prompt, sd_seed, sd_image, rng)
    out = bootstrap_margins(d[..., None], np.zeros_like(d)[..., None], prompts, seeds, ["m"], "m", {"m": 1.0},
                            {"m": 1.0}, resamples=1000, confidence=NOMINAL)
    coverage = float(np.mean((out["low"] <= MARGIN) & (MARGIN <= out["high"])))
    assert coverage >= NOMINAL - TOLERANCE, (mix, coverage)
    if two_sided:
        assert coverage <= NOMINAL + TOLERANCE, (mix, coverage)
    low, high = _iid_percentile(d, rng)
    iid = float(np.mean((low <= MARGIN) & (MARGIN <= high)))
    if sd_prompt or sd_seed:  # correlated images: the image-by-image bootstrap claims 95 % and covers far less
        assert iid < NOMINAL - TOLERANCE, (mix, iid)
    else:  # independent images: there it was right (the simulation does not fail every method)
        assert abs(iid - NOMINAL) <= TOLERANCE, (mix, iid)


def test_variance_parts_are_the_two_way_anova_mean_squares():
    """Independent reference: for a crossed prompts x seeds table the one-way parts estimate the
    textbook mean squares, var_prompts = MS_prompts / (P S), var_seeds = MS_seeds / (P S), and
    the interaction MS_residual / (P S)."""
    rng = np.random.default_rng(3)
    P, S = 6, 8
    prompts, seeds = _design(P, S)
    d = (rng.normal(0, 1.0, P)[prompts] + rng.normal(0, 0.6, S)[seeds] + rng.normal(0, 0.8, P * S)).reshape(P, S)
    grand = d.mean()
    ms_p = S * ((d.mean(1) - grand) ** 2).sum() / (P - 1)
    ms_s = P * ((d.mean(0) - grand) ** 2).sum() / (S - 1)
    resid = d - d.mean(1, keepdims=True) - d.mean(0, keepdims=True) + grand
    ms_e = (resid ** 2).sum() / ((P - 1) * (S - 1))
    out = bootstrap_margins(d.reshape(1, -1, 1), np.zeros((1, P * S, 1)), prompts, seeds, ["m"], "m", {"m": 1.0},
                            {"m": 1.0}, resamples=40000)
    assert float(out["margin"][0]) == pytest.approx(grand, abs=1e-12)
    # 40000 resamples: the Monte-Carlo error of a variance estimate is a few percent at most
    assert float(out["var_prompts"][0]) == pytest.approx(ms_p / (P * S), rel=0.05)
    assert float(out["var_seeds"][0]) == pytest.approx(ms_s / (P * S), rel=0.05)
    assert float(out["var_images"][0]) == pytest.approx(ms_e / (P * S), rel=0.05)
    se = math.sqrt(ms_p / (P * S) + ms_s / (P * S))
    assert float(out["se"][0]) == pytest.approx(se, rel=0.03)
    df = (ms_p + ms_s) ** 2 / (ms_p ** 2 / (P - 1) + ms_s ** 2 / (S - 1))  # Satterthwaite
    assert float(out["df"][0]) == pytest.approx(df, rel=0.1)


def test_one_prompt_and_one_seed_gives_no_interval_rather_than_a_false_one():
    """One image per model (e.g. a metric that scores one prompt, at one held-out seed): nothing
    measures the spread, so there is no interval and no p-value, and never a separation. (One
    prompt or one seed alone: the paired t interval, tests/test_confirm.py.)"""
    rows_a = [{"prompt": "p", "seed": 1000, "m": 0.4}]
    rows_b = [{"prompt": "p", "seed": 1000, "m": 0.0}]
    r = paired_bootstrap(rows_a, rows_b, ["m"], "m", {"m": 1.0}, scales={"m": 1.0})
    assert r["margin"] == pytest.approx(0.4)
    assert (r["low"], r["high"], r["se"]) == (-math.inf, math.inf, math.inf)
    assert math.isnan(r["p_one_sided"]) and not r["separated"]
    assert r["images_needed"] is None and "one image per model" in r["limit"]
