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
            bars.append(f'<text x="{x + (step - 4) / 2:.1f}" y="{y - 2:.1f}" class="value">{short(value)}</text>')
    first, last = escape(points[0][0]), escape(points[-1][0])
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
            + "".join(bars) + f'<text x="0" y="{height - 4}">{first}</text>'
            f'<text x="{width}" y="{height - 4}" text-anchor="end">{last}</text></svg>')


def short(value: float) -> str:
    """A bar's value as it fits above the bar: 950, 12k, 1.5M (the bar's tooltip has it in full)."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit * 0.9995:  # 999,999 is 1.0M, not 1000k
            scaled = value / limit
            return f"{scaled:.1f}{suffix}" if scaled < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:g}"


def line_chart(points: list[tuple[float, float]], *, width: int = 640, height: int = 220, label: str = "",
               x_name: str = "", y_name: str = "") -> str:
    """A polyline through (x, y) points, with the first and last x and the y range written on the axes."""
    if len(points) < 2:
        return '<p class="hint">Not enough points to chart yet.</p>'
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1, (y1 - y0) or 1
    left, pad = 48, 24
    coords = " ".join(f"{left + (x - x0) / span_x * (width - left - pad):.1f},"
                      f"{height - pad - (y - y0) / span_y * (height - 2 * pad):.1f}" for x, y in points)
    return (f'<svg class="chart line" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
            f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{height - pad}" class="axis"/>'
            f'<line x1="{left}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
            f'<polyline points="{coords}" fill="none" stroke-width="2"/>'
            f'<text x="{left}" y="{height - 6}">{x0:g}</text>'
            f'<text x="{(left + width - pad) / 2:.0f}" y="{height - 6}" text-anchor="middle">{escape(x_name)}</text>'
            f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">{x1:g}</text>'
            f'<text x="{left - 4}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{left - 4}" y="{height - pad}" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{left - 4}" y="{height / 2:.0f}" text-anchor="end">{escape(y_name)}</text></svg>')
