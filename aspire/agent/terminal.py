"""The terminal side of `aspire chat`, with or without an LLM: the read-answer loop, and pictures drawn in text.

    chat_loop(console, answer)      read a line, answer it, until quit / Ctrl-D / Ctrl-C at the prompt
    thumbnails([(label, path)])     images side by side in half-block characters, for a colour terminal
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from rich.console import Console
from rich.text import Text

from aspire import llm
from aspire.errors import AspireError

QUIT = ("quit", "exit", ":q", "bye")   # what ends a session, at the prompt or on stdin (--json)
CONFIGURE_HELP = (f"No LLM is configured. To talk with one, {llm.CONFIGURE}, or agent.base_url / agent.api_key in a "
                  "--config file; then run `aspire chat` again.")
THUMB_COLS = 24  # characters per thumbnail (two pixel rows per character row)


def thumbnails(images: list[tuple[str, Optional[str | Path]]], cols: int = THUMB_COLS) -> Text:
    """Images side by side in half-block characters ("▀": the upper pixel in the foreground colour, the lower
    in the background colour), each `cols` characters wide, with its label below."""
    from aspire.data.images import load_image

    cells = []
    for label, path in images:
        try:
            image = load_image(path) if path else None
        except (OSError, AspireError):
            image = None
        if image is None:
            cells.append((label, None))
            continue
        rows = max(2, round(cols * image.height / image.width) // 2 * 2)
        cells.append((label, np.asarray(image.convert("RGB").resize((cols, rows)))))  # (rows, cols, 3)
    height = max((c.shape[0] for _, c in cells if c is not None), default=2)
    out = Text()
    for y in range(0, height, 2):
        for i, (_, pixels) in enumerate(cells):
            if i:
                out.append("  ")
            for x in range(cols):
                if pixels is None or y >= pixels.shape[0]:
                    out.append(" ")
                    continue
                top = pixels[y, x]
                low = pixels[min(y + 1, pixels.shape[0] - 1), x]
                out.append("▀", style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({low[0]},{low[1]},{low[2]})")
        out.append("\n")
    out.append("  ".join(label.ljust(cols) for label, _ in cells))
    return out


def chat_loop(console: Console, answer: Callable[[str], Any]) -> int:
    """Read a line, answer it, until quit, Ctrl-D or Ctrl-C at the prompt (exit code 0)."""
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ")
        except (KeyboardInterrupt, EOFError):
            console.print("\nbye")
            return 0
        if text.strip().lower() in QUIT:
            console.print("bye")
            return 0
        if not text.strip():
            continue
        try:
            answer(text)
        except KeyboardInterrupt:
            console.print("\n[yellow]cancelled[/yellow] (Ctrl-C again or Ctrl-D at the prompt exits)")
        except AspireError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False)
