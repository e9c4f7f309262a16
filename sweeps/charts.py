"""Inline SVG charts for the HTML report: no script, no fonts, nothing fetched (sweeps/report.py)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any


def esc(value: Any) -> str:
    """``value`` as HTML text (attributes quoted too)."""
    return html.escape(str(value), quote=True)


def spend_front(points: list[tuple[float, float]], mode: str) -> set[int]:
    """Indices of the (seconds, score) points no other beats on both: spent no more and scored at
    least as well, better on one (the best score for the spend)."""
    sign = 1.0 if mode == "max" else -1.0

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ge = a[0] <= b[0] and sign * a[1] >= sign * b[1]
        return ge and (a[0] < b[0] or sign * a[1] > sign * b[1])

    return {i for i, p in enumerate(points) if not any(beats(q, p) for q in points)}


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


@dataclass(frozen=True)
class _Frame:
    """A plot area: data ranges mapped to SVG pixels, with the axes, ticks and baseline every chart
    of the report draws the same way."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int
    height: int
    left, right, top, bottom = 58, 12, 10, 30

    @classmethod
    def fit(cls, x0: float, x1: float, ys: list[float], width: int, height: int) -> "_Frame":
        """A frame over [x0, x1] and the values ``ys``, padded 8 % above and below."""
        pad = (max(ys) - min(ys)) * 0.08 or abs(ys[0]) * 0.05 or 1.0
        return cls(x0, x1, min(ys) - pad, max(ys) + pad, width, height)

    @property
    def pw(self) -> float:
        return self.width - self.left - self.right

    @property
    def ph(self) -> float:
        return self.height - self.top - self.bottom

    def sx(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.pw

    def sy(self, y: float) -> float:
        return self.top + (self.y1 - y) / (self.y1 - self.y0) * self.ph

    def axes(self, x_ticks: list[float], x_label: str, y_label: str | None = None) -> list[str]:
        """The plot area, horizontal grid lines with the y values, x ticks and the axis labels."""
        left, top, pw, ph = self.left, self.top, self.pw, self.ph
        parts = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#d5dae3"/>']
        for t in nice_ticks(self.y0, self.y1):
            y = self.sy(t)
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef0f4"/>'
                         f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(f"{t:.4g}")}</text>')
        for t in x_ticks:
            parts.append(f'<text x="{self.sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{esc(f"{t:g}")}</text>')
        parts.append(f'<text x="{left + pw / 2}" y="{self.height - 2}" text-anchor="middle">{esc(x_label)}</text>')
        if y_label is not None:
            parts.append(f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" '
                         f'text-anchor="middle">{esc(y_label)}</text>')
        return parts

    def baseline(self, value: float, what: str) -> str:
        """A dashed horizontal line at ``value`` titled ``baseline (what): value``."""
        y = self.sy(value)
        return (f'<line class="baseline" x1="{self.left}" x2="{self.left + self.pw}" y1="{y:.1f}" y2="{y:.1f}" '
                f'stroke="#333" stroke-width="1.5" stroke-dasharray="6 4">'
                f"<title>baseline ({what}): {esc(f'{value:.4g}')}</title></line>")

    def svg(self, parts: list[str]) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" role="img">{"".join(parts)}</svg>')


def line_chart(series: list[tuple[str, str, list[tuple[float, float]]]], baseline: float | None,
               width: int = 400, height: int = 230) -> str:
    """An inline SVG chart: one line per ``(label, colour, points)``, ``baseline`` dashed across."""
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts] + ([baseline] if baseline is not None else [])
    if not xs:
        return '<p class="muted">no values</p>'
    x0, x1 = min(xs), max(xs)
    x0, x1 = (x0 - 1, x1 + 1) if x0 == x1 else (x0, x1)
    f = _Frame.fit(x0, x1, ys, width, height)
    parts = f.axes(sorted(set(xs)) if len(set(xs)) <= 12 else nice_ticks(x0, x1, 6), "step")
    if baseline is not None:
        parts.append(f.baseline(baseline, "no adapter"))
    for label, color, pts in series:
        coords = " ".join(f"{f.sx(x):.1f},{f.sy(y):.1f}" for x, y in pts)
        dots = "".join(f'<circle cx="{f.sx(x):.1f}" cy="{f.sy(y):.1f}" r="2.5" fill="{color}">'
                       f"<title>{esc(label)} step {x:g}: {y:.4g}</title></circle>" for x, y in pts)
        parts.append(f'<g class="series" data-label="{esc(label)}"><polyline points="{coords}" fill="none" '
                     f'stroke="{color}" stroke-width="1.8"/>{dots}</g>')
    return f.svg(parts)


def scatter_chart(points: list[tuple[str, float, float, bool, str]], x_label: str, y_label: str,
                  baseline: float | None = None, width: int = 520, height: int = 280) -> str:
    """An inline SVG scatter of ``(colour, x, y, ringed, title)`` points, ``baseline`` dashed across."""
    if not points:
        return '<p class="muted">no values</p>'
    xs, ys = [p[1] for p in points], [p[2] for p in points] + ([baseline] if baseline is not None else [])
    x0, x1 = min(0.0, min(xs)), max(xs) or 1.0
    f = _Frame.fit(x0, x1, ys, width, height)
    parts = f.axes(nice_ticks(x0, x1, 6), x_label, y_label)
    if baseline is not None:
        parts.append(f.baseline(baseline, "no training"))
    for color, x, y, ringed, title in points:
        ring = ' stroke="#111" stroke-width="1.6"' if ringed else ""
        parts.append(f'<circle class="{"front" if ringed else "pt"}" cx="{f.sx(x):.1f}" cy="{f.sy(y):.1f}" '
                     f'r="{5 if ringed else 3.5}" fill="{color}"{ring}><title>{esc(title)}</title></circle>')
    return f.svg(parts)
