"""Exchanges per month as a server-rendered SVG bar chart (stacked by kind): no script, no build step.

The SVG is an image with a title and description for screen readers; the page also gives the same
numbers as a table. Colours are the Okabe–Ito palette, distinguishable with colour-vision deficiency,
and every bar segment carries its number in a tooltip title.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
MAX_MONTHS = 24
WIDTH, HEIGHT = 760, 320
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 44, 44
TEXT = "#1a1a1a"
GRID = "#c8c8c8"


@dataclass(frozen=True)
class MonthSeries:
    months: list[str]
    kinds: list[str]
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def count(self, month: str, kind: str) -> int:
        return self.counts.get((month, kind), 0)

    def total(self, month: str) -> int:
        return sum(self.count(month, k) for k in self.kinds)


def _next_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"


def series(rows: Sequence[dict[str, Any]]) -> MonthSeries:
    """Rows of {month: 'YYYY-MM', kind, count}; months without exchanges between the first and the last
    are shown as zero, so the time axis is even. At most the last 24 months."""
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (str(row["month"]), str(row["kind"]))
        counts[key] = counts.get(key, 0) + int(row["count"])
    if not counts:
        return MonthSeries(months=[], kinds=[])
    present = sorted({m for m, _ in counts})
    months = [present[0]]
    while months[-1] < present[-1]:
        months.append(_next_month(months[-1]))
    months = months[-MAX_MONTHS:]
    kinds = sorted({k for _, k in counts})
    return MonthSeries(months=months, kinds=kinds, counts=counts)


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 × 10ⁿ at or above ``value`` (axis maximum with round ticks)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def bar_chart(data: MonthSeries, title: str, description: str, label: Callable[[str], str]) -> Markup:
    # Four grid steps of a round size (1, 2, 5 × 10ⁿ), so every tick is a whole number.
    step = nice_ceiling(-(-max((data.total(m) for m in data.months), default=1) // 4) or 1)
    top = step * 4
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(data.months), 1)
    bar = max(min(slot * 0.7, 48), 2)
    parts: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        'role="img" aria-labelledby="chart-title chart-desc" focusable="false">',
        f'<title id="chart-title">{escape(title)}</title>',
        f'<desc id="chart-desc">{escape(description)}</desc>',
    ]
    for i in range(5):  # horizontal grid lines and their values
        value = step * i
        y = TOP + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}" />'
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" font-size="12" fill="{TEXT}">'
            f"{value}</text>"
        )
    every = max(1, len(data.months) // 12)
    for i, month in enumerate(data.months):
        x = LEFT + i * slot + (slot - bar) / 2
        y = TOP + plot_h
        for k, kind in enumerate(data.kinds):
            count = data.count(month, kind)
            if not count:
                continue
            h = plot_h * count / top
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(month)} {escape(label(kind))}: '
                f"{count}</title></rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle" '
                f'font-size="12" fill="{TEXT}">{escape(month)}</text>'
            )
    x = LEFT
    for k, kind in enumerate(data.kinds):  # the legend, above the plot
        name = label(kind)
        parts.append(
            f'<rect x="{x}" y="12" width="14" height="14" fill="{PALETTE[k % len(PALETTE)]}" />'
            f'<text x="{x + 20}" y="24" font-size="13" fill="{TEXT}">{escape(name)}</text>'
        )
        x += 34 + 13 * len(name)
    parts.append(
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="{TEXT}" />'
    )
    parts.append("</svg>")
    return Markup("".join(parts))
