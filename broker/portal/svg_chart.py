"""Tokens per day as a small bar chart, rendered on the server as inline SVG.

Pure: data in, markup out (no I/O, no clock). Stacked bars (tokens in below, tokens out on
top) per day, every day of the period shown even when it had no traffic, a y axis with
round ticks, a few day labels on the x axis, and ``<title>``/``<desc>`` so a screen reader
gets the numbers the picture shows. Colours come from classes styled by portal.css: the
page's CSP allows no inline style.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from html import escape

WIDTH = 640
HEIGHT = 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 16, 40  # room for the axis labels


@dataclass(frozen=True, slots=True)
class DayBar:
    day: str  # YYYY-MM-DD
    tokens_in: int
    tokens_out: int

    @property
    def total(self) -> int:
        return self.tokens_in + self.tokens_out


def fill_days(bars: Sequence[DayBar], first: str, last: str) -> list[DayBar]:
    """One bar per day from ``first`` to ``last`` (inclusive), zero where nothing ran."""
    known = {b.day: b for b in bars}
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    return [known.get(d.isoformat(), DayBar(d.isoformat(), 0, 0)) for d in days]


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value`` (1 for 0)."""
    if value <= 1:
        return 1
    power = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def short(n: float) -> str:
    """12345 -> 12.3k, 2000000 -> 2M: axis labels that fit."""
    for size, unit in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            text = f"{n / size:.1f}".rstrip("0").rstrip(".")
            return text + unit
    return str(int(n)) if n == int(n) else f"{n:.1f}"


def tokens_chart(bars: Sequence[DayBar], title: str, chart_id: str = "tokens-chart") -> str:
    """An accessible SVG of ``bars`` (in the order given, one per day)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = nice_ceiling(max((b.total for b in bars), default=0))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{escape(chart_id)}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{escape(chart_id)}-title {escape(chart_id)}-desc">',
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
        f'<desc id="{escape(chart_id)}-desc">{escape(_description(bars))}</desc>',
        *_y_axis(top, plot_h),
    ]
    if bars:
        out += _bars(bars, top, plot_w, plot_h)
    else:
        out.append(
            f'<text class="axis" x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" '
            'text-anchor="middle">no tokens in this period</text>'
        )
    out.append(
        f'<text class="axis label" x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" '
        'text-anchor="middle">day (UTC, month-day)</text>'
    )
    out.append("</svg>")
    return "\n".join(out)


def _description(bars: Sequence[DayBar]) -> str:
    total_in = sum(b.tokens_in for b in bars)
    total_out = sum(b.tokens_out for b in bars)
    busiest = max(bars, key=lambda b: b.total, default=None)
    return (
        f"{len(bars)} days; {total_in + total_out} tokens in all ({total_in} in, {total_out} out)"
        + (
            f"; the busiest day was {busiest.day} with {busiest.total} tokens"
            if busiest is not None and busiest.total
            else ""
        )
        + "."
    )


def _y_axis(top: float, plot_h: float) -> list[str]:
    out = []
    for i in range(5):  # y axis: 0, 1/4 ... top, with grid lines
        value = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{short(value)}</text>"
        )
    out.append(
        f'<text class="axis label" x="14" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">tokens</text>'
    )
    return out


def _bars(bars: Sequence[DayBar], top: float, plot_w: float, plot_h: float) -> list[str]:
    out = []
    slot = plot_w / len(bars)
    width = max(1.0, slot * 0.7)
    every = max(1, math.ceil(len(bars) / 8))  # at most ~8 day labels
    base = TOP + plot_h
    for i, bar in enumerate(bars):
        x = LEFT + i * slot + (slot - width) / 2
        h_in = plot_h * bar.tokens_in / top
        h_out = plot_h * bar.tokens_out / top
        label = f"{bar.day}: {bar.tokens_in} in, {bar.tokens_out} out"
        out.append(f'<g class="bar" data-day="{escape(bar.day)}"><title>{escape(label)}</title>')
        if h_in:
            out.append(
                f'<rect class="in" x="{x:.1f}" y="{base - h_in:.1f}" '
                f'width="{width:.1f}" height="{h_in:.1f}"/>'
            )
        if h_out:
            out.append(
                f'<rect class="out" x="{x:.1f}" y="{base - h_in - h_out:.1f}" '
                f'width="{width:.1f}" height="{h_out:.1f}"/>'
            )
        out.append("</g>")
        last = i == len(bars) - 1
        # The last day is always labelled; the regular label before it gives way if close.
        crowded = not last and len(bars) - 1 - i < every and (len(bars) - 1) % every
        if (i % every == 0 and not crowded) or last:
            out.append(
                f'<text class="axis" x="{x + width / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                f'text-anchor="middle">{escape(bar.day[5:])}</text>'
            )
    return out
