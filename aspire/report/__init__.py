"""The audit report of a run: HTML (self-contained), Markdown and JSON, read from the run store.

    render.py   RunReport: the run store read into the templates' context, and written
    assets.py   the report's images (thumbnails, data URIs, img/)   text.py  number formats, cells, templates
    plots.py    the charts        gradcam.py  Grad-CAM before and after the repair
    batch.py    the batch report (batch.html / batch.md over the class runs)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from aspire.report.render import RunReport


def build_report(run_dir: str | Path, out_dir: Optional[str | Path] = None, *, max_examples: int = 6,
                 max_gallery_findings: int = 12, device: Optional[str] = None) -> dict[str, Path]:
    """Write report.html, report.md and report.json (and img/) for the run in `run_dir`, by default into
    `<run_dir>/report`; returns their paths under the keys html, md and json."""
    report = RunReport(run_dir, max_examples=max_examples, max_gallery_findings=max_gallery_findings, device=device)
    try:
        return report.write(out_dir)
    finally:
        report.close()


__all__ = ["RunReport", "build_report"]
