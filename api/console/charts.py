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


def line_chart(points: list[tuple[float, float]], *, width: int = 640, height: int = 180, label: str = "") -> str:
    """A polyline through (x, y) points, with the first and last x and the y range written on the axes."""
    if len(points) < 2:
        return '<p class="hint">Not enough points to chart yet.</p>'
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1, (y1 - y0) or 1
    pad = 24
    coords = " ".join(f"{pad + (x - x0) / span_x * (width - 2 * pad):.1f},"
                      f"{height - pad - (y - y0) / span_y * (height - 2 * pad):.1f}" for x, y in points)
    return (f'<svg class="chart line" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
            f'<polyline points="{coords}" fill="none" stroke-width="2"/>'
            f'<text x="{pad}" y="{height - 6}">{x0:g}</text>'
            f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">{x1:g}</text>'
            f'<text x="2" y="{pad}">{y1:.3g}</text><text x="2" y="{height - pad}">{y0:.3g}</text></svg>')
