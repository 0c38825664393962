"""Debian's Chromium driven by Playwright (never a downloaded browser)."""

import re
import shutil
import tempfile
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
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
            profile,
            executable_path=executable,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def new_notebook(page, kernel_display_name: str, timeout: float = 180_000) -> None:
    """Open a notebook on the kernel from the Launcher and wait until the kernel is idle."""
    page.locator(f".jp-LauncherCard[title='{kernel_display_name}']").first.click(timeout=timeout)
    page.get_by_text(f"{kernel_display_name} | Idle").wait_for(timeout=timeout)


def run_cell(page, index: int, code: str, attempts: int = 3) -> None:
    """Type ``code`` into cell ``index`` and run it, until its prompt shows it ran.

    JupyterLab can drop an execute request sent while the kernel connection settles, so an
    unexecuted cell is run again (Ctrl+Enter) before giving up.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".cm-content").click()
    page.keyboard.type(code)
    page.keyboard.press("Control+Enter")
    for _ in range(attempts):
        try:
            cell.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\d+|\*)\]")).wait_for(timeout=20_000)
            return
        except PlaywrightTimeout:
            cell.locator(".cm-content").click()
            page.keyboard.press("Control+Enter")
    raise AssertionError(f"cell {index} never ran")


def hub_login(page, hub, user: str) -> None:
    """Log in to ``hub`` (a tests.support.gpulab_up.Platform) with the user's own password (the user is
    created if new) and wait for the user's JupyterLab."""
    password = hub.create_user(user)
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url(f"{hub.url}/user/{user}/lab**", timeout=120_000)
