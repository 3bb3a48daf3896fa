"""Text of the reports (run and batch, HTML and Markdown): number formats, cells, and the Jinja environment."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

TEMPLATES = Path(__file__).parent / "templates"


def fmt_rate(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}".replace("-0.00", "0.00")


def fmt_p(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2g}"


def fmt_acc(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def fmt_delta(before: Optional[float], after: Optional[float]) -> str:
    if before is None or after is None:
        return ""
    return f"{100 * (after - before):+.1f} pp"


def fmt_time(t: Optional[float]) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def short(value: Any, limit: int = 240) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def md(text: Any) -> str:
    """Text safe in a Markdown table cell."""
    return (" ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|")
            .replace("<", "&lt;").replace(">", "&gt;"))


def template_env(html: bool):
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined, autoescape=html,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["md"] = md
    return env
