"""Debian's Chromium driven by Playwright (never a downloaded browser)."""

import shutil
import tempfile
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@contextmanager
def chromium_page():
    """A fresh Chromium profile and page; skips the test when Chromium is not installed."""
    executable = shutil.which("chromium")
    if not executable:
        pytest.skip("Chromium is not installed (scripts/test installs it)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
