"""The leaderboard as text: a compact table that fits a terminal, the wide table, CSV and JSON.

``sdsweep results`` prints the compact table by default: the top ``--top`` trials, every
hyperparameter of a trial in one column of short names (``lr=3e-3 r=8``) with a legend, numbers
in a few significant digits, and as many score and cost columns as fit in 120 characters; the
columns and trials left out are named under the table with the options that show them.
``--wide`` prints every column of every trial (the table of earlier versions), and
``--format csv|json`` every trial, hyperparameter, score at the best step, held-out score, cost,
status and error, for other programs. The HTML report (sweeps/report.py) always shows everything.
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from typing import Any, Sequence

from sweeps.results import COST_HEAD, COST_KEYS, TrialRow, format_cost

WIDTH = 120  # the default width of everything `sdsweep results` prints
TOP = 10  # trials the compact table shows by default
# Short names for the parameter names of the shipped search spaces; any other name is shortened
# by the initials of its words (``gradient_accumulation_steps`` -> ``gas``). The legend says which.
SHORT = {"learning_rate": "lr", "rank": "r", "alpha": "alpha", "dropout": "drop", "snr_gamma": "snr",
         "lr_scheduler": "sched", "vectors_per_token": "vec", "prior_loss_weight": "prior",
         "num_class_images": "ncls", "train_text_encoder": "te", "train_batch_size": "bs",
         "max_train_steps": "steps", "lr_warmup_steps": "warmup"}
METHOD_CHARS = 10  # a method name longer than this is shown by its initials (with a legend)
PARAM_WIDTH = 36  # the hyperparameter column wraps onto more lines beyond this ...
MIN_PARAM_WIDTH = 12  # ... or beyond what the other columns leave, but never narrower than this


def heldout_column(confirmation: dict[str, Any] | None) -> tuple[str, dict[str, float]] | None:
    """(metric, {trial id or "baseline": held-out score}) for the leaderboard's held-out column."""
    if not confirmation:
        return None
    metric = confirmation["metric"]
    return metric, {m.get("trial_id", m["label"]): m["heldout"][metric] for m in confirmation["models"]}


def param_keys(rows: Sequence[TrialRow]) -> list[str]:
    """Every hyperparameter any trial has (``method`` is a column of its own)."""
    return sorted({k for r in rows for k in r.params if k != "method"})


def _initials(name: str) -> str:
    words = [w for w in name.split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else name


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """``{key: short name}``, unique: ``train.learning_rate`` -> ``lr``; two keys that would share a
    name keep their section's initials in front (``t.drop``, ``l.drop``), and failing that the key."""
    def short(key: str) -> str:
        name = key.rpartition(".")[2]
        return SHORT.get(name, _initials(name))

    def sectioned(key: str) -> str:
        group = key.rpartition(".")[0]
        return f"{''.join(w[0] for w in group.replace('.', '_').split('_') if w)}.{short(key)}" if group else key

    out = {k: short(k) for k in keys}
    for step in (sectioned, str):  # each pass renames every key that shares its name with another
        shared = {k for k in keys if sum(v == out[k] for v in out.values()) > 1}
        out.update({k: step(k) for k in shared})
    return out


def method_names(methods: Sequence[str]) -> dict[str, str]:
    """``{method: as shown}``: a long name by its initials (``textual_inversion`` -> ``ti``)."""
    out = {m: (_initials(m) if len(m) > METHOD_CHARS else m) for m in methods}
    return {m: (m if sum(v == s for v in out.values()) > 1 else s) for m, s in out.items()}


def compact(v: Any) -> str:
    """A hyperparameter value in a few characters: ``0.000472`` -> ``4.7e-4``, ``5.0`` -> ``5``."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) < 1e6:
            return str(int(v))
        if abs(v) < 0.01 or abs(v) >= 1e5:
            mantissa, _, exp = f"{v:.1e}".partition("e")
            return f"{mantissa.removesuffix('.0')}e{int(exp)}"
        return f"{v:.3g}"
    return str(v)


def _cell_score(value: Any, base: float | None) -> str:
    """A score in 4 significant digits and its gain over the baseline in 2: ``0.1679 (+0.01)``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    # A gain of float-rounding size (1e-17) reads as 0, not as a number.
    return f"{value:.4g}" if base is None else f"{value:.4g} ({round(value - base, 12):+.2g})"


def _layout(table: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]


def _width(columns: list[list[str]]) -> int:
    """The width of ``columns`` (each a list of cells) laid out side by side."""
    return sum(max(len(c) for c in col) for col in columns) + 2 * (len(columns) - 1)


def _wrap_tokens(tokens: list[str], width: int) -> list[str]:
    """``tokens`` joined by spaces on lines of at most ``width`` (a longer token is split over lines)."""
    lines: list[str] = []
    for tok in tokens:
        if lines and len(lines[-1]) + 1 + len(tok) <= width:
            lines[-1] += " " + tok
        else:
            lines += [tok[i:i + width] for i in range(0, len(tok), width)]
    return lines or [""]


def wrap(text: str, width: int = WIDTH, indent: str = "    ") -> list[str]:
    """One line of prose as lines of at most ``width`` characters (continuations indented)."""
    lead = text[:len(text) - len(text.lstrip())]
    return textwrap.wrap(text, width, initial_indent="", subsequent_indent=lead + indent,
                         break_on_hyphens=False) or [""]


def format_compact(rows: list[TrialRow], metric: str, scores: list[str] | None = None,
                   baseline: dict[str, float] | None = None, heldout: tuple[str, dict[str, float]] | None = None,
                   top: int = TOP, width: int = WIDTH, run_dir: str = "RUN_DIR") -> str:
    """The leaderboard in at most ``width`` columns: the first ``top`` rows (0: all), the
    hyperparameters in one column of short names, and the optional columns (held-out score, the
    other scores, cost) that fit, in that order; a legend and what was left out follow the table."""
    baseline = baseline or {}
    shown = rows[:top] if top > 0 else list(rows)
    keys = param_keys(rows)
    short = short_names(keys)
    methods = method_names(sorted({r.method for r in rows}))
    multi = len(methods) > 1

    def params(r: TrialRow) -> list[str]:
        return [f"{short[k]}={compact(r.params[k])}" for k in keys if k in r.params]

    # Columns as lists of cells, the header first, the baseline row last.
    base_row = bool(baseline)
    col: dict[str, list[str]] = {
        "#": ["#", *[str(r.rank or "-") for r in shown], *(["base"] if base_row else [])],
        "trial": ["trial", *[r.trial_id for r in shown], *(["-"] if base_row else [])],
        "method": ["method", *[methods[r.method] for r in shown], *(["-"] if base_row else [])],
        metric: [metric, *[_cell_score(r.best, r.gain_base(baseline).get(metric)) for r in shown],
                 *([_cell_score(baseline.get(metric), None)] if base_row else [])],
        "step": ["best@step", *[str(r.best_step or "-") for r in shown], *(["-"] if base_row else [])],
        "status": ["status", *[r.status for r in shown], *(["baseline"] if base_row else [])],
    }
    optional: dict[str, list[str]] = {}
    if heldout:
        h_name, h_scores = heldout
        h_base = h_scores.get("baseline")
        optional[f"held-out {h_name}"] = [f"held-out {h_name}", *[
            _cell_score(h_scores.get(r.trial_id), h_base) for r in shown],
            *([_cell_score(h_base, None)] if base_row else [])]
    for s in (scores or []):
        if s != metric:
            optional[s] = [s, *[_cell_score(r.best_metrics.get(s), r.gain_base(baseline).get(s)) for r in shown],
                           *([_cell_score(baseline.get(s), None)] if base_row else [])]
    for i, head in enumerate(COST_HEAD):
        optional[head] = [head, *[format_cost(r.cost)[i] for r in shown], *([""] if base_row else [])]
    optional = {k: v for k, v in optional.items() if any(c not in ("-", "") for c in v[1:])}

    fixed = ["#", "trial", *(["method"] if multi else []), "hp", metric, "step", "status"]
    longest_param = max([len(" ".join(params(r))) for r in shown] + [len("hyperparameters"), len("(no adapter)")])
    others = _width([col[c] for c in fixed if c != "hp"])
    # One line when it fits; a long list wraps at PARAM_WIDTH, leaving room for scores beside it.
    param_w = min(longest_param, max(MIN_PARAM_WIDTH, min(PARAM_WIDTH, width - others - 2)))
    chosen: list[str] = []
    used = others + 2 + param_w
    for name in optional:  # in priority order; a column that does not fit is left out, later ones may fit
        need = 2 + max(len(c) for c in optional[name])
        if used + need <= width:
            chosen.append(name)
            used += need
    order = ["#", "trial", *(["method"] if multi else []), "hp", metric, *[c for c in chosen if c.startswith("held-out")],
             *[c for c in chosen if not c.startswith("held-out")], "step", "status"]

    table: list[list[str]] = []
    cells = {**col, **optional}
    for i in range(len(col["#"])):
        if i == 0:
            hp = ["hyperparameters"]
        elif base_row and i == len(col["#"]) - 1:
            hp = ["(no adapter)"]
        else:
            hp = _wrap_tokens(params(shown[i - 1]), param_w)
        for j, text in enumerate(hp):
            table.append([text if c == "hp" else (cells[c][i] if j == 0 else "") for c in order])
    out = _layout(table)

    legend = [f"{s}={k}" for k, s in short.items() if s != k]
    if legend:
        out += wrap("hyperparameters: " + "  ".join(legend), width)
    if multi and any(s != m for m, s in methods.items()):
        out += wrap("methods: " + "  ".join(f"{s}={m}" for m, s in methods.items() if s != m), width)
    hidden = [c for c in optional if c not in chosen]
    if len(shown) < len(rows):
        out += wrap(f"{len(rows) - len(shown)} more trial(s) not shown: `sdsweep results {run_dir} --top 0` shows "
                    "every trial", width)
    if hidden:
        out += wrap(f"not shown here: {', '.join(hidden)}; `sdsweep results {run_dir} --wide` shows every column, "
                    "`--format csv` or `--format json` every value", width)
    for r in shown:
        if r.error:
            line = f"  {r.trial_id}: {r.error}"
            out.append(line if len(line) <= width else line[:width - 1] + "…")
    errors_hidden = sum(1 for r in rows[len(shown):] if r.error)
    if errors_hidden:
        out.append(f"  ({errors_hidden} more errored trial(s) below the top {len(shown)})")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _score(value: Any, base: float | None) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4g}" if base is None else f"{value:.4g} ({value - base:+.3g})"


def format_wide(rows: list[TrialRow], metric: str, scores: list[str] | None = None,
                baseline: dict[str, float] | None = None,
                heldout: tuple[str, dict[str, float]] | None = None) -> str:
    """Every column of every trial, however wide (``sdsweep results --wide``).

    ``scores``: more metrics to show at each trial's best step (e.g. the image scores), each with
    its gain over ``baseline`` in parentheses when a baseline value exists. ``heldout``: (metric,
    {trial id or "baseline": score}) of the held-out confirmation, shown beside the selection's
    scores for the checkpoints it re-scored.
    """
    baseline = baseline or {}
    extra = [s for s in (scores or []) if s != metric]
    keys = param_keys(rows)
    h_name, h_scores = heldout or ("", {})
    h_col = [f"held-out {h_name}"] if heldout else []
    h_base = h_scores.get("baseline")

    def held(key: str) -> list[str]:
        if not heldout:
            return []
        return [_score(h_scores[key], None if key == "baseline" else h_base) if key in h_scores else "-"]

    head = ["rank", "trial", "method", *keys, metric, *h_col, *extra, "best@step", "status", "steps", "wall",
            *COST_HEAD]
    lines = [head]
    for r in rows:
        lines.append([str(r.rank or "-"), r.trial_id, r.method, *[_fmt(r.params.get(k, "")) for k in keys],
                      _score(r.best, r.gain_base(baseline).get(metric)) if metric in baseline else
                      (f"{r.best:.5f}" if r.best is not None else "-"), *held(r.trial_id),
                      *[_score(r.best_metrics.get(s), r.gain_base(baseline).get(s)) for s in extra],
                      str(r.best_step or "-"), r.status, str(r.steps), f"{r.wall_s:.0f}s", *format_cost(r.cost)])
    if baseline:
        lines.append(["base", "(no adapter)", "-", *["" for _ in keys], _score(baseline.get(metric), None),
                      *held("baseline"), *[_score(baseline.get(s), None) for s in extra], "-", "baseline", "0", "",
                      *["" for _ in COST_HEAD]])
    out = _layout(lines)
    for r in rows:
        if r.error:
            out.append(f"  {r.trial_id}: {r.error}")
    return "\n".join(out)


def records(rows: list[TrialRow], metric: str, mode: str, scores: list[str] | None = None,
            baseline: dict[str, float] | None = None,
            heldout: tuple[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Everything the leaderboard knows, as plain data (``sdsweep results --format json``)."""
    baseline = baseline or {}
    extra = [s for s in (scores or []) if s != metric]
    h_name, h_scores = heldout or (None, {})
    trials = []
    for r in rows:
        at_best = {s: r.best_metrics.get(s) for s in [metric, *extra] if s in r.best_metrics}
        trials.append({
            "rank": r.rank, "trial_id": r.trial_id, "method": r.method, "status": r.status,
            metric: r.best, "best_step": r.best_step, "steps": r.steps, "wall_s": r.wall_s,
            "hyperparameters": {k: v for k, v in r.params.items() if k != "method"},
            "scores_at_best_step": at_best,
            "gain_over_baseline": {s: v - r.gain_base(baseline)[s] for s, v in at_best.items()
                                   if s in r.gain_base(baseline) and isinstance(v, (int, float))},
            "heldout": h_scores.get(r.trial_id), "cost": dict(r.cost), "error": r.error,
            "trial_dir": str(r.path) if r.path else None})
    return {"metric": metric, "mode": mode, "heldout_metric": h_name,
            "baseline": {"scores": dict(baseline), "heldout": h_scores.get("baseline")} if baseline else None,
            "trials": trials}


def format_json(*args: Any, **kwargs: Any) -> str:
    """:func:`records` as JSON (non-finite numbers as null, so any JSON parser reads it)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(records(*args, **kwargs)), indent=1)


def format_csv(rows: list[TrialRow], metric: str, mode: str, scores: list[str] | None = None,
               baseline: dict[str, float] | None = None,
               heldout: tuple[str, dict[str, float]] | None = None) -> str:
    """One CSV row per trial (and a last ``baseline`` row when the sweep scored the base model):
    rank, trial, method, status, the ranking metric, best step, steps, wall seconds, every
    hyperparameter by its full key, the other scores at the best step, the held-out score, the
    cost keys and the error."""
    data = records(rows, metric, mode, scores, baseline, heldout)
    keys = param_keys(rows)
    extra = [s for s in (scores or []) if s != metric]
    h_col = [f"heldout_{heldout[0]}"] if heldout else []
    head = ["rank", "trial_id", "method", "status", metric, "best_step", "steps", "wall_s", *keys, *extra, *h_col,
            *COST_KEYS, "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for t in data["trials"]:
        writer.writerow([t["rank"], t["trial_id"], t["method"], t["status"], t[metric], t["best_step"], t["steps"],
                         t["wall_s"], *[t["hyperparameters"].get(k) for k in keys],
                         *[t["scores_at_best_step"].get(s) for s in extra], *([t["heldout"]] if heldout else []),
                         *[t["cost"].get(k) for k in COST_KEYS], t["error"]])
    if data["baseline"]:
        b = data["baseline"]
        writer.writerow([None, "baseline", None, "baseline", b["scores"].get(metric), None, 0, None,
                         *[None for _ in keys], *[b["scores"].get(s) for s in extra],
                         *([b["heldout"]] if heldout else []), *[None for _ in COST_KEYS], None])
    return buf.getvalue()
