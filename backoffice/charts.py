"""Charts for the staff dashboard as server-rendered SVG: no script, no stylesheet, no inline
``style`` — only SVG presentation attributes — so the page passes a strict Content-Security-Policy
and needs nothing from a CDN. Every label goes through ``format_html`` (escaped); every point and
bar has a ``<title>`` with its exact figure, which browsers show on hover.

Amounts arrive as integer nanodollars and are placed by integer arithmetic; only the pixel
coordinates are rounded (to 0.1 px), never the figures shown.
"""

from __future__ import annotations

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from core.money import format_money, format_usd

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 70, 12, 12, 28
PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")


def _scale(value: int, low: int, high: int, pixels: float) -> float:
    span = (high - low) or 1
    return round(pixels * (value - low) / span, 1)


def line_chart(*, title: str, labels: list[str], series: list[tuple[str, list[int]]]) -> SafeString:
    """One line per ``(name, nanodollar values)``, over ``labels`` (one per x position)."""
    values = [v for _, points in series for v in points] or [0]
    low, high = min(0, *values), max(0, *values)
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = inner_w / max(len(labels) - 1, 1)

    def y(value: int) -> float:
        return round(TOP + inner_h - _scale(value, low, high, inner_h), 1)

    lines, dots = [], []
    for index, (name, points) in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        coords = " ".join(f"{round(LEFT + i * step, 1)},{y(v)}" for i, v in enumerate(points))
        lines.append(format_html('<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>', coords, colour))
        dots.extend(
            format_html(
                '<circle cx="{}" cy="{}" r="3" fill="{}"><title>{} {}: {} USD</title></circle>',
                round(LEFT + i * step, 1),
                y(v),
                colour,
                name,
                labels[i],
                format_usd(v),
            )
            for i, v in enumerate(points)
        )
    legend = format_html_join(
        "",
        '<text x="{}" y="{}" font-size="12" fill="{}">■ {}</text>',
        ((LEFT + 150 * i, HEIGHT - 6, PALETTE[i % len(PALETTE)], name) for i, (name, _) in enumerate(series)),
    )
    axis = format_html(
        '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999"/>'
        '<text x="4" y="{}" font-size="11" fill="#555">{}</text><text x="4" y="{}" font-size="11" fill="#555">{}</text>'
        '<text x="{}" y="{}" font-size="11" fill="#555">{}</text><text x="{}" y="{}" font-size="11" fill="#555" '
        'text-anchor="end">{}</text>',
        LEFT,
        y(0),
        WIDTH - RIGHT,
        y(0),
        TOP + 10,
        format_money(high),
        TOP + inner_h,
        format_money(low),
        LEFT,
        HEIGHT - BOTTOM + 12,
        labels[0] if labels else "",
        WIDTH - RIGHT,
        HEIGHT - BOTTOM + 12,
        labels[-1] if labels else "",
    )
    return _svg(title, axis + SafeString("".join(lines)) + SafeString("".join(dots)) + legend)


def bar_chart(*, title: str, rows: list[tuple[str, int, str]], links: list[str] | None = None) -> SafeString:
    """Horizontal bars: ``(label, nanodollars, note)`` each, the longest for the largest value.
    The amount follows its bar and the note (a request count, say) is printed at the right edge;
    with ``links``, each label links to its page (one URL per row)."""
    height = TOP + 22 * len(rows) + 8
    high = max([value for _, value, _ in rows] or [0]) or 1
    bar_left, inner_w = 200, WIDTH - 200 - 200
    parts = []
    for i, (label, value, note) in enumerate(rows):
        y, width = TOP + 22 * i, max(_scale(max(value, 0), 0, high, inner_w), 1)
        name = format_html(
            '<text x="{}" y="{}" font-size="12" fill="#333" text-anchor="end">{}</text>',
            bar_left - 6,
            y + 11,
            label[:30],
        )
        if links:
            name = format_html('<a href="{}">{}</a>', links[i], name)
        parts.append(name)
        parts.append(
            format_html(
                '<rect x="{}" y="{}" width="{}" height="14" fill="{}"><title>{}: {} USD{}</title></rect>'
                '<text x="{}" y="{}" font-size="12" fill="#333">{}</text>'
                '<text x="{}" y="{}" font-size="12" fill="#555" text-anchor="end">{}</text>',
                bar_left,
                y,
                width,
                PALETTE[0],
                label,
                format_usd(value),
                f" — {note}" if note else "",
                bar_left + width + 6,
                y + 11,
                format_money(value),
                WIDTH - RIGHT,
                y + 11,
                note,
            )
        )
    return _svg(title, SafeString("".join(parts)), height=height)


def _svg(title: str, body: SafeString, *, height: int = HEIGHT) -> SafeString:
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {} {}" width="100%" role="img" aria-label="{}" '
        'class="tt-chart"><title>{}</title>{}</svg>',
        WIDTH,
        height,
        title,
        title,
        body,
    )
