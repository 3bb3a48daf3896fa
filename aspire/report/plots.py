"""The report's charts (matplotlib, Agg, no pyplot): flip rate of each finding's edits against its control edits,
and each finding's effect before and after the repair."""

from __future__ import annotations

import io
from typing import Sequence

from aspire.schemas import Finding

SPURIOUS_COLOR = "#c0392b"
REAL_COLOR = "#2e86c1"
CONTROL_COLOR = "#b3b6b7"


def finding_label(f: Finding, width: int = 38) -> str:
    text = f"{f.class_}: {f.phrase} ({'fg' if f.kind == 'foreground' else 'bg'})"
    return text if len(text) <= width else text[:width - 1] + "…"


def flip_rate_chart(findings: Sequence[Finding]) -> bytes:
    """PNG bytes: per finding a bar for its flip rate and one for its control flip rate; spurious ones in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # 1. layout: one row per finding, the strongest on top
    n = len(findings)
    fig = Figure(figsize=(9.0, 1.2 + 0.34 * max(n, 1)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = list(range(n))[::-1]  # y position of finding i
    bar_h = 0.38

    # 2. bars: real edits (spurious highlighted) and controls
    ax.barh([y + bar_h / 2 for y in rows], [f.flip_rate for f in findings], height=bar_h,
            color=[SPURIOUS_COLOR if f.spurious else REAL_COLOR for f in findings])
    ax.barh([y - bar_h / 2 for y in rows], [f.control_flip_rate for f in findings], height=bar_h,
            color=CONTROL_COLOR)
    ax.set_yticks(rows)
    ax.set_yticklabels([finding_label(f) for f in findings], fontsize=9)
    for label, f in zip(ax.get_yticklabels(), findings):
        if f.spurious:
            label.set_color(SPURIOUS_COLOR)
            label.set_fontweight("bold")

    # 3. axes, legend
    ax.set_xlim(0, 1)
    return _finish(fig, ax, n, "share of edits that flip the classifier",
                   {SPURIOUS_COLOR: "edits (spurious finding)", REAL_COLOR: "edits", CONTROL_COLOR: "control edits"})


def _finish(fig, ax, n: int, xlabel: str, legend: dict[str, str]) -> bytes:
    """The charts' common axes (one row per finding, x grid, no top/right spines), legend on top, as PNG bytes."""
    from matplotlib.patches import Patch

    ax.set_ylim(-0.7, max(n, 1) - 0.3)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", color="#e5e7e9", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(handles=[Patch(color=c, label=label) for c, label in legend.items()], loc="lower left",
              bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8.5, frameon=False, borderaxespad=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


BEFORE_COLOR = "#7f8c8d"


def effect_change_chart(findings: Sequence[Finding]) -> bytes:
    """PNG bytes: per re-probed finding its effect before (grey) and after the repair (red while still spurious),
    with the minimum effect as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(findings)
    fig = Figure(figsize=(9.0, 1.2 + 0.34 * max(n, 1)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = list(range(n))[::-1]
    bar_h = 0.38
    ax.barh([y + bar_h / 2 for y in rows], [f.effect for f in findings], height=bar_h, color=BEFORE_COLOR)
    ax.barh([y - bar_h / 2 for y in rows], [f.after.effect for f in findings], height=bar_h,
            color=[SPURIOUS_COLOR if f.after.spurious else REAL_COLOR for f in findings])
    ax.set_yticks(rows)
    ax.set_yticklabels([f"{finding_label(f, 30)}: {f.after.verdict}" for f in findings], fontsize=9)
    ax.axvline(0, color="#566573", linewidth=0.8)
    return _finish(fig, ax, n, "effect: mean paired drop of the true class's probability (real edit - control)",
                   {BEFORE_COLOR: "before repair", SPURIOUS_COLOR: "after (still spurious)",
                    REAL_COLOR: "after (not spurious)"})
