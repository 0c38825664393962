"""In JupyterLab (real Chromium), %%train in a notebook on the RAPIDS kernel; the monitor widget reaches succeeded."""

import pytest

from tests.support.browser import chromium_page, hub_login, new_notebook, run_cell
from tests.support.gpulab_up import Platform

pytestmark = pytest.mark.browser

CELL = "%%train --name browser-train\nimport gpulab, time; [gpulab.progress(i, 3, loss=1 / i) or time.sleep(0.5) for i in range(1, 4)]"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = Platform(tmp_path_factory.mktemp("lab") / "data", host="127.0.0.14")
    hub.start("c.Platform.mlflow_service = False\nc.JobQueue.tick_interval = 0.2\n")
    yield hub
    hub.stop()


def test_train_in_lab_shows_the_monitor_until_succeeded(hub, output_dir):
    with chromium_page() as page:
        try:
            hub_login(page, hub, "lena")
            new_notebook(page, "Python 3 (GPU, RAPIDS)")
            run_cell(page, 0, "%load_ext gpulab")
            page.locator(".jp-OutputArea-output", has_text="no GPU found").first.wait_for(timeout=60_000)
            page.locator(".jp-NotebookPanel-toolbar [data-command='notebook:insert-cell-below']").click()
            run_cell(page, 1, CELL)
            page.locator(".widget-html", has_text="succeeded").first.wait_for(timeout=180_000)
            page.get_by_text("3/3", exact=True).first.wait_for(timeout=10_000)
        except Exception:
            page.screenshot(path=str(output_dir / "lab-train-failure.png"))
            raise AssertionError(f"browser stopped at {page.url}")
        page.screenshot(path=str(output_dir / "lab-train-monitor.png"))
