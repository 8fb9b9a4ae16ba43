"""Browser tooling shared by tests/test_browser.py and scripts/screenshot.py.

Playwright (Python) drives Debian's Chromium at /usr/bin/chromium; no
``playwright install`` download is ever needed.
"""

from __future__ import annotations

import os

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def missing_browser_reason() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


def launch(playwright):
    """Launches headless Chromium from /usr/bin/chromium."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_panel(page, base_url: str, timeout_ms: int = 30000):
    """Opens TensorBoard's Stability tab and returns the panel's iframe once findings show."""
    page.goto(base_url + "/#stability")
    page.wait_for_selector("iframe", timeout=timeout_ms)
    frame = None
    page.wait_for_function(
        "() => [...document.querySelectorAll('iframe')].some(f => f.src.includes('plugin_entry'))",
        timeout=timeout_ms,
    )
    for candidate in page.frames:
        if "plugin_entry.html" in candidate.url and "name=stability" in candidate.url:
            frame = candidate
    if frame is None:
        raise RuntimeError("the Stability iframe did not load")
    frame.wait_for_selector(".tb-stability[data-ready=true]", timeout=timeout_ms)
    frame.wait_for_selector(".run-view[data-loaded=true]", timeout=timeout_ms)
    return frame
