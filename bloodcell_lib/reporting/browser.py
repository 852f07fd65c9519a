"""Headless Chromium (Debian's ``/usr/bin/chromium``, driven by playwright): render a local
HTML page, e.g. reports/index.html, to PNG.

    bloodcell screenshot [PAGE.html [OUT.png]] [--width W] [--height H] [--full-page]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from bloodcell_lib.core.fileio import atomic_write_bytes
from bloodcell_lib.core.paths import PROJECT_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def launch_chromium(playwright):
    """Headless Chromium from the system package (never ``playwright install``);
    $BLOODCELL_CHROMIUM names another binary."""
    path = os.environ.get("BLOODCELL_CHROMIUM", CHROMIUM)
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)


def screenshot(page_path: str | os.PathLike, png_path: str | os.PathLike, *, width: int = 1280,
               height: int = 900, full_page: bool = True) -> Path:
    """Render a local HTML page (e.g. reports/index.html) to PNG with headless Chromium."""
    from playwright.sync_api import sync_playwright

    page_path, png_path = Path(page_path).absolute(), Path(png_path)
    if not page_path.is_file():
        raise FileNotFoundError(f"{page_path} does not exist; build the reports first (./run_all.sh)")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(page_path.as_uri(), wait_until="load")
            data = page.screenshot(full_page=full_page, type="png")
        finally:
            browser.close()
    return atomic_write_bytes(png_path, data)


def main(argv: Sequence[str]) -> int:
    """``bloodcell screenshot [PAGE.html [OUT.png]]``."""
    from bloodcell_lib.reporting.records import INDEX_FILE, reports_dir

    parser = argparse.ArgumentParser(prog="bloodcell screenshot",
                                     description="Render a local HTML page to PNG with headless Chromium.")
    parser.add_argument("page", nargs="?", default=str(reports_dir() / INDEX_FILE))
    parser.add_argument("out", nargs="?", default=str(PROJECT_ROOT / "docs" / "report-screenshot.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--full-page", action="store_true", help="the whole page, not just the first screen")
    opts = parser.parse_args(list(argv))
    print(screenshot(opts.page, opts.out, width=opts.width, height=opts.height, full_page=opts.full_page))
    return 0
