"""Held-out confirmation: the paired bootstrap against closed-form references and a simulation
with a known truth (more in tests/test_bootstrap.py); the pick among the top K on its own seeds,
margins from seeds that chose nothing, "too close to call" and "no meaningful difference"."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from sweeps.bootstrap import seed_spread
from sweeps.confirm import paired_bootstrap, summarize, verdict
from sweeps.config import load_sweep
from trainers.metrics import composite


def _rows(values: dict[str, list[float | None]], prompts: int = 4) -> list[dict]:
    n = len(next(iter(values.values())))
    return [{"prompt": f"p{i % prompts}", "seed": i, **{m: v[i] for m, v in values.items()}} for i in range(n)]


@pytest.mark.parametrize("one", ["prompt", "seed"])
def test_with_one_prompt_or_one_seed_the_margin_is_the_paired_t_interval(one: str):
    """Nothing to resample on a factor with one level: the interval is the textbook paired t
    interval over the other factor's levels (scipy's, from the per-image differences)."""
    rng = random.Random(0)
    n = 400
    a = [rng.gauss(0.30, 0.05) for _ in range(n)]
    b = [x - 0.004 + rng.gauss(0, 0.02) for x in a]  # paired: b tracks a, a little lower

    def rows(v: list[float]) -> list[dict]:
        return [{"prompt": f"p{i}" if one == "seed" else "p", "seed": i if one == "prompt" else 7, "clip_i": x}
                for i, x in enumerate(v)]

    stats = paired_bootstrap(rows(a), rows(b), ["clip_i"], "clip_i", {"clip_i": 1.0}, resamples=4000, seed=1)
    d = np.array(a) - np.array(b)
    assert stats["margin"] == pytest.approx(d.mean(), abs=1e-12)
    se = d.std(ddof=1) / math.sqrt(n)  # the textbook standard error of a paired mean difference
    ci = scipy_stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert stats["df"] == pytest.approx(n - 1)
    assert stats["se"] == pytest.approx(se, rel=0.05)
    assert stats["low"] == pytest.approx(ci.low, abs=0.1 * se)
    assert stats["high"] == pytest.approx(ci.high, abs=0.1 * se)
    assert stats["p_one_sided"] == pytest.approx(scipy_stats.ttest_1samp(d, 0.0, alternative="greater").pvalue,
                                                 rel=0.2)
    assert stats["separated"] == (stats["low"] > 0)


def test_the_interval_covers_the_true_margin_when_images_share_prompts_and_seeds():
    """Simulation with a known truth, through the function the confirmation calls: 300 datasets
    of 6 prompts x 8 seeds whose per-image margin is 0.1 + a prompt effect (sd 1) + a seed effect
    (sd 0.5) + noise (sd 1). A 95 % interval must contain 0.1 in 95 % of them, up to three
    Monte-Carlo standard errors (3 x sqrt(0.95 x 0.05 / 300) = 0.038). Resampling the images one by
    one (the former method) covered about 62 % here."""
    rng = np.random.default_rng(7)
    repeats, truth = 300, 0.1
    hits = 0
    for _ in range(repeats):
        prompt_effect, seed_effect = rng.normal(0, 1.0, 6), rng.normal(0, 0.5, 8)
        rows_a, rows_b = [], []
        for p in range(6):
            for s in range(8):
                shared = rng.normal(0.3, 0.05)  # what both models draw alike on this image
                rows_b.append({"prompt": f"prompt {p}", "seed": 1000 + s, "clip_i": shared})
                rows_a.append({"prompt": f"prompt {p}", "seed": 1000 + s,
                               "clip_i": shared + truth + prompt_effect[p] + seed_effect[s] + rng.normal(0, 1.0)})
        r = paired_bootstrap(rows_a, rows_b, ["clip_i"], "clip_i", {"clip_i": 1.0}, resamples=1000)
        hits += r["low"] <= truth <= r["high"]
    assert hits / repeats >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / repeats), hits / repeats


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
    # One prompt, 32 seeds: the images are independent, so the textbook paired reference holds.
    stats = paired_bootstrap(_rows({"concept_rate": a}, 1), _rows({"concept_rate": b}, 1), ["concept_rate"],
                             "concept_rate", {"concept_rate": 1.0}, resamples=4000)
    assert stats["margin"] == pytest.approx(1 / 32) and not stats["separated"]
    # Independent reference: the closed-form standard error of the paired mean difference, and
    # n' = n (t se / margin)^2 from se ~ 1/sqrt(n) (t: the interval's own quantile, df n - 1).
    d = np.array(a) - np.array(b)
    se = d.std(ddof=1) / math.sqrt(n)
    expected = n * (scipy_stats.t.ppf(0.975, n - 1) * se / d.mean()) ** 2
    assert stats["images_needed"] > n and stats["images_needed"] == pytest.approx(expected, rel=0.1)
    line = verdict({"runner_up": stats}, "concept_rate", n, 1)[0]
    assert "too close to call" in line and f"{stats['images_needed']} images per model" in line
    assert f"({stats['images_needed']} seeds per prompt)" in line
    same = paired_bootstrap(_rows({"concept_rate": a}), _rows({"concept_rate": a}), ["concept_rate"],
                            "concept_rate", {"concept_rate": 1.0}, resamples=200)
    assert same["margin"] == 0 and same["images_needed"] is None


def test_images_must_be_paired():
    a = _rows({"clip_t": [1.0, 2.0]})
    b = list(reversed(_rows({"clip_t": [1.0, 2.0]})))
    with pytest.raises(ValueError, match="same \\(prompt, seed\\)"):
        paired_bootstrap(a, b, ["clip_t"], "clip_t", {"clip_t": 1.0})


def test_a_margin_that_differs_between_prompts_is_not_promised_to_more_seeds():
    """Half the prompts favour the winner, half the other model, at 16 seeds each: the verdict must
    not say that more seeds on these prompts would separate the two (they would not: the spread
    is between prompts), but that more prompts are needed."""
    effect = [1.0, 1.0, 1.0, -0.9, -0.9, -0.9]
    rows_a = [{"prompt": f"p{p}", "seed": s, "clip_t": 30.0 + e} for p, e in enumerate(effect) for s in range(16)]
    rows_b = [{**r, "clip_t": 30.0} for r in rows_a]
    stats = paired_bootstrap(rows_a, rows_b, ["clip_t"], "clip_t", {"clip_t": 1.0})
    assert stats["margin"] == pytest.approx(np.mean(effect)) and not stats["separated"], stats
    line = verdict({"baseline": stats}, "clip_t", len(rows_a), len(effect))[0]
    assert "too close to call" in line and "add prompts" in line and "seeds per prompt" not in line, line
    # Its standard error is the spread of the prompts' mean margins: sd / sqrt(prompts)
    assert stats["se_prompts"] == pytest.approx(np.std(effect, ddof=1) / math.sqrt(len(effect)), rel=0.05)


# --------------------------------------------------------------------------------------------
# The pick among the top K, and what its margins say
# --------------------------------------------------------------------------------------------

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "tiny-demo.yaml"
PROMPTS = ("a photo of sks toy", "sks toy on a beach", "sks toy wearing sunglasses")


def _model_rows(seeds: list[int], level: float, rng: np.random.Generator, noise: float = 0.02) -> list[dict]:
    """One model's per-image rows: CLIP-T and CLIP-I around ``level`` (seed effects shared below)."""
    return [{"prompt": p, "seed": s, "clip_t": 30.0 + 10 * level + rng.normal(0, 10 * noise),
             "clip_i": 0.5 + level + rng.normal(0, noise)} for p in PROMPTS for s in seeds]


def _scored(rows: dict[str, dict[str, list[dict]]]) -> dict[str, dict]:
    """``{label: {seed set: record}}`` as ``confirm_task`` returns it, with the aggregate scores
    computed here from the rows (plain means; the composite of ``trainers.metrics.composite``)."""
    out: dict[str, dict] = {}
    for label, sets in rows.items():
        out[label] = {}
        for name, rs in sets.items():
            means = {m: float(np.mean([r[m] for r in rs])) for m in ("clip_t", "clip_i")}
            out[label][name] = {"rows": rs, "dir": f"confirm/{label}/{name}",
                                "scores": {**means, "composite": composite(means, {"clip_t": 1.0, "clip_i": 1.0})}}
    return out


def _picked(labels: list[str]) -> list[dict]:
    return [{"label": label, "trial_id": label.split("@")[0], "step": 20, "method": "lora", "params": {}}
            for label in labels]


def test_the_pick_is_the_best_of_the_top_k_on_its_own_seeds_and_its_margins_come_from_the_others():
    """The leaderboard's order is A, B, C; on the pick seeds B scores highest, so B is the pick
    and A (second there) the runner-up. The margins are computed from the report seeds alone:
    changing every pick-seed image leaves them unchanged (as long as the order stays)."""
    cfg = load_sweep(TINY, {"evaluation.confirm.seeds": [1000, 1001, 1002, 1003, 1004, 1005],
                            "evaluation.confirm.bootstrap": 500})
    pick_seeds, report_seeds = cfg.evaluation.confirm.seed_sets()
    assert (pick_seeds, report_seeds) == ((1000, 1001, 1002), (1003, 1004, 1005))
    rng = np.random.default_rng(0)
    levels = {"A@20": 0.10, "B@20": 0.30, "C@20": 0.00}
    rows = {label: {"pick": _model_rows(list(pick_seeds), lv, rng), "report": _model_rows(list(report_seeds), lv, rng)}
            for label, lv in levels.items()}
    rows["baseline"] = {"report": _model_rows(list(report_seeds), -0.2, rng)}
    out = summarize(cfg, _picked(["A@20", "B@20", "C@20"]), _scored(rows))
    assert out["winner"] == "B@20" and out["leaderboard_pick"] == "A@20" and out["picked_by"] == "confirmation"
    assert [m["label"] for m in out["models"]] == ["B@20", "A@20", "C@20", "baseline"]
    assert out["margins"]["runner_up"]["other"] == "A@20"
    assert out["pick_seeds"] == list(pick_seeds) and out["seeds"] == list(report_seeds)
    assert out["images_per_model"] == len(PROMPTS) * len(report_seeds)
    ref = paired_bootstrap(rows["B@20"]["report"], rows["A@20"]["report"], ["clip_t", "clip_i"], "composite",
                           {"clip_t": 1.0, "clip_i": 1.0}, resamples=500)
    assert out["margins"]["runner_up"]["margin"] == pytest.approx(ref["margin"])
    moved = {k: {**v, "pick": [{**r, "clip_i": r["clip_i"] + (0.5 if k == "B@20" else 0.0)} for r in v["pick"]]}
             if "pick" in v else v for k, v in rows.items()}
    again = summarize(cfg, _picked(["A@20", "B@20", "C@20"]), _scored(moved))
    assert again["winner"] == "B@20" and again["margins"] == out["margins"]
    assert out["margins"]["baseline"]["call"] == "better", out["verdict"]
    assert "the pick is better" in out["verdict"][1]


def test_too_close_to_call_and_no_meaningful_difference():
    """Two checkpoints equal up to noise: "too close to call", with the images that would separate
    them. A runner-up that is the pick less a tiny constant (separated: every paired image differs
    by it) with a seed-to-seed spread far larger: "no meaningful difference". The spread is the
    standard deviation over seeds of the composite computed per seed, checked by hand."""
    cfg = load_sweep(TINY, {"evaluation.confirm.seeds": list(range(1000, 1012)), "evaluation.confirm.bootstrap": 500})
    pick_seeds, report_seeds = cfg.evaluation.confirm.seed_sets()
    rng = np.random.default_rng(1)
    a_pick, a_rep = _model_rows(list(pick_seeds), 0.2, rng), _model_rows(list(report_seeds), 0.2, rng, noise=0.1)
    rows = {"A@20": {"pick": a_pick, "report": a_rep},
            "B@20": {"pick": _model_rows(list(pick_seeds), 0.0, rng),
                     "report": [{**r, "clip_i": r["clip_i"] - 1e-4} for r in a_rep]},
            "baseline": {"report": _model_rows(list(report_seeds), 0.2, rng, noise=0.1)}}
    out = summarize(cfg, _picked(["A@20", "B@20"]), _scored(rows))
    runner, base = out["margins"]["runner_up"], out["margins"]["baseline"]
    assert runner["separated"] and runner["margin"] > 0 and runner["call"] == "no meaningful difference", runner
    assert "no meaningful difference" in out["verdict"][0]
    per_seed = [composite({m: float(np.mean([r[m] for r in a_rep if r["seed"] == s])) for m in ("clip_t", "clip_i")},
                          {"clip_t": 1.0, "clip_i": 1.0}) for s in report_seeds]
    by_hand = float(np.std(per_seed, ddof=1))
    assert seed_spread(a_rep, ["clip_t", "clip_i"], "composite", {"clip_t": 1.0, "clip_i": 1.0}) == pytest.approx(by_hand)
    assert runner["min_difference"] == pytest.approx(0.2 * by_hand, rel=1e-3)  # both models' spreads are the same
    assert base["call"] == "too close to call" and not base["separated"], base
    assert "too close to call" in out["verdict"][1]
    assert base["images_needed"] is None or str(base["images_needed"]) in out["verdict"][1]


def test_seed_sets_are_checked_at_load():
    """Pick seeds that are also report seeds or evaluation seeds, pick seeds with nothing to choose
    between, and a single seed to split are refused, naming the key."""
    with pytest.raises(Exception, match="pick_seeds \\[1001\\] are also evaluation.confirm.seeds"):
        load_sweep(TINY, {"evaluation.confirm.pick_seeds": [1001, 2000]})
    with pytest.raises(Exception, match="pick_seeds \\[0\\] are also evaluation.images.generation.seeds"):
        load_sweep(TINY, {"evaluation.confirm.pick_seeds": [0, 2000]})
    with pytest.raises(Exception, match="with top_k 1 there is nothing to choose"):
        load_sweep(TINY, {"evaluation.confirm.top_k": 1, "evaluation.confirm.pick_seeds": [2000]})
    with pytest.raises(Exception, match="needs seeds of its own"):
        load_sweep(TINY, {"evaluation.confirm.seeds": [1000]})
    one = load_sweep(TINY, {"evaluation.confirm.top_k": 1, "evaluation.confirm.seeds": [1000]})
    assert one.evaluation.confirm.seed_sets() == ((), (1000,))
    own = load_sweep(TINY, {"evaluation.confirm.pick_seeds": [2000, 2001]})
    assert own.evaluation.confirm.seed_sets() == ((2000, 2001), tuple(range(1000, 1008)))
