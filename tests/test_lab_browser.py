"""JupyterLab in real Chromium against a real hub, job service and spawned JupyterLab: the gpulab side
panel lists the user's jobs live, follows a log, cancels, deletes and launches through the UI, and shows
the Models and Attestation tabs; %%train in a notebook on the RAPIDS kernel shows its monitor widget until
the job succeeds."""

import re
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.browser import chromium_page, hub_login, new_notebook, run_cell

pytestmark = pytest.mark.browser

TICKER = """
import gpulab, time
for i in range(600):
    print('tick', i, flush=True)
    gpulab.progress(i + 1, 600, loss=1 / (i + 1))
    time.sleep(0.2)
"""
CELL = "%%train --name browser-train\nimport gpulab, time; [gpulab.progress(i, 3, loss=1 / i) or time.sleep(0.5) for i in range(1, 4)]"


@pytest.fixture(scope="module")
def hub(gpulab_up):
    cohorts = {"lab": {"ml": {"default": {"cpus": 8}}, "cv": {"default": {"cpus": {"nominal": 8, "lending_limit": 2}}}}}
    return gpulab_up(
        "c.Platform.mlflow_service = False\nc.JobQueue.tick_interval = 0.2\n"
        f"c.JobQueue.cohorts = {cohorts!r}\nc.JobQueue.cohort_default_group = 'ml'\n"
    )


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def test_side_panel_follows_cancels_and_deletes_jobs(hub, output_dir):
    with chromium_page() as page:
        try:
            hub_login(page, hub, "nora")

            jobs_api = f"{hub.url}/services/gpulab-jobs/api/v1"
            auth = {"Authorization": f"token {hub.token('nora')}"}

            def submit(name, code):
                spec = {"name": name, "entrypoint": [sys.executable, "-c", code]}
                r = requests.post(f"{jobs_api}/jobs", json=spec, headers=auth, timeout=30)
                assert r.status_code == 201, r.text
                return r.json()["id"]

            def job(job_id):
                return requests.get(f"{jobs_api}/jobs/{job_id}", headers=auth, timeout=30)

            ticker, quick = submit("ticker", TICKER), submit("quick", "print('done')")

            page.locator(".jp-SideBar [data-id='gpulab-panel']").click(timeout=60_000)
            panel = page.locator(".jp-gpulab-Panel")
            panel.locator(".jp-gpulab-who", has_text="nora").wait_for(timeout=30_000)
            assert panel.get_by_role("tab").all_inner_texts() == [
                "Jobs",
                "Schedules",
                "Pipelines",
                "Quota",
                "Models",
                "Attestation",
            ]

            ticker_row = panel.locator(f"[data-job-id='{ticker}']")
            quick_row = panel.locator(f"[data-job-id='{quick}']")
            ticker_row.locator(".jp-gpulab-state-running").wait_for(timeout=60_000)
            ticker_row.locator(".jp-gpulab-progress", has_text="/600").wait_for(timeout=30_000)
            assert "loss=" in ticker_row.locator(".jp-gpulab-progress").inner_text()
            quick_row.locator(".jp-gpulab-state-succeeded").wait_for(timeout=60_000)

            # A queued job (in a pool no executor offers) is held and released from its card.
            r = requests.post(
                f"{jobs_api}/jobs",
                json={"name": "parked", "entrypoint": ["true"], "resources": {"pool": "later"}},
                headers=auth,
                timeout=30,
            )
            parked = panel.locator(f"[data-job-id='{r.json()['id']}']")
            parked.get_by_role("button", name="Hold").click(timeout=30_000)
            parked.locator(".jp-gpulab-reason", has_text="held by nora").wait_for(timeout=30_000)
            assert job(r.json()["id"]).json()["held"] is True
            parked.get_by_role("button", name="Release").click()
            wait_for(lambda: job(r.json()["id"]).json()["held"] is False, "the job to be released")
            parked.get_by_role("button", name="Cancel").click()
            wait_for(lambda: job(r.json()["id"]).json()["state"] == "cancelled", "the parked job to be cancelled")

            # The log tab follows the running job live.
            ticker_row.get_by_role("button", name="Logs").click()
            log = page.locator(".jp-gpulab-Log")
            log.get_by_text("tick 5").wait_for(timeout=30_000)

            ticker_row.get_by_role("button", name="Cancel").click()
            wait_for(lambda: job(ticker).json()["state"] == "cancelled", "the job to be cancelled")
            ticker_row.locator(".jp-gpulab-state-cancelled").wait_for(timeout=30_000)
            log.locator(".jp-gpulab-log-status", has_text="ticker: cancelled").wait_for(timeout=30_000)

            quick_row.get_by_role("button", name="Delete").click()
            wait_for(lambda: job(quick).status_code == 404, "the job to be deleted")
            quick_row.wait_for(state="detached", timeout=30_000)
            assert ticker_row.get_by_role("button", name="Cancel").count() == 0  # finished: Delete only

            # A job from the panel's form: the API's refusal is shown with its field; then it runs in the
            # file browser's folder (the server root here).
            panel.get_by_role("button", name="New job").click()
            form = panel.get_by_role("form", name="New job")
            form.get_by_label("Name").fill("from-panel")
            form.get_by_label("Command").fill(f"{sys.executable} -c \"import os; print('launched in', os.getcwd())\"")
            form.get_by_label("GPUs").fill("1")
            form.get_by_role("button", name="Submit").click()
            form.get_by_role("alert").filter(
                has_text="resources.gpus: requesting GPUs needs the custom:gpulab:gpu scope"
            ).wait_for(timeout=30_000)
            form.get_by_label("GPUs").fill("0")
            form.get_by_role("button", name="Submit").click()
            form.wait_for(state="detached", timeout=30_000)
            launched = panel.locator(".jp-gpulab-card", has_text="from-panel")
            launched.locator(".jp-gpulab-state-succeeded").wait_for(timeout=60_000)
            launched_id = launched.get_attribute("data-job-id")
            working_dir = job(launched_id).json()["spec"]["working_dir"]
            log = requests.get(f"{jobs_api}/jobs/{launched_id}/logs", headers=auth, timeout=30).text
            assert working_dir.startswith("/") and f"launched in {working_dir}" in log, (working_dir, log)

            # Filtering by state asks the API for that state only.
            panel.get_by_label("Filter jobs by state").select_option("running")
            panel.get_by_text("No running jobs.").wait_for(timeout=30_000)
            panel.get_by_label("Filter jobs by state").select_option("")
            ticker_row.wait_for(timeout=30_000)
            page.screenshot(path=str(output_dir / "lab-gpulab-panel.png"))

            # Notification preferences: a refusal names the field; saved, the API has them.
            panel.get_by_role("button", name="Notify…").click()
            prefs = panel.get_by_role("form", name="Notifications")
            prefs.get_by_label("E-mail").fill("not an address")
            prefs.get_by_role("button", name="Save").click()
            prefs.get_by_role("alert").filter(has_text="email").wait_for(timeout=30_000)
            prefs.get_by_label("E-mail").fill("")
            prefs.get_by_label("in JupyterLab").uncheck()
            prefs.get_by_label("cancelled").check()
            prefs.get_by_role("button", name="Save").click()
            prefs.wait_for(state="detached", timeout=30_000)
            saved = requests.get(f"{jobs_api}/notifications", headers=auth, timeout=30).json()
            assert saved["lab"] is False and saved["email"] is None, saved
            assert saved["states"] == ["cancelled", "failed", "succeeded", "timed_out"], saved

            # The Quota tab: nora is in no group, so her jobs use the default group's (ml's) share of cohort lab.
            panel.get_by_role("tab", name="Quota").click()
            cohort = panel.locator("table[data-cohort='lab']")
            cohort.get_by_text("Cohort lab").wait_for(timeout=30_000)
            assert cohort.locator("tbody tr").count() == 2
            mine = cohort.locator("tr.jp-mod-current")
            assert mine.get_attribute("data-group") == "ml"
            assert mine.locator("td").all_inner_texts()[:2] == ["ml\ncpus in default", "8"]
            assert "lending limit 2" in cohort.locator("tr[data-group='cv']").get_attribute("title")
            assert "your jobs use group ml's quota" in panel.locator(".jp-gpulab-quota-mine").inner_text()
            assert (
                cohort.locator("xpath=..")
                .locator(".jp-gpulab-fair-share")
                .inner_text()
                .startswith("Fair-share usage (h): cv 0, ml ")
            )
            page.screenshot(path=str(output_dir / "lab-quota-tab.png"))

            # This platform runs no inference service: the Models tab says so instead of failing.
            panel.get_by_role("tab", name="Models").click()
            panel.get_by_role("alert").filter(has_text="inference").wait_for(timeout=30_000)

            panel.get_by_role("tab", name="Attestation").click()
            panel.get_by_text("No GPU node has been attested").wait_for(timeout=30_000)
        except Exception:
            page.screenshot(path=str(output_dir / "lab-gpulab-panel-failure.png"))
            raise


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
            raise AssertionError(f"browser stopped at {page.url}") from None
        page.screenshot(path=str(output_dir / "lab-train-monitor.png"))


def put_file(hub, user: str, path: str, model: dict) -> str:
    """Write ``path`` in the user's running server through its contents API; the token used, for more calls."""
    token = hub.token(user)
    r = requests.put(
        f"{hub.url}/user/{user}/api/contents/{path}",
        json=model,
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    return token


PARAMETRISED = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "cells": [
        {
            "cell_type": "code",
            "id": "p",
            "metadata": {"tags": ["parameters"]},
            "execution_count": None,
            "outputs": [],
            "source": "greeting = 'hi'  # what to say\nrepeat = 2\n",
        },
        {
            "cell_type": "code",
            "id": "s",
            "metadata": {},
            "execution_count": None,
            "outputs": [],
            "source": "print('said:', greeting * repeat)",
        },
    ],
}


def test_run_as_job_from_the_notebook_toolbar_tells_when_it_ends(hub, output_dir):
    """The notebook's toolbar "Run as job…": the dialog offers the parameters of the cell tagged parameters; a bad
    value is refused in the dialog, a good one runs the notebook as a job; when it ends a JupyterLab notification
    says so, and its "Open output" opens the executed notebook with the parameter injected."""
    with chromium_page() as page:
        try:
            hub_login(page, hub, "rita")
            token = put_file(hub, "rita", "say.ipynb", {"type": "notebook", "format": "json", "content": PARAMETRISED})
            page.goto(f"{hub.url}/user/rita/lab/tree/say.ipynb")
            page.locator(".jp-gpulab-run-as-job").click(timeout=120_000)

            dialog = page.get_by_role("dialog")
            dialog.get_by_label("Parameter greeting").wait_for(timeout=30_000)
            assert dialog.get_by_label("Parameter greeting").input_value() == "hi"
            assert dialog.get_by_label("Parameter repeat").input_value() == "2"
            dialog.get_by_label("Parameter repeat").fill("three")
            dialog.get_by_role("button", name="Run").click()
            page.get_by_role("dialog").get_by_role("alert").filter(
                has_text='repeat: "three" is not an integer'
            ).wait_for(timeout=30_000)
            dialog = page.get_by_role("dialog")
            assert dialog.get_by_label("Parameter repeat").input_value() == "three"  # the choices are kept
            dialog.get_by_label("Parameter repeat").fill("3")
            dialog.get_by_label("Files to include").select_option("folder")
            page.screenshot(path=str(output_dir / "lab-run-as-job-dialog.png"))
            dialog.get_by_role("button", name="Run").click()

            toast = page.locator(".Toastify__toast", has_text="Job say succeeded")
            toast.wait_for(timeout=120_000)
            jobs_api = f"{hub.url}/services/gpulab-jobs/api/v1"
            [job] = requests.get(f"{jobs_api}/jobs", headers={"Authorization": f"token {token}"}, timeout=30).json()[
                "jobs"
            ]
            assert job["state"] == "succeeded" and job["spec"]["notebook"]["parameters"] == {"repeat": 3}, job
            assert job["spec"]["notebook"]["files"] == ["."] and "/.gpulab-snapshots/say-" in job["spec"]["working_dir"]
            page.screenshot(path=str(output_dir / "lab-job-ended-notification.png"))

            toast.get_by_role("button", name="Open output").click()
            output = job["output_notebook"].rsplit("/", 1)[1]
            page.locator(f".jp-DocumentWidget[title*='{output}'], .lm-TabBar-tab[title*='{output}']").first.wait_for(
                timeout=60_000
            )
            page.locator(".jp-OutputArea-output", has_text="said: hihihi").wait_for(timeout=60_000)

            # Deleting the job through this server removes the copy of the folder made for it.
            snapshot = Path(job["spec"]["working_dir"])
            assert (snapshot / "say.ipynb").exists()
            r = requests.delete(
                f"{hub.url}/user/rita/gpulab/api/v1/jobs/{job['id']}",
                headers={"Authorization": f"token {token}"},
                timeout=30,
            )
            assert r.status_code == 204, r.text
            assert not snapshot.exists() and snapshot.parent.exists()

            # The file browser's context menu offers it for a notebook too.
            page.locator(".jp-DirListing-item[data-file-type='notebook']", has_text="say.ipynb").click(button="right")
            page.locator(".lm-Menu-item", has_text="Run as job…").click(timeout=30_000)
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("say.ipynb", exact=True).wait_for(timeout=30_000)
            dialog.get_by_role("button", name="Cancel").click()

            # On a schedule: a bad cron is refused by the job service, named in the dialog; then it is made and the
            # Schedules tab pauses and deletes it.
            page.locator(".lm-TabBar-tabLabel", has_text=re.compile(r"^say\.ipynb$")).click()
            page.locator(".jp-gpulab-run-as-job:visible").click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_label("When").select_option("schedule")
            dialog.get_by_label("Cron").fill("every night")
            dialog.get_by_label("Time zone").fill("Europe/Berlin")
            dialog.get_by_role("button", name="Run").click()
            page.get_by_role("dialog").get_by_role("alert").filter(has_text="cron: must have five fields").wait_for(
                timeout=30_000
            )
            page.get_by_role("dialog").get_by_label("Cron").fill("0 3 * * *")
            page.get_by_role("dialog").get_by_role("button", name="Run").click()
            page.locator(".Toastify__toast", has_text="Schedule say made: next run").wait_for(timeout=30_000)
            auth = {"Authorization": f"token {token}"}
            [schedule] = requests.get(f"{jobs_api}/schedules", headers=auth, timeout=30).json()["schedules"]
            assert (schedule["cron"], schedule["timezone"], schedule["state"]) == (
                "0 3 * * *",
                "Europe/Berlin",
                "active",
            )
            assert schedule["job"]["notebook"]["parameters"] == {}

            page.locator(".jp-SideBar [data-id='gpulab-panel']").click()
            page.locator(".jp-gpulab-Panel").get_by_role("tab", name="Schedules").click()
            card = page.locator(f"[data-schedule-id='{schedule['id']}']")
            card.get_by_role("button", name="Pause").click(timeout=30_000)
            card.locator(".jp-gpulab-state", has_text="paused").wait_for(timeout=30_000)
            assert (
                requests.get(f"{jobs_api}/schedules/{schedule['id']}", headers=auth, timeout=30).json()["state"]
                == "paused"
            )
            page.screenshot(path=str(output_dir / "lab-schedules-tab.png"))
            card.get_by_role("button", name="Delete").click()
            card.wait_for(state="detached", timeout=30_000)
            assert requests.get(f"{jobs_api}/schedules", headers=auth, timeout=30).json()["schedules"] == []
        except Exception:
            page.screenshot(path=str(output_dir / "lab-run-as-job-failure.png"))
            raise


PIPELINE = """name: nightly
steps:
  - {name: prep, source: "raise SystemExit('no data today')"}
  - {name: train, source: "print('training')", needs: [prep]}
  - {name: report, source: "print('report')"}
"""


def test_run_pipeline_from_the_file_browser_and_see_its_graph(hub, output_dir):
    """A pipeline file's context menu "Run pipeline": the Pipelines tab draws its steps, the failed one, the one
    that needed it cancelled, and the independent one that ran; one notification tells the pipeline ended."""
    with chromium_page() as page:
        try:
            hub_login(page, hub, "pia")
            put_file(hub, "pia", "nightly.yaml", {"type": "file", "format": "text", "content": PIPELINE})
            item = page.locator(".jp-DirListing-item[data-file-type='yaml']", has_text="nightly.yaml")
            item.click(button="right", timeout=60_000)
            page.locator(".lm-Menu-item", has_text="Run pipeline").click(timeout=30_000)
            page.locator(".Toastify__toast", has_text="Pipeline nightly submitted").wait_for(timeout=60_000)

            page.locator(".jp-SideBar [data-id='gpulab-panel']").click()
            panel = page.locator(".jp-gpulab-Panel")
            panel.get_by_role("tab", name="Pipelines").click()
            graph = panel.locator("svg.jp-gpulab-graph")
            for step, state in [("prep", "failed"), ("train", "cancelled"), ("report", "succeeded")]:
                graph.locator(f"g[data-step='{step}'][data-state='{state}']").wait_for(timeout=120_000)
            assert graph.locator("line.jp-gpulab-graph-edge").count() == 1  # train needs prep
            reason = graph.locator("g[data-step='train'] title").text_content()
            assert reason.startswith("train: cancelled (dependency ") and reason.endswith("cannot be met); needs prep")
            card = panel.locator(".jp-gpulab-pipelines li.jp-gpulab-card").first
            assert card.locator(".jp-gpulab-state").text_content() == "failed"
            told = page.locator(".Toastify__toast", has_text="Pipeline nightly failed")  # once, not step by step
            told.wait_for(timeout=30_000)
            assert "prep failed, train cancelled" in told.text_content()
            assert page.locator(".Toastify__toast", has_text="Job prep").count() == 0
            page.screenshot(path=str(output_dir / "lab-pipeline-graph.png"))
        except Exception:
            page.screenshot(path=str(output_dir / "lab-pipeline-failure.png"))
            raise
