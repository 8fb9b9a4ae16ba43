#!/usr/bin/env python3
"""Screenshot of the Stability panel for a logdir, into docs/panel.png.

Starts a real ``tensorboard --logdir LOGDIR`` (this checkout's plugin), opens
the Stability tab in Debian's Chromium via Playwright (the same tooling as
tests/test_browser.py), selects the worst finding so the charts zoom to it,
and saves a PNG.

Usage::

    .venv/bin/python scripts/screenshot.py LOGDIR [--out docs/panel.png]
    .venv/bin/python scripts/screenshot.py --demo   # the browser tests' logdir
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests import browser_support, plugin_support  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> int:
    """Parses arguments, takes the screenshot; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", nargs="?", help="logdir to show")
    parser.add_argument("--demo", action="store_true", help="write and show the test logdir")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "panel.png"))
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--dark", action="store_true", help="TensorBoard's dark mode")
    parser.add_argument("--no-select", action="store_true", help="do not select a finding")
    args = parser.parse_args(argv)
    reason = browser_support.missing_browser_reason()
    if reason:
        print(f"screenshot.py: cannot take a screenshot: {reason}", file=sys.stderr)
        return 2
    if args.demo:
        args.logdir = plugin_support.build_logdir(os.path.join(tempfile.mkdtemp(), "logs"))
    if not args.logdir or not os.path.isdir(args.logdir):
        parser.error("give an existing LOGDIR or --demo")
    args.logdir = os.path.abspath(args.logdir)  # TensorBoard runs in another directory
    from playwright.sync_api import sync_playwright  # pylint: disable=import-outside-toplevel

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with plugin_support.TensorBoardProcess(args.logdir) as tb, sync_playwright() as playwright:
        browser = browser_support.launch(playwright)
        try:
            page = browser.new_page(
                viewport={"width": args.width, "height": args.height},
                color_scheme="dark" if args.dark else "light",
            )
            frame = browser_support.open_panel(page, tb.url)
            if not args.no_select and frame.locator(".finding").count():
                frame.locator(".finding").first.click()
                page.wait_for_timeout(300)
            frame.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(200)
            page.screenshot(path=args.out)
        finally:
            browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
