"""What a finished fine-tune shows: OpenAI's results CSV and a loss curve (an SVG drawn here, no plotting
library needed in the code location)."""

from __future__ import annotations

import csv
import io
from typing import Any


def results_csv(steps: list[dict[str, Any]]) -> bytes:
    """``step,train_loss,learning_rate,epoch`` per logged step, as OpenAI's fine-tune-results file."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "train_loss", "learning_rate", "epoch"])
    for s in steps:
        writer.writerow([s["step"], f"{s['loss']:.6f}", f"{s['learning_rate']:.3e}", s.get("epoch", "")])
    return out.getvalue().encode()


def loss_curve_svg(steps: list[dict[str, Any]], eval_loss: float | None = None,
                   width: int = 480, height: int = 240) -> str:
    """Training loss by step (and the final eval loss as a dashed line)."""
    pad = 40
    points = [(s["step"], s["loss"]) for s in steps]
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"></svg>'
    losses = [loss for _, loss in points] + ([eval_loss] if eval_loss is not None else [])
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    last_step = max(step for step, _ in points) or 1

    def x(step: float) -> float:
        return pad + (width - 2 * pad) * step / last_step

    def y(loss: float) -> float:
        return height - pad - (height - 2 * pad) * (loss - low) / span

    line = " ".join(f"{x(step):.1f},{y(loss):.1f}" for step, loss in points)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
        f'<polyline fill="none" stroke="#4f46e5" stroke-width="2" points="{line}"/>',
        f'<text x="{pad}" y="{pad - 8}">loss {high:.3f}</text>',
        f'<text x="{pad}" y="{height - pad + 14}">{low:.3f}</text>',
        f'<text x="{width - pad}" y="{height - pad + 14}" text-anchor="end">step {last_step}</text>',
    ]
    if eval_loss is not None:
        parts.append(f'<line x1="{pad}" y1="{y(eval_loss):.1f}" x2="{width - pad}" y2="{y(eval_loss):.1f}" '
                     f'stroke="#dc2626" stroke-dasharray="4 3"/>'
                     f'<text x="{width - pad}" y="{y(eval_loss) - 4:.1f}" text-anchor="end" fill="#dc2626">'
                     f'eval {eval_loss:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


SPARKS = "▁▂▃▄▅▆▇█"


def loss_markdown(steps: list[dict[str, Any]], eval_loss: float | None, rows: int = 12) -> str:
    """The loss curve as the Dagster UI renders it: a sparkline and sampled steps (its markdown shows no
    inline images; the SVG is written next to the adapter)."""
    if not steps:
        return "no training steps logged"
    losses = [s["loss"] for s in steps]
    low, high = min(losses), max(losses)
    width = 60
    sampled = [losses[int(i * len(losses) / width)] for i in range(min(width, len(losses)))]
    spark = "".join(SPARKS[int((v - low) / ((high - low) or 1) * (len(SPARKS) - 1))] for v in sampled)
    picks = sorted({int(i * (len(steps) - 1) / max(1, rows - 1)) for i in range(rows)})
    table = ["| step | loss | learning rate |", "|---|---|---|"]
    table += [f"| {steps[i]['step']} | {steps[i]['loss']:.4f} | {steps[i]['learning_rate']:.2e} |" for i in picks]
    summary = f"training loss {losses[0]:.4f} → {losses[-1]:.4f} over {steps[-1]['step']} steps"
    if eval_loss is not None:
        summary += f"; eval loss {eval_loss:.4f}"
    return f"`{spark}`\n\n{summary}\n\n" + "\n".join(table)
