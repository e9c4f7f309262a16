"""A sweep's static HTML report: one ``index.html`` plus copies of the images it shows.

``sdsweep report RUN_DIR`` (and the end of ``sdsweep run``) writes it. Every link is relative
and nothing is fetched from elsewhere (no CDN, no web fonts, charts are inline SVG), so the
folder opens from disk with ``file://``, and can be zipped or moved. Everything shown comes from
the run directory through :mod:`sweeps.results`, so the report agrees with ``sdsweep results``:
the leaderboard, the Pareto front (multi-objective sweeps), one chart per metric with one line
per trial, the baseline's grid beside each ranked trial's grid at its best step, and the best
trial's per-prompt scores. All text goes through :func:`html.escape`.
"""

from __future__ import annotations

import datetime
import json
import math
import shlex
import shutil
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from sweeps.results import (COST_HEAD, TrialRow, baseline_scores, best_per_method, confirmation_headline,
                            find_checkpoint, format_cost, image_metrics, kept_steps, leaderboard, metric_and_mode,
                            pareto_front, read_confirmation)
from sweeps.charts import esc as _e, line_chart, scatter_chart, spend_front
from trainers.metric_modes import natural_mode
from trainers.tensor_files import atomic_write_text

REPORT_DIR = "report"
IMAGES_DIR = "images"
LOSSES = ("val_loss", "fixed_train_loss", "train_loss")
GRID_PX, THUMB_PX = 204, 96  # displayed widths: figure 220 - 2 * 8 padding, img.thumb
# Tableau's 10 categorical colours: distinguishable, also in greyscale print order.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;color:#1d2330;background:#fafbfc;
 margin:0 auto;padding:24px 32px 48px;max-width:1400px}h1{font-size:24px;margin:0 0 4px}.muted,.sub{color:#5a6475}
h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #dde1e8;padding-bottom:4px}.sub{margin:0 0 14px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}dt{color:#5a6475}dd{margin:0}
code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#eef1f5;padding:1px 4px;border-radius:3px}
.wrap{overflow-x:auto}table{border-collapse:collapse;background:#fff;font-size:12.5px;box-shadow:0 1px 2px #0001}
th,td{padding:4px 7px;border-bottom:1px solid #e6e9ef;text-align:left;vertical-align:middle}
th{background:#f0f2f6;font-weight:600;white-space:nowrap;vertical-align:bottom}th small{display:block;font-weight:400}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}tr.top td{background:#fff8e1}
tr.base td{background:#f4f6f9;color:#5a6475;font-style:italic}.g{font-size:11px;margin-left:3px}
.up,.st-completed{color:#1a7f37}.down,.err,.st-error{color:#c62828}.st-error{font-weight:600}.st-stopped{color:#8a6d00}
.err{max-width:420px}.legend{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0 0 10px}
.sw{display:inline-block;width:18px;border-top:3px solid;vertical-align:middle;margin-right:6px}
.sw.dash{border-top:2px dashed #333}.charts,.grids{display:flex;flex-wrap:wrap;gap:16px}
.chart,figure{background:#fff;box-shadow:0 1px 2px #0001;padding:8px}.chart h3{font-size:13px;margin:0 0 4px}
svg text{font:11px system-ui,sans-serif;fill:#5a6475}figure{margin:0;width:220px}
figure img{width:100%;display:block;background:#eee}.px{image-rendering:pixelated}
figcaption{font-size:12px;margin-top:6px}.cmd{display:block;margin-top:6px}.cmd .nw{white-space:nowrap}.cmd .path{overflow-wrap:anywhere}img.thumb{width:96px;height:96px;object-fit:contain;display:block}
"""

# Read back by tests/test_report.py from the DOM headless Chromium renders.
SCRIPT = """window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesLoaded = String(imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length);
});"""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report``); return its index.html."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / REPORT_DIR
    rows, state = leaderboard(run_dir)
    page = render_report(run_dir, rows, state, out)
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def render_report(run_dir: Path, rows: list[TrialRow], state: dict[str, Any], out: Path) -> str:
    """The whole page for ``rows`` (as :func:`~sweeps.results.leaderboard` returns them); copies
    the images it shows under ``out``."""
    name = str(state["config"].get("name", "sweep"))
    body = [_header(rows, state), _leaderboard_section(rows, state), _confirm_section(run_dir, state),
            _methods_section(rows, state), _pareto_section(rows, state),
            _curves_section(rows, state), _grids_section(run_dir, rows, state, Path(out)),
            _prompts_section(run_dir, rows, state, Path(out))]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_e(name)} · sdsweep report</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(b for b in body if b) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _score(metric: str, value: Any, base: float | None) -> str:
    """A score with its gain over the baseline, coloured by whether it improved."""
    if not isinstance(value, (int, float)):
        return "–"
    if base is None:
        return _num(float(value))
    gain = float(value) - base
    better = gain > 0 if natural_mode(metric) == "max" else gain < 0
    cls = "up" if better else ("down" if gain else "muted")
    return f'{_num(float(value))}<span class="g {cls}">{gain:+.3g}</span>'


def _samples_dir(row: TrialRow, step: int | None) -> Path | None:
    return row.path / "samples" / f"step-{int(step):06d}" if row.path and step is not None else None


def _read_json(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _section(title: str, note: str, body: str) -> str:
    """An ``<h2>`` section; ``title``, ``note`` and ``body`` are HTML (already escaped)."""
    return f'<h2>{title}</h2><p class="sub">{note}</p>{body}'


def _table(table_id: str, head: list[str], lines: list[str]) -> str:
    """A scrollable table; ``head`` cells and ``lines`` (whole ``<tr>``) are HTML."""
    cells = "".join(f"<th>{h}</th>" for h in head)
    return (f'<div class="wrap"><table id="{table_id}"><thead><tr>{cells}</tr></thead>'
            f"<tbody>{''.join(lines)}</tbody></table></div>")


def _header(rows: list[TrialRow], state: dict[str, Any]) -> str:
    cfg = state["config"]
    metric, mode = metric_and_mode(state)
    statuses = Counter(r.status for r in rows)
    started = state.get("started")
    when = (datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M")
            if isinstance(started, (int, float)) else "–")
    items = [("run id", f"<code>{_e(state.get('run_id', '–'))}</code>"),
             ("base model", f"<code>{_e(cfg['base']['model']['source'])}</code>"),
             ("methods", _e(", ".join(sorted({r.method for r in rows})) or cfg["base"].get("method", "–"))),
             ("ranked by", f"<b>{_e(metric)}</b> ({'higher' if mode == 'max' else 'lower'} is better), "
                           "best over every evaluated checkpoint"),
             ("trials", _e(f"{len(rows)} ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); "
                           f"{sum(1 for r in rows if r.rank)} ranked")),
             ("started", _e(when)), ("sdsweep", _e(state.get("package_version", "–")))]
    items += _evaluator_items(state)
    meta = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items)
    return (f"<h1>{_e(cfg.get('name', 'sweep'))}</h1><p class=\"sub\">sdsweep report · "
            f"{_e(state.get('run_id', ''))}</p><dl class=\"meta\">{meta}</dl>")


def _evaluator_items(state: dict[str, Any]) -> list[tuple[str, str]]:
    """The image evaluator's settings and the CLIP model's identity (what makes scores comparable)."""
    ev = state["config"]["evaluation"]
    identity = (state.get("baseline") or {}).get("identity") or {}
    images = identity.get("settings") or ev.get("images")
    if not images:
        return [("image evaluation", "off (losses only)")]
    gen = images.get("generation") or {}
    shown = {k: gen.get(k) for k in ("token", "seeds", "sampler", "steps", "guidance_scale", "resolution",
                                      "negative_prompt") if gen.get(k) is not None}
    prompts = "".join(f"<li>{_e(p)}</li>" for p in gen.get("prompts") or [])
    clip = identity.get("clip") or {"spec": images.get("clip")}
    sha = str(clip.get("weights_sha256") or "")
    weights = ", ".join(f"{k} {v:g}" for k, v in (images.get("weights") or {}).items())
    return [("prompts", f'<ul style="margin:0;padding-left:18px">{prompts}</ul>'),
            ("generation", _e(", ".join(f"{k} {v}" for k, v in shown.items()))),
            ("image metrics", _e(", ".join(images.get("metrics") or []) + (f"; composite weights {weights}"
                                                                            if weights else ""))),
            ("CLIP", f"<code>{_e(clip.get('spec'))}</code>"
                     + (f' weights sha256 <code title="{_e(sha)}">{_e(sha[:16])}</code>' if sha else "")
                     + (f", {identity['references']} reference images" if "references" in identity else ""))]


def _leaderboard_section(rows: list[TrialRow], state: dict[str, Any]) -> str:
    metric, _ = metric_and_mode(state)
    base = baseline_scores(state)
    extra = [m for m in image_metrics(state) if m != metric]
    keys = sorted({k for r in rows for k in r.params if k != "method"})
    errors = any(r.error for r in rows)
    head = [_e(h) for h in ("rank", "trial", "method")] + [_param_label(k) for k in keys] + [
        _e(h) for h in (metric, *extra, "best step", "steps", "status", "wall", *COST_HEAD,
                        *(["error"] if errors else []))]
    lines = []
    for r in rows:
        cells = [f'<td class="n">{r.rank or "–"}</td>', f"<td><code>{_e(r.trial_id)}</code></td>",
                 f"<td>{_e(r.method)}</td>", *[_param_cell(r.params.get(k)) for k in keys],
                 f'<td class="n metric"><b>{_score(metric, r.best, r.gain_base(base).get(metric))}</b></td>',
                 *[f'<td class="n">{_score(m, r.best_metrics.get(m), r.gain_base(base).get(m))}</td>' for m in extra],
                 f'<td class="n">{_num(r.best_step)}</td>', f'<td class="n">{r.steps}</td>',
                 f'<td class="st-{_e(r.status)}">{_e(r.status)}</td>', f'<td class="n">{r.wall_s:.0f} s</td>',
                 *[f'<td class="n cost">{_e(c)}</td>' for c in format_cost(r.cost)],
                 *([f'<td class="err">{_e(r.error or "")}</td>'] if errors else [])]
        best = "" if r.best is None else f' data-best="{r.best!r}"'
        lines.append(f'<tr class="trial{" top" if r.rank == 1 else ""}" data-trial="{_e(r.trial_id)}" '
                     f'data-rank="{r.rank or ""}"{best}>{"".join(cells)}</tr>')
    if base:
        blank = "<td></td>" * len(keys)
        lines.append(f'<tr class="base"><td class="n">base</td><td>no adapter</td><td>–</td>{blank}'
                     f'<td class="n">{_score(metric, base.get(metric), None)}</td>'
                     + "".join(f'<td class="n">{_score(m, base.get(m), None)}</td>' for m in extra)
                     + '<td class="n">–</td><td class="n">0</td><td>baseline</td><td></td>'
                     + "<td></td>" * (len(COST_HEAD) + errors) + "</tr>")
    note = " Small numbers: gain over the base model without adapter." if base else ""
    note += (" Spend: seconds in the training loop (no evaluation), examples through the UNet, peak memory "
             "(CPU: the worker's RSS high-water mark), size of the shipped artifact at the best step.")
    return _section("Leaderboard", f"Each trial at its best step by {_e(metric)}.{note}",
                    _table("leaderboard", head, lines))


def _confirm_section(run_dir: Path, state: dict[str, Any]) -> str:
    """The held-out confirmation (sweeps/confirm.py): each re-scored model's held-out scores with
    their gain over the base model's, and the verdict on the winner's margins."""
    conf = read_confirmation(run_dir)
    metrics = image_metrics(state)
    if not conf or not metrics:
        return ""
    base = next(m["heldout"] for m in conf["models"] if m["label"] == "baseline")
    lines = []
    for m in conf["models"]:
        is_base = m["label"] == "baseline"
        cells = [f"<td><code>{_e(m['label'])}</code></td>",
                 *[f'<td class="n">{_score(k, m["heldout"].get(k), None if is_base else base.get(k))}</td>'
                   for k in metrics]]
        lines.append(f'<tr class="{"base" if is_base else "trial"}">{"".join(cells)}</tr>')
    verdict = "".join(f"<li>{_e(v)}</li>" for v in conf["verdict"])
    note = (f"{confirmation_headline(conf).rstrip(':')}. The table: the top checkpoints and the base model on those "
            f"{conf['images_per_model']} images per model (seeds, and prompts if set, that chose nothing); small "
            "numbers: gain over the base model's held-out score.")
    return _section("Held-out confirmation", note,
                    _table("heldout", [_e("checkpoint"), *[_e(k) for k in metrics]], lines) + f"<ul>{verdict}</ul>")


def _param_cell(value: Any) -> str:
    numeric = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    return f'<td class="{"n" if numeric else "s"}">{_e(_num(value, 3))}</td>'


def _param_label(key: str) -> str:
    """``train.learning_rate`` as a small ``train`` over ``learning_rate``: keeps the table narrow."""
    group, _, name = key.rpartition(".")
    return f"<small>{_e(group)}</small>{_e(name)}" if group else _e(key)


def _pareto_section(rows: list[TrialRow], state: dict[str, Any]) -> str:
    objectives = list(state["config"]["evaluation"].get("objectives") or [])
    if not objectives:
        return ""
    front = pareto_front(rows, objectives, [natural_mode(o) for o in objectives])
    paths = {r.trial_id: r.path for r in rows}
    methods = {r.trial_id: r.method for r in rows}
    colors = method_colors(rows)
    lines = []
    for k, p in enumerate(front):
        path = paths.get(p.trial_id)
        kept = "yes" if path and find_checkpoint(path, p.step) else "no"
        m = methods.get(p.trial_id, "?")
        lines.append(f'<tr data-trial="{_e(p.trial_id)}" data-step="{p.step}" data-method="{_e(m)}"><td class="n">{k}</td>'
                     f"<td><code>{_e(p.trial_id)}</code></td>"
                     f'<td><span class="sw" style="border-color:{colors.get(m, "#333")}"></span>{_e(m)}</td>'
                     f"<td class=\"n\">{p.step}</td>"
                     + "".join(f'<td class="n">{_num(p.values[o])}</td>' for o in objectives)
                     + f"<td>{kept}</td></tr>")
    head = ["point", "trial", "method", "step", *[_e(f"{o} ({natural_mode(o)})") for o in objectives],
            "checkpoint kept"]
    note = (f"{len(front)} evaluated checkpoint{'' if len(front) == 1 else 's'} no other beats on every one of "
            f"{_e(', '.join(objectives))}; <code>sdsweep best RUN_DIR --pareto K</code> exports point K.")
    return _section("Pareto front", note, _table("pareto", head, lines))


def method_colors(rows: list[TrialRow]) -> dict[str, str]:
    """One palette colour per method, in a fixed order (the same method has the same colour in
    every chart and table of the page)."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(sorted({r.method for r in rows}))}


def _methods_section(rows: list[TrialRow], state: dict[str, Any]) -> str:
    """For a sweep across methods: each method's best trial with its spend, and every evaluated
    checkpoint's score against the trainer seconds it had spent, coloured by method, with the front
    of the best score for the spend."""
    metric, mode = metric_and_mode(state)
    best = best_per_method(rows)
    if len({r.method for r in rows}) < 2:
        return ""
    colors = method_colors(rows)
    lines = []
    for method, r in best.items():
        lines.append(f'<tr data-method="{_e(method)}"><td><span class="sw" style="border-color:{colors[method]}">'
                     f"</span>{_e(method)}</td><td class=\"n\">{r.rank}</td><td><code>{_e(r.trial_id)}</code></td>"
                     f'<td class="n">{_num(r.best_step)}</td><td class="n metric">{_num(r.best)}</td>'
                     + "".join(f'<td class="n cost">{_e(c)}</td>' for c in format_cost(r.cost)) + "</tr>")
    table = _table("methods", ["method", "rank", "trial", "best step", _e(metric), *COST_HEAD], lines)
    pts = [(r.method, r.trial_id, float(h["trainer_s"]), float(h[metric]), int(h["step"]))
           for r in rows for h in r.history if _finite(h.get("trainer_s")) and _finite(h.get(metric))]
    front = spend_front([(x, y) for _, _, x, y, _ in pts], mode)
    chart = scatter_chart([(colors[m], x, y, i in front, f"{m} {t} step {s}: {metric} {y:.4g} after {x:.0f} s")
                           for i, (m, t, x, y, s) in enumerate(pts)], "trainer seconds", metric,
                          baseline_scores(state).get(metric))
    legend = "".join(f'<span><span class="sw" style="border-color:{c}"></span>{_e(m)}</span>'
                     for m, c in colors.items()) + "<span>ringed: best score for the spend</span>" + (
        '<span><span class="sw dash"></span>base model</span>' if metric in baseline_scores(state) else "")
    note = (f"Each method's best trial by {_e(metric)} and what it spent; <code>sdsweep best RUN_DIR --method NAME"
            "</code> exports one method's best. Below, every evaluated checkpoint's score against the trainer "
            "seconds spent to reach it.")
    return _section("Methods", note, table + f'<div class="legend" style="margin-top:12px">{legend}</div>'
                    f'<div class="chart" id="spend-chart">{chart}</div>')


def _curves_section(rows: list[TrialRow], state: dict[str, Any]) -> str:
    base = baseline_scores(state)
    reported = {k for r in rows for h in r.history for k in h}
    metrics = [m for m in (*image_metrics(state), *LOSSES) if m in reported]
    if not metrics:
        return _section("Metric curves", "No trial has reported an evaluation yet.", "")
    colors = {r.trial_id: PALETTE[i % len(PALETTE)] for i, r in enumerate(rows)}
    shown = [r for r in rows if any(m in h for h in r.history for m in metrics)]
    legend = "".join(f'<span><span class="sw" style="border-color:{colors[r.trial_id]}"></span>'
                     f"<code>{_e(r.trial_id)}</code>{f' (#{r.rank})' if r.rank else ''}</span>" for r in shown)
    if any(m in base for m in metrics):
        legend += '<span><span class="sw dash"></span>baseline (no adapter)</span>'
    charts = []
    for m in metrics:
        series = [(r.trial_id, colors[r.trial_id],
                   [(float(h["step"]), float(h[m])) for h in r.history if _finite(h.get(m))]) for r in shown]
        better = "higher" if natural_mode(m) == "max" else "lower"
        charts.append(f'<div class="chart" data-metric="{_e(m)}"><h3>{_e(m)} <span class="muted">'
                      f"({better} is better)</span></h3>{line_chart(series, base.get(m))}</div>")
    return _section("Metric curves", "Every evaluation of every trial, by training step.",
                    f'<div class="legend">{legend}</div><div class="charts">{"".join(charts)}</div>')


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _img(out: Path, src: Path, rel: str, alt: str, shown_px: int, cls: str = "", linked: bool = False
         ) -> str | None:
    """An ``<img>`` of ``src`` copied to ``out/images/rel`` (None if missing), linked to it if ``linked``;
    pixelated when shown larger than it is, so the tiny model's 64 px samples stay crisp and 512 px ones
    are smoothed down."""
    if not src.is_file():
        return None
    dest = out / IMAGES_DIR / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    link = quote(f"{IMAGES_DIR}/{rel}")  # relative to index.html: the folder can move
    with Image.open(src) as im:
        small = im.width < shown_px
    classes = " ".join(c for c in (cls, "px" if small else "") if c)
    tag = f'<img class="{classes}" src="{link}" alt="{_e(alt)}">'
    return f'<a href="{link}">{tag}</a>' if linked else tag


def _caption(metrics: list[str], values: dict[str, Any], base: dict[str, float]) -> str:
    return "<br>".join(f"{_e(m)} {_score(m, values.get(m), base.get(m))}" for m in metrics if m in values)


def _baseline_dir(run_dir: Path, state: dict[str, Any]) -> Path:
    return run_dir / str((state.get("baseline") or {}).get("dir", "baseline"))


def _grids_section(run_dir: Path, rows: list[TrialRow], state: dict[str, Any], out: Path) -> str:
    metrics = image_metrics(state)
    if not metrics:
        return ""
    base = baseline_scores(state)
    figures = []
    img = _img(out, _baseline_dir(run_dir, state) / "grid.png", "baseline/grid.png", "baseline grid", GRID_PX,
               linked=True)
    if img:
        figures.append(f'<figure class="grid baseline">{img}'
                       f"<figcaption><b>baseline</b> (no adapter)<br>{_caption(metrics, base, {})}</figcaption>"
                       "</figure>")
    for r in rows:
        sd = _samples_dir(r, r.best_step)
        if not r.rank or sd is None:
            continue
        grid = str(_read_json(sd / "scores.json").get("grid", "grid.png"))
        img = _img(out, sd / grid, f"{r.trial_id}/{sd.name}/{grid}", f"trial {r.trial_id} step {r.best_step}",
                   GRID_PX, linked=True) or '<p class="muted">samples missing</p>'
        figures.append(f'<figure class="grid" data-trial="{_e(r.trial_id)}" data-step="{r.best_step}">{img}'
                       f"<figcaption><b>#{r.rank} <code>{_e(r.trial_id)}</code></b> step {r.best_step}<br>"
                       f"{_caption(metrics, r.best_metrics, r.gain_base(base))}{_export_line(run_dir, r, r.best_step)}"
                       "</figcaption></figure>")
    return _section("Samples", "The same prompts (rows) and seeds (columns) in every grid: the base model first, "
                    "then each ranked trial at its best step, with its scores and the command that exports that "
                    "checkpoint (any of them, not only the winner). Click a grid for full size.",
                    f'<div class="grids">{"".join(figures)}</div>')


def export_command(run_dir: Path, trial_id: str, step: int) -> list[str]:
    """The shell command that exports checkpoint ``trial_id`` @ ``step`` of ``run_dir``, as its
    parts (quoted for a POSIX shell; joined by spaces it is the command)."""
    return ["sdsweep best", shlex.quote(str(Path(run_dir).resolve())), f"--trial {shlex.quote(trial_id)}",
            f"--step {int(step)}", f"--export {shlex.quote(f'{trial_id}-step{int(step)}')}"]


def _export_line(run_dir: Path, row: TrialRow, step: int | None) -> str:
    """Under a grid: the command exporting its checkpoint, or why there is none to export."""
    if step is None or row.path is None:
        return ""
    if find_checkpoint(row.path, step) is None:
        kept = kept_steps(row.path)
        return (f'<span class="cmd muted">checkpoint not kept (checkpoints_to_keep); kept steps of this trial: '
                f"{_e(', '.join(map(str, kept)) or 'none')}</span>")
    # Each option with its value stays on one line (a browser would break "--step" after its "--").
    parts = " ".join(f'<span class="{"path" if i == 1 else "nw"}">{_e(part)}</span>'
                     for i, part in enumerate(export_command(run_dir, row.trial_id, step)))
    return f'<code class="cmd" data-trial="{_e(row.trial_id)}" data-step="{int(step)}">{parts}</code>'



def _prompts_section(run_dir: Path, rows: list[TrialRow], state: dict[str, Any], out: Path) -> str:
    metrics = [m for m in image_metrics(state) if m != "composite"]
    best = next((r for r in rows if r.rank == 1), None)
    sd = _samples_dir(best, best.best_step) if best else None
    scores = _read_json(sd / "scores.json" if sd else None)
    if not metrics or best is None or sd is None or not scores.get("rows"):
        return ""
    base_dir = _baseline_dir(run_dir, state)
    base_rows = {r.get("file"): r for r in _read_json(base_dir / "scores.json").get("rows", [])}
    lines = []
    for item in scores["rows"]:
        file = str(item.get("file"))
        b = base_rows.get(file, {})
        thumbs = [_img(out, base_dir / file, f"baseline/{file}", "baseline", THUMB_PX, "thumb"),
                  _img(out, sd / file, f"{best.trial_id}/{sd.name}/{file}", f"trial {best.trial_id}",
                       THUMB_PX, "thumb")]
        cells = [f"<td>{t}</td>" if t else "<td>–</td>" for t in thumbs]
        lines.append(f"<tr><td>{_e(item.get('prompt', ''))}</td><td class=\"n\">{_e(item.get('seed', ''))}</td>"
                     f"{cells[0]}" + "".join(f'<td class="n">{_num(b.get(m))}</td>' for m in metrics) + cells[1]
                     + "".join(f'<td class="n">{_score(m, item.get(m), b.get(m) if _finite(b.get(m)) else None)}'
                               "</td>" for m in metrics) + "</tr>")
    head = [_e(h) for h in ("prompt", "seed", "baseline", *[f"baseline {m}" for m in metrics],
                            f"trial {best.trial_id}", *metrics)]
    return _section(f"Per prompt: best trial <code>{_e(best.trial_id)}</code> at step {best.best_step}",
                    "Each generated image beside the base model's for the same prompt and seed; small numbers: "
                    "gain over the base model's image.", _table("prompts", head, lines))
