"""Charts as SVG drawn on the server: no chart library, nothing for the browser to run."""

from __future__ import annotations

from html import escape


def bar_chart(points: list[tuple[str, float]], *, width: int = 320, height: int = 120, label: str = "") -> str:
    """A bar per (label, value), the values written above the bars; an empty chart says so."""
    if not points or not any(value for _, value in points):
        return '<p class="hint">Nothing to chart yet.</p>'
    top = max(value for _, value in points)
    step = width / len(points)
    bars = []
    for n, (name, value) in enumerate(points):
        bar = (height - 30) * value / top
        x, y = n * step + 2, height - 18 - bar
        bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{step - 4:.1f}" height="{bar:.1f}"><title>{escape(name)}: '
                    f'{value:g}</title></rect>')
        if value:
            bars.append(f'<text x="{x + (step - 4) / 2:.1f}" y="{y - 2:.1f}" class="value">{value:g}</text>')
    first, last = escape(points[0][0]), escape(points[-1][0])
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
            + "".join(bars) + f'<text x="0" y="{height - 4}">{first}</text>'
            f'<text x="{width}" y="{height - 4}" text-anchor="end">{last}</text></svg>')
