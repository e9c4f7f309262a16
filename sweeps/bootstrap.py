"""The held-out confirmation's statistics: a paired two-way cluster bootstrap over prompts and seeds.

Two models are scored on the same images, one per (prompt, seed). Images that share a prompt are
correlated (a prompt one model draws better helps it on every seed), and so are images that share
a seed (the same starting noise for both models). Resampling the images one by one treats them as
independent and makes the interval too narrow; here the *prompts* and the *seeds* are resampled,
each with replacement and independently of the other, and an image enters a resample with weight
(times its prompt was drawn) x (times its seed was drawn) (the "pigeonhole" bootstrap of crossed
designs: McCullagh 2000, Owen 2007).

The interval is not the percentile interval of those resamples. With the few prompts a confirmation
has (4-6), percentiles cover far less than they claim when prompts matter (measured: 85-92 % for a
nominal 95 %; docs/EVALUATION.md), because a bootstrap over a handful of clusters cannot know how
heavy the tails of its own variance estimate are. So the same resamples are split into their
prompt part (only the prompt draw applied), their seed part (only the seed draw) and the rest
(what neither explains: the per-image noise, used only to say how many seeds would help), and the
interval is ``margin +- t * se`` with

* ``se**2 = V_p + V_s``: each one-way cluster variance with its small-sample factor k/(k-1) for k
  prompts or seeds. For margin = prompt effect + seed effect + noise its expectation is the true
  variance plus the noise term once more (the noise is in both parts): never too small, and
  conservative where the noise dominates;
* ``t``: Student's t quantile with Satterthwaite's degrees of freedom
  ``(V_p + V_s)**2 / (V_p**2/(P-1) + V_s**2/(S-1))``: about P-1 when prompts dominate, S-1 when
  seeds do.

Measured coverage and the simulation behind it: docs/EVALUATION.md and tests/test_bootstrap.py.
The one-sided p-value of margin <= 0 is the same t's tail, so ``separated`` agrees with it.

Degenerate designs: with one prompt, the prompt part is zero and the interval is the paired t
interval over the seeds (likewise with one seed, over the prompts). With one prompt and one seed
(one image per model, e.g. a metric that scores a single prompt at a single seed) nothing measures
the spread: the interval is (-inf, +inf), never separated, and the p-value is NaN.

numpy only at import (no Ray, no torch); scipy's t distribution is imported when a margin is
computed.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

METHOD = "two-way cluster bootstrap (prompts x seeds), t interval"


def _values(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> np.ndarray:
    """Per-image scores as an (images, metrics) array, NaN where a metric does not score an image."""
    return np.array([[np.nan if r.get(m) is None else float(r[m]) for m in metrics] for r in rows],
                    dtype=float).reshape(len(rows), len(metrics))


def _aggregate(values: np.ndarray, weights: np.ndarray, metrics: Sequence[str], target: str,
               composite: Mapping[str, float], scales: Mapping[str, float]) -> np.ndarray:
    """``target`` (a metric or ``composite``) for each row of image weights ``weights`` (resamples,
    images): shape ``(..., resamples)`` for ``values`` of shape ``(..., images, metrics)``.

    Each metric is the weighted mean over the images it scores, as the evaluator computes it
    (CLIP-T's clamp at 0 is not applied: it only matters for a mean below 0, an unusable model).
    """
    mask = ~np.isnan(values)
    sums = np.swapaxes(np.where(mask, values, 0.0), -1, -2) @ weights.T  # (..., metrics, resamples)
    counts = np.swapaxes(mask, -1, -2).astype(float) @ weights.T
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.swapaxes(sums / counts, -1, -2)
    if target != "composite":
        return means[..., list(metrics).index(target)]
    total = sum(composite.values())
    return sum(w * scales[k] * means[..., list(metrics).index(k)] for k, w in composite.items()) / total


def _index(labels: Sequence[Any]) -> tuple[np.ndarray, int]:
    """Each label's level number (in order of first appearance) and the number of levels."""
    levels: dict[Any, int] = {}
    return np.array([levels.setdefault(x, len(levels)) for x in labels], dtype=int), len(levels)


def cluster_weights(prompts: np.ndarray, seeds: np.ndarray, resamples: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image weights of ``resamples`` two-way cluster resamples, each ``(resamples, images)``.

    ``prompts``/``seeds``: each image's prompt and seed level (0..k-1). The k prompts are drawn k
    times with replacement, the seeds likewise, independently; returns the weights with both draws
    applied (count of the image's prompt x count of its seed), with only the prompt draw, and with
    only the seed draw.
    """
    n_prompts, n_seeds = int(prompts.max()) + 1, int(seeds.max()) + 1
    by_prompt = rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=resamples).astype(float)
    by_seed = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=resamples).astype(float)
    p, s = by_prompt[:, prompts], by_seed[:, seeds]
    return p * s, p, s


def _part(d: np.ndarray, k: int) -> np.ndarray:
    """One-way cluster variance of replicates ``d`` (last axis) with its k/(k-1) factor; 0 for k = 1.
    Replicates that are NaN (a resample without any image the target scores) are left out."""
    if k < 2:
        return np.zeros(d.shape[:-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanvar(d, axis=-1) * k / (k - 1)


def t_interval(margin: Any, var_prompts: Any, var_seeds: Any, n_prompts: int, n_seeds: int,
               confidence: float) -> dict[str, np.ndarray]:
    """``margin +- t se`` from the two variance parts (module docstring), with the degrees of
    freedom and the one-sided p-value of margin <= 0; elementwise over arrays. A part whose factor
    has one level carries no degrees of freedom; with neither above one level the interval is
    unbounded, and with no spread at all (every image pair differs by the same amount) it is the
    margin itself."""
    from scipy.special import stdtr, stdtrit  # Student's t CDF and quantile, real-valued df

    margin = np.asarray(margin, dtype=float)
    parts = [(np.asarray(v, dtype=float), k - 1) for v, k in ((var_prompts, n_prompts), (var_seeds, n_seeds)) if k > 1]
    if not parts:
        inf = np.full(margin.shape, np.inf)
        return {"se": inf, "df": np.zeros(margin.shape), "low": -inf, "high": inf,
                "p_one_sided": np.full(margin.shape, np.nan)}
    var = sum(v for v, _ in parts)
    spread = var > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        df = np.where(spread, var ** 2 / sum(v ** 2 / d for v, d in parts), np.inf)
        se = np.sqrt(var)
        half = np.where(spread, stdtrit(df, 1 - (1 - confidence) / 2) * se, 0.0)
        p = np.where(spread, stdtr(df, -margin / se), (margin <= 0).astype(float))
    return {"se": se, "df": df, "low": margin - half, "high": margin + half, "p_one_sided": p}


def bootstrap_margins(values_a: np.ndarray, values_b: np.ndarray, prompts: np.ndarray, seeds: np.ndarray,
                      metrics: Sequence[str], target: str, composite: Mapping[str, float],
                      scales: Mapping[str, float], *, resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """The margin ``target(a) - target(b)`` and its interval for every dataset in a batch.

    ``values_*``: ``(..., images, metrics)``, NaN where a metric does not score an image (the
    leading axes are independent datasets on the same design, e.g. a simulation's repeats); every
    image must be scored by some metric of ``target``. ``prompts``/``seeds``: each image's level
    (0..k-1). Returns arrays of shape ``(...)``: ``margin``, ``low``, ``high``, ``se``, ``df``,
    ``p_one_sided`` and the variance parts ``var_prompts``, ``var_seeds``, ``var_images`` (the
    per-image noise, what neither factor explains).
    """
    n_prompts, n_seeds = int(prompts.max()) + 1, int(seeds.max()) + 1

    def margin_of(w: np.ndarray) -> np.ndarray:
        return (_aggregate(values_a, w, metrics, target, composite, scales)
                - _aggregate(values_b, w, metrics, target, composite, scales))

    margin = margin_of(np.ones((1, len(prompts))))[..., 0]
    both, by_prompt, by_seed = cluster_weights(prompts, seeds, resamples, np.random.default_rng(seed))
    d_both, d_prompt, d_seed = margin_of(both), margin_of(by_prompt), margin_of(by_seed)
    var_p, var_s = _part(d_prompt, n_prompts), _part(d_seed, n_seeds)
    # What neither one-way part explains: the per-image noise (counted once in each part).
    rest = d_both - d_prompt - d_seed + margin[..., None]
    var_i = (_part(rest, n_prompts) * n_seeds / (n_seeds - 1) if n_prompts > 1 and n_seeds > 1
             else np.zeros(margin.shape))
    return {"margin": margin, **t_interval(margin, var_p, var_s, n_prompts, n_seeds, confidence),
            "var_prompts": var_p, "var_seeds": var_s, "var_images": var_i}


def seeds_needed(margin: float, var_prompts: float, var_seeds: float, var_images: float, n_seeds: int,
                 quantile: float) -> int | None:
    """About how many seeds per prompt (the same prompts) make ``quantile * se`` reach ``|margin|``.

    More seeds shrink the seed part and the per-image noise, never the spread between prompts:
    ``se(k)**2 = A + (V_p + V_s - A) / k`` for k times the seeds, with ``A = max(V_p - V_i, 0)``
    the prompts' own part (``V_i`` the per-image noise term, counted in ``V_p`` once). None when the
    margin is 0 or when no number of seeds would do (``A`` alone is too large, or nothing measured).
    """
    if margin == 0 or not math.isfinite(quantile):
        return None
    fixed = max(var_prompts - var_images, 0.0)
    room = (margin / quantile) ** 2 - fixed
    if room <= 0:
        return None
    return max(1, math.ceil(n_seeds * (var_prompts + var_seeds - fixed) / room))


def paired_bootstrap(rows_a: Sequence[dict[str, Any]], rows_b: Sequence[dict[str, Any]], metrics: Sequence[str],
                     target: str, weights: dict[str, float], *, resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0,
                     scales: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Margin ``target(a) - target(b)`` over the same images, with a two-way cluster bootstrap interval.

    ``rows_a[i]`` and ``rows_b[i]`` must be the same (prompt, seed) (checked). ``weights``: the
    composite's weights; ``scales``: each metric's composite scale (default: the registered
    metrics'). Only the images ``target`` scores count (a subject-only metric: its prompts).
    Returns the margin, its interval (``low``, ``high``), standard error ``se``, degrees of freedom
    ``df``, the one-sided p-value of margin <= 0, whether the interval excludes 0, the prompts and
    seeds it rests on, and ``images_needed``: about how many images per model (all the
    confirmation's prompts x ``seeds_needed`` seeds) would make an interval of this confidence
    exclude 0 for a margin of this size; None when the margin is 0 or when more seeds alone would
    not (``limit`` then says why).
    """
    keys = [(r["prompt"], r["seed"]) for r in rows_a]
    if keys != [(r["prompt"], r["seed"]) for r in rows_b]:
        raise ValueError("paired bootstrap needs both models' images in the same (prompt, seed) order")
    if scales is None:
        from trainers.metrics import METRICS  # torch: only when the caller did not pass the scales

        scales = {k: METRICS[k].scale for k in weights}
    va, vb = _values(rows_a, metrics), _values(rows_b, metrics)
    cols = [list(metrics).index(m) for m in (list(weights) if target == "composite" else [target])]
    scored = ~(np.isnan(va[:, cols]).all(axis=1) | np.isnan(vb[:, cols]).all(axis=1))
    if not scored.any():
        raise ValueError(f"no image is scored by {target!r}")
    prompts, n_prompts = _index([p for (p, _), keep in zip(keys, scored) if keep])
    seeds, n_seeds = _index([s for (_, s), keep in zip(keys, scored) if keep])
    out = {k: float(v) for k, v in bootstrap_margins(
        va[scored], vb[scored], prompts, seeds, metrics, target, weights, scales,
        resamples=resamples, confidence=confidence, seed=seed).items()}
    margin, se = out["margin"], out["se"]
    quantile = (out["high"] - margin) / se if 0 < se < math.inf else math.nan
    per_prompt = seeds_needed(margin, out["var_prompts"], out["var_seeds"], out["var_images"], n_seeds, quantile)
    limit = None
    if per_prompt is None and margin != 0 and se > 0:
        limit = ("one image per model: nothing measures the spread; add seeds" if math.isinf(se)
                 else "the margin varies from prompt to prompt too much for more seeds alone; add prompts")
    return {"margin": margin, "low": out["low"], "high": out["high"], "se": se, "df": out["df"],
            "confidence": confidence, "p_one_sided": out["p_one_sided"],
            "separated": bool(out["low"] > 0 or out["high"] < 0), "images": len(rows_a),
            "prompts": n_prompts, "seeds": n_seeds,
            "se_prompts": math.sqrt(out["var_prompts"]), "se_seeds": math.sqrt(out["var_seeds"]),
            "images_needed": None if per_prompt is None else len({p for p, _ in keys}) * per_prompt,
            "seeds_needed": per_prompt, "limit": limit, "method": METHOD}


def seed_spread(rows: Sequence[dict[str, Any]], metrics: Sequence[str], target: str, weights: dict[str, float],
                scales: Mapping[str, float] | None = None) -> float:
    """The standard deviation, across seeds, of one model's ``target`` computed on one seed at a
    time (every prompt's image at that seed): how much the score of an unchanged model moves from
    one seed to the next. NaN with fewer than two seeds."""
    if scales is None:
        from trainers.metrics import METRICS

        scales = {k: METRICS[k].scale for k in weights}
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) < 2:
        return math.nan
    by_seed = np.array([[1.0 if r["seed"] == s else 0.0 for r in rows] for s in seeds])
    per_seed = _aggregate(_values(rows, metrics), by_seed, metrics, target, weights, scales)
    per_seed = per_seed[~np.isnan(per_seed)]
    return float(np.std(per_seed, ddof=1)) if per_seed.size > 1 else math.nan
