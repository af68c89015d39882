"""Small SVG charts for the Admin UI, drawn here rather than with a plotting library: every point a marker, integer
version axes, rounded ticks, 95% intervals as whiskers, and one small panel per metric so no series hides behind
another. Only numbers and our own labels go into the SVG (never user text), escaped all the same.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 300, 170  # one panel; four fit across a 1400 px page
LEFT, RIGHT, TOP, BOTTOM = 46, 12, 26, 28  # margins for tick labels and the title
COLORS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed")  # distinct in print and for common colour blindness
MARKERS = ("circle", "square", "diamond", "triangle", "cross")


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    low: float | None = None  # the 95% interval, drawn as a whisker
    high: float | None = None
    note: str = ""  # the tooltip: "v2: 0.62 [0.51, 0.72] n=96"


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About `count` round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    return [round(start + i * step, 10) for i in range(int(math.ceil((high - start) / step)) + 1)]


def _label(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.3g}"


def _marker(shape: str, x: float, y: float, color: str) -> str:
    if shape == "square":
        return f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" fill="{color}"/>'
    if shape == "diamond":
        return (f'<path d="M{x:.1f} {y - 5:.1f}L{x + 5:.1f} {y:.1f}L{x:.1f} {y + 5:.1f}L{x - 5:.1f} {y:.1f}Z" '
                f'fill="{color}"/>')
    if shape == "triangle":
        return f'<path d="M{x:.1f} {y - 5:.1f}L{x + 5:.1f} {y + 4:.1f}L{x - 5:.1f} {y + 4:.1f}Z" fill="{color}"/>'
    if shape == "cross":
        return (f'<path d="M{x - 4:.1f} {y - 4:.1f}L{x + 4:.1f} {y + 4:.1f}M{x - 4:.1f} {y + 4:.1f}L{x + 4:.1f} '
                f'{y - 4:.1f}" stroke="{color}" stroke-width="2"/>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>'


def panel(title: str, series: dict[str, Sequence[Point]], *, integer_x: bool = True, x_name: str = "version",
          y_range: tuple[float, float] | None = None, reference: float | None = None, empty: str = "") -> str:
    """One chart: each series a line with a distinct colour and marker per point, whiskers for intervals, an
    optional dashed reference line (the base model's value, or chance); `empty` is shown when there is no point."""
    points = [p for values in series.values() for p in values]
    parts = [f'<svg class="pl-chart" role="img" aria-label="{html.escape(title)}" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" '
             f'font-size="10"><text x="{LEFT}" y="14" font-size="12" font-weight="bold">{html.escape(title)}</text>']
    if not points:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#6b7280">'
                     f'{html.escape(empty)}</text></svg>')
        return "".join(parts)
    xs = [p.x for p in points]
    ys = [v for p in points for v in (p.y, p.low, p.high) if v is not None] + ([reference] if reference else [])
    pad = max(0.3, (max(xs) - min(xs)) * 0.04)  # markers and whiskers clear of the panel's edges
    x_low, x_high = min(xs) - pad, max(xs) + pad
    y_min, y_max = min(ys), max(ys)
    if y_max - y_min < 1e-9:  # a flat series: a band around it, not an axis from its value up
        y_min, y_max = y_min - (abs(y_min) * 0.1 or 0.5), y_max + (abs(y_max) * 0.1 or 0.5)
    y_ticks = nice_ticks(*(y_range or (y_min, y_max)))
    y_low, y_high = (y_range if y_range else (y_ticks[0], y_ticks[-1]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y_low) / ((y_high - y_low) or 1)) * plot_h

    for tick in y_ticks:
        if y_low <= tick <= y_high:
            parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" '
                         f'stroke="#e5e7eb"/><text x="{LEFT - 4}" y="{sy(tick) + 3:.1f}" text-anchor="end">'
                         f'{_label(tick)}</text>')
    x_ticks = sorted(set(xs)) if integer_x and len(set(xs)) <= 12 else nice_ticks(min(xs), max(xs), 5)
    for tick in x_ticks:
        if x_low <= tick <= x_high:
            text = ("base" if tick == 0 else f"v{tick:.0f}") if x_name == "version" else _label(tick)
            parts.append(f'<text x="{sx(tick):.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">{text}</text>')
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#9ca3af"/>')
    if reference is not None and y_low <= reference <= y_high:
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(reference):.1f}" y2="{sy(reference):.1f}" '
                     f'stroke="#6b7280" stroke-dasharray="4 3"/>')
    for index, (name, values) in enumerate(series.items()):
        color, shape = COLORS[index % len(COLORS)], MARKERS[index % len(MARKERS)]
        ordered = sorted(values, key=lambda p: p.x)
        if len(ordered) > 1:
            path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in ordered)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for p in ordered:
            if p.low is not None and p.high is not None:
                parts.append(f'<line x1="{sx(p.x):.1f}" x2="{sx(p.x):.1f}" y1="{sy(p.low):.1f}" y2="{sy(p.high):.1f}" '
                             f'stroke="{color}" stroke-width="1"/>')
            parts.append(f'<g class="pl-point"><title>{html.escape(p.note or f"{name}: {p.y:.3g}")}</title>'
                         f'{_marker(shape, sx(p.x), sy(p.y), color)}</g>')
        if len(series) > 1:  # a legend entry per series, top right, with its marker
            lx, ly = WIDTH - RIGHT - 110, TOP + 4 + 12 * index
            parts.append(f'{_marker(shape, lx, ly, color)}<text x="{lx + 8}" y="{ly + 3}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def panels(charts: Sequence[str]) -> str:
    """Charts side by side, wrapping on a narrow page."""
    return '<div class="pl-charts" style="display:flex;flex-wrap:wrap;gap:8px">' + "".join(charts) + "</div>"
