"""Inline SVG charts for the HTML report: no script, no fonts, nothing fetched (sweeps/report.py)."""

from __future__ import annotations

import html
import math
from typing import Any


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def spend_front(points: list[tuple[float, float]], mode: str) -> set[int]:
    """Indices of the (seconds, score) points no other beats on both: spent no more and scored at
    least as well, better on one (the best score for the spend)."""
    sign = 1.0 if mode == "max" else -1.0

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ge = a[0] <= b[0] and sign * a[1] >= sign * b[1]
        return ge and (a[0] < b[0] or sign * a[1] > sign * b[1])

    return {i for i, p in enumerate(points) if not any(beats(q, p) for q in points)}


def scatter_chart(points: list[tuple[str, float, float, bool, str]], x_label: str, y_label: str,
                  baseline: float | None = None, width: int = 520, height: int = 280) -> str:
    """An inline SVG scatter of ``(colour, x, y, ringed, title)`` points, ``baseline`` dashed across."""
    if not points:
        return '<p class="muted">no values</p>'
    xs, ys = [p[1] for p in points], [p[2] for p in points] + ([baseline] if baseline is not None else [])
    x0, x1 = min(0.0, min(xs)), max(xs) or 1.0
    pad = (max(ys) - min(ys)) * 0.08 or abs(ys[0]) * 0.05 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad
    left, right, top, bottom = 58, 12, 10, 30
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * ph

    parts = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#d5dae3"/>']
    for t in nice_ticks(y0, y1):
        parts.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_e(f"{t:.4g}")}</text>')
    for t in nice_ticks(x0, x1, 6):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{_e(f"{t:g}")}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 2}" text-anchor="middle">{_e(x_label)}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" '
                 f'text-anchor="middle">{_e(y_label)}</text>')
    if baseline is not None:
        parts.append(f'<line class="baseline" x1="{left}" x2="{left + pw}" y1="{sy(baseline):.1f}" '
                     f'y2="{sy(baseline):.1f}" stroke="#333" stroke-width="1.5" stroke-dasharray="6 4">'
                     f"<title>baseline (no training): {_e(f'{baseline:.4g}')}</title></line>")
    for color, x, y, ringed, title in points:
        ring = ' stroke="#111" stroke-width="1.6"' if ringed else ""
        parts.append(f'<circle class="{"front" if ringed else "pt"}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" '
                     f'r="{5 if ringed else 3.5}" fill="{color}"{ring}><title>{_e(title)}</title></circle>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">{"".join(parts)}</svg>')


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    raw = span / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    # The 1-2-5 step nearest the raw one (in ratio): rounding up instead can leave a single tick.
    step = min((mult * mag for mult in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(series: list[tuple[str, str, list[tuple[float, float]]]], baseline: float | None,
               width: int = 400, height: int = 230) -> str:
    """An inline SVG chart: one line per ``(label, colour, points)``, ``baseline`` dashed across."""
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts] + ([baseline] if baseline is not None else [])
    if not xs:
        return '<p class="muted">no values</p>'
    x0, x1 = min(xs), max(xs)
    x0, x1 = (x0 - 1, x1 + 1) if x0 == x1 else (x0, x1)
    pad = (max(ys) - min(ys)) * 0.08 or abs(ys[0]) * 0.05 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad
    left, right, top, bottom = 58, 12, 10, 30
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * ph

    parts = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#d5dae3"/>']
    for t in nice_ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eef0f4"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_e(f"{t:.4g}")}</text>')
    for t in sorted(set(xs)) if len(set(xs)) <= 12 else nice_ticks(x0, x1, 6):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{_e(f"{t:g}")}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 2}" text-anchor="middle">step</text>')
    if baseline is not None:
        parts.append(f'<line class="baseline" x1="{left}" x2="{left + pw}" y1="{sy(baseline):.1f}" '
                     f'y2="{sy(baseline):.1f}" stroke="#333" stroke-width="1.5" stroke-dasharray="6 4">'
                     f"<title>baseline (no adapter): {_e(f'{baseline:.4g}')}</title></line>")
    for label, color, pts in series:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                       f"<title>{_e(label)} step {x:g}: {y:.4g}</title></circle>" for x, y in pts)
        parts.append(f'<g class="series" data-label="{_e(label)}"><polyline points="{coords}" fill="none" '
                     f'stroke="{color}" stroke-width="1.8"/>{dots}</g>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">{"".join(parts)}</svg>')
