"""ipywidgets for jobs: :class:`Launcher` (a submit form), :class:`Monitor` (one job, live), :class:`JobList`.

Monitor and JobList poll the job service in a daemon thread, so they keep updating while
the kernel runs other cells; a Monitor stops when its job ends, a JobList when closed.
"""

import html
import shlex
import threading

import ipywidgets as widgets

from .client import GpulabError, Job, JobsClient, default_client, job_spec

BAR_STYLES = {"succeeded": "success", "failed": "danger", "timed_out": "danger", "cancelled": "warning"}


def _error_html(exc: object) -> str:
    return f'<span style="color:var(--jp-error-color1,#c00)">{html.escape(str(exc))}</span>'


class Monitor(widgets.VBox):
    """State, progress bar, latest metrics, log tail, MLflow/W&B links and a Cancel button for ``job``."""

    def __init__(self, job: Job, interval: float = 1.0, log_lines: int = 40):
        self.job, self.interval, self.log_lines = job, interval, log_lines
        self.header = widgets.HTML()
        self.status = widgets.HTML()
        self.bar = widgets.FloatProgress(min=0.0, max=1.0, layout=widgets.Layout(width="40%"))
        self.metrics = widgets.HTML()
        self.links = widgets.HTML()
        self.log_tail = widgets.Textarea(disabled=True, layout=widgets.Layout(width="100%", height="12em"))
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", button_style="danger")
        self.cancel_button.on_click(self._on_cancel)
        super().__init__(
            [
                self.header,
                widgets.HBox([self.bar, self.status]),
                self.metrics,
                self.links,
                self.log_tail,
                self.cancel_button,
            ]
        )
        self._log_text, self._offset, self._tracking = "", 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gpulab-monitor-{job.id[:8]}", daemon=True)
        self._render()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.job.refresh()
                text, self._offset = self.job.client.log_from(self.job.id, self._offset)
            except GpulabError as exc:
                self.status.value = f"<b>{self.job.state}</b> " + _error_html(f"{exc} (retrying)")
            else:
                self._log_text = "".join((self._log_text + text).splitlines(keepends=True)[-self.log_lines :])
                self.log_tail.value = self._log_text
                self._render()
                if self.job.done:
                    return
            self._stop.wait(self.interval)

    def _render(self) -> None:
        job, progress = self.job, self.job.progress
        gpus = job.data["resources"]["gpus"]
        self.header.value = (
            f"<b>{html.escape(job.name)}</b> <code>{job.id}</code> · {job.data['kind']}"
            f" · {gpus} GPU{'s' * (gpus != 1)} · pool {html.escape(job.data['pool'])}"
        )
        self.status.value = f"<b>{job.state}</b> {html.escape(job.state_reason)}"
        fraction = 1.0 if job.state == "succeeded" else progress.get("fraction")
        self.bar.value = fraction or 0.0
        self.bar.bar_style = BAR_STYLES.get(job.state, "info")
        step, total = progress.get("step"), progress.get("total")
        self.bar.description = "" if step is None else f"{step}/{total}" if total else f"step {step}"
        self.metrics.value = " · ".join(
            f"{html.escape(k)} = {v:.4g}" if isinstance(v, float | int) else f"{html.escape(k)} = {v}"
            for k, v in progress.get("metrics", {}).items()
        )
        self.cancel_button.disabled = job.done
        tracking = (job.mlflow_run_id, job.wandb_run_path)
        if tracking != self._tracking and any(tracking) and threading.current_thread() is self._thread:
            self._tracking = tracking  # (looking up the MLflow experiment is a network call: not in __init__)
            links = []
            if job.mlflow_run_id:
                url = job.mlflow_url
                run = f"<code>{job.mlflow_run_id}</code>"
                links.append(
                    f'MLflow run <a href="{html.escape(url)}" target="_blank">{run}</a>' if url else f"MLflow run {run}"
                )
            if job.wandb_run_path:
                links.append(f"W&amp;B run <code>{html.escape(job.wandb_run_path)}</code>")
            self.links.value = " · ".join(links)

    def _on_cancel(self, _button) -> None:
        self.cancel_button.disabled = True
        self.status.value = f"<b>{self.job.state}</b> cancelling…"

        def cancel():
            try:
                self.job.client.cancel(self.job.id)
            except GpulabError as exc:
                self.status.value = f"<b>{self.job.state}</b> " + _error_html(exc)
                self.cancel_button.disabled = self.job.done

        threading.Thread(target=cancel, name="gpulab-cancel", daemon=True).start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the monitor has shown the job's final state (at most ``timeout`` s); whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        super().close()

    def __repr__(self) -> str:
        return f"Monitor({self.job!r})"


class Launcher(widgets.VBox):
    """A job form: a script (with arguments) or code, resources within the user's scopes and quota,
    experiment, name, priority. :meth:`spec` is the JobSpec it submits; Submit shows a Monitor."""

    def __init__(self, code: str = "", client: JobsClient | None = None):
        self.client = client or default_client()
        self.pools = {p["name"]: p for p in self.client.pools()}
        self.what = widgets.ToggleButtons(options=[("Script", "script"), ("Code", "code")], description="Run")
        self.script = widgets.Text(description="Script", placeholder="train.py")
        self.args = widgets.Text(description="Arguments", placeholder="--epochs 5")
        self.code = widgets.Textarea(code, description="Code", layout=widgets.Layout(width="100%", height="10em"))
        self.pool = widgets.Dropdown(options=sorted(self.pools) or ["default"], description="Pool")
        self.gpus = widgets.BoundedIntText(0, min=0, max=0, description="GPUs")
        self.gpu_note = widgets.HTML()
        self.cpus = widgets.BoundedFloatText(1.0, min=0.1, max=1024.0, step=0.5, description="CPUs")
        self.experiment = widgets.Text(description="Experiment", placeholder="(job name)")
        self.name = widgets.Text(description="Name", placeholder="(script or notebook name)")
        self.priority = widgets.IntSlider(0, min=-100, max=100, description="Priority")
        self.submit_button = widgets.Button(description="Submit", icon="play", button_style="primary")
        self.message = widgets.HTML()
        self.output = widgets.Output()
        self.what.observe(self._show_fields, "value")
        self.pool.observe(self._limit_resources, "value")
        self.submit_button.on_click(lambda _: self._on_submit())
        super().__init__(
            [
                self.what,
                self.script,
                self.args,
                self.code,
                self.pool,
                widgets.HBox([self.gpus, self.gpu_note]),
                self.cpus,
                self.experiment,
                self.name,
                self.priority,
                widgets.HBox([self.submit_button, self.message]),
                self.output,
            ]
        )
        self._show_fields()
        self._limit_resources()

    def _show_fields(self, _change=None) -> None:
        script = self.what.value == "script"
        self.script.layout.display = self.args.layout.display = None if script else "none"
        self.code.layout.display = "none" if script else None

    def _limit_resources(self, _change=None) -> None:
        if pool := self.pools.get(self.pool.value):
            self.cpus.max = pool["capacity"]["cpus"]
        limit, why = self.client.gpu_limit(self.pool.value)
        self.gpus.max = limit
        self.gpus.disabled = limit == 0
        self.gpu_note.value = f"at most {limit}: {html.escape(why)}"

    def spec(self) -> dict:
        """The JobSpec dict Submit would send."""
        fields = {
            "name": self.name.value.strip() or None,
            "gpus": self.gpus.value,
            "cpus": self.cpus.value,
            "pool": self.pool.value,
            "experiment": self.experiment.value.strip() or None,
            "priority": self.priority.value,
        }
        if self.what.value == "code":
            if not self.code.value.strip():
                raise GpulabError("write the job's code in the Code box")
            return job_spec(source=self.code.value, **fields)
        if not self.script.value.strip():
            raise GpulabError("give the script to run, e.g. train.py")
        try:
            args = shlex.split(self.args.value)
        except ValueError as exc:
            raise GpulabError(f"arguments: {exc}") from None
        return job_spec(entrypoint=["python", self.script.value.strip(), *args], **fields)

    def submit(self) -> Job:
        """Submit :meth:`spec`; show the job's Monitor below the form."""
        job = self.client.submit(self.spec())
        self.output.clear_output()
        self.output.append_display_data(Monitor(job))
        self.message.value = f"submitted <code>{job.id}</code>"
        return job

    def _on_submit(self) -> None:
        try:
            self.submit()
        except GpulabError as exc:
            self.message.value = _error_html(exc)


class JobList(widgets.VBox):
    """The user's jobs (every user's with ``all=True``, admins only) as a table refreshed every ``interval`` s."""

    def __init__(
        self,
        all: bool = False,
        state: str | None = None,
        limit: int = 50,
        interval: float = 5.0,
        client: JobsClient | None = None,
    ):
        self.client, self.all, self.state, self.limit, self.interval = (
            client or default_client(),
            all,
            state,
            limit,
            interval,
        )
        self.table = widgets.HTML()
        self.message = widgets.HTML()
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.refresh())
        super().__init__([widgets.HBox([self.refresh_button, self.message]), self.table])
        self.jobs = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpulab-joblist", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        try:
            self.jobs = self.client.list(state=self.state, all=self.all, limit=self.limit)
        except GpulabError as exc:
            self.message.value = _error_html(exc)
        else:
            self.table.value = self.jobs._repr_html_()
            self.message.value = ""

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()
        super().close()
