"""The report in a real browser: headless Chromium loads the self-contained HTML from disk, with every
network feature off, and we check the rendered DOM (findings table, images decoded from data URIs), the
console (no errors, no failed loads) and a screenshot (not blank).

Chromium is Debian's `chromium` package; the session fixture installs it when it is missing and we are
root (CI runs `make test` as root on a clean machine). Without root or apt-get the tests are skipped,
saying why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aspire.report import build_report
from test_report import _Page, _store_findings, make_runs

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
# Appended to a copy of the page (never to the report): after load, count the images that decoded.
IMAGE_CHECK = ('<script>window.addEventListener("load", () => { const im = [...document.images]; '
               'document.body.dataset.imagesDecoded = im.filter(i => i.complete && i.naturalWidth > 0).length '
               '+ "/" + im.length; '
               # and how many evidence images are laid out (seen) in open and in collapsed findings
               'const seen = s => [...document.querySelectorAll(s)].filter(i => i.checkVisibility()).length; '
               'document.body.dataset.evidenceSeen = seen("details.finding[open] img") + "/" '
               '+ seen("details.finding:not([open]) img") + "/" '
               '+ document.querySelectorAll("details.finding:not([open]) img").length; });</script>')


def _find_chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; installed with apt-get when missing (apt-get update only if the install fails)."""
    found = _find_chromium()
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and we are not root, so it cannot be installed (apt-get install chromium)")
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium"]

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)

    result = run(install)
    if result.returncode != 0:
        run(["apt-get", "update"])
        result = run(install)
    found = _find_chromium()
    if result.returncode != 0 or not found:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"chromium could not be installed with apt-get: {last[0]}")
    return found


def _browse(chromium: str, page: Path, tmp: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run headless chromium on a file:// URL with a fresh profile; stderr carries the page's console."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
           page.resolve().as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _console_problems(stderr: str) -> list[str]:
    """Console messages (our page has no script: any message is an error or a failed load) and crashes."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line or "Uncaught" in line or "net::ERR_" in line or "FATAL" in line]


def _inspect(chromium: str, html: Path, tmp: Path) -> tuple[str, str]:
    """(rendered DOM, console output) of a copy of the page with the image-decoding check appended."""
    probe = tmp / f"inspect-{html.stem}.html"
    probe.write_text(html.read_text(encoding="utf-8").replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    result = _browse(chromium, probe, tmp, "--virtual-time-budget=5000", "--dump-dom")
    return result.stdout, result.stderr


def _decoded(dom: str) -> tuple[int, int]:
    m = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
    assert m, "the image check did not run"
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    runs = make_runs(tmp_path_factory.getbasetemp() / "report-runs")
    return runs, build_report(runs["full"], tmp_path_factory.mktemp("browser-report"))


def test_the_checks_catch_a_broken_page(chromium, tmp_path):
    """A page with a script error and an image that does not decode fails both checks (they can fail)."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><body><img src="data:image/png;base64,AAAA">'
                   '<script>throw new Error("broken page")</script></body></html>')
    dom, console = _inspect(chromium, bad, tmp_path)
    assert any("Uncaught" in line for line in _console_problems(console))
    assert _decoded(dom) == (0, 1)


def test_report_loads_in_chromium_with_its_table_and_images(chromium, full_report, tmp_path):
    runs, paths = full_report
    html = paths["html"]
    # 1. the DOM after loading: the findings table, every image decoded from an embedded data URI
    dom, console = _inspect(chromium, html, tmp_path)
    assert _console_problems(console) == []
    page = _Page(dom)
    findings = _store_findings(runs["full"])
    assert len(page.rows) == len(findings) > 0
    assert {(r[1], r[3]) for r in page.rows} == {(f.class_, f.kind) for f in findings}
    assert len(page.srcs) > 10 and all(s.startswith("data:image/") for s in page.srcs)
    assert _decoded(dom) == (len(page.srcs), len(page.srcs))
    # unconfirmed findings' evidence is collapsed: its images are in the page but not laid out
    m = re.search(r'data-evidence-seen="(\d+)/(\d+)/(\d+)"', dom)
    assert m, "the evidence check did not run"
    open_seen, collapsed_seen, collapsed_total = map(int, m.groups())
    assert open_seen > 0 and collapsed_total > 0 and collapsed_seen == 0

    # 2. the screenshot of the report itself: not blank, the dark header on top, content below
    shot = tmp_path / "report.png"
    result = _browse(chromium, html, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000",
                     "--hide-scrollbars")
    assert _console_problems(result.stderr) == []
    pixels = np.asarray(Image.open(shot).convert("RGB"))               # (2000, 1280, 3)
    assert pixels.shape[:2] == (2000, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500         # text, tables, chart, thumbnails
    header = pixels[5:40, 5:600].reshape(-1, 3).mean(0)
    assert header.max() < 80, f"the header is not dark: {header}"      # #17202a
    body = pixels[400:].reshape(-1, 3).mean(0)
    assert body.min() > 150, f"the page body is not light: {body}"
