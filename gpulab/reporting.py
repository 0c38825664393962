"""Progress reporting for job code: ``gpulab.progress(step, total=None, **metrics)``.

Inside a gpulab job (``GPULAB_JOB_ID`` set) a call never blocks on the network: a
background thread posts the newest ``{"step", "total", "metrics"}`` to
``{GPULAB_JOBS_URL}/jobs/{GPULAB_JOB_ID}/progress`` (job-token auth) at most every
0.25 s, and the last call is always sent, at the latest at interpreter exit; it
also logs every call's metrics, with ``step``, to the job's MLflow run
(``GPULAB_MLFLOW_RUN_ID``, else ``MLFLOW_RUN_ID``, both set by :mod:`gpulab.runner`).
Metrics go to W&B too: to the active ``wandb.run``, or to a run started from the job's
W&B environment when ``WANDB_PROJECT`` is set. Outside a job it prints one line.

An unreachable service, MLflow or W&B never raises here: each outage is reported
once, as one line on stderr with secrets masked.
"""

import atexit
import json
import math
import os
import sys
import threading
import time
import urllib.request

from .secrets import JOB_SECRET_ENV

MIN_INTERVAL = 0.25  # seconds between progress posts: at most ~4 per second
FLUSH_TIMEOUT = 10.0  # seconds the interpreter waits at exit for the last report


def warn(message: str) -> None:
    """Print ``message`` as one stderr line, with the job's secrets masked."""
    for name in JOB_SECRET_ENV:
        if secret := os.environ.get(name):
            message = message.replace(secret, "***")
    print(" ".join(message.split())[:500], file=sys.stderr, flush=True)


def post_to_service(
    endpoint: str, body: dict, traceparent: str | None = None, timeout: float = 5.0, authorization: str | None = None
) -> bytes:
    """POST ``body`` to ``{GPULAB_JOBS_URL}/jobs/{GPULAB_JOB_ID}/{endpoint}`` with the job token (or
    ``authorization``); returns the answer's body.

    ``traceparent`` defaults to ``$TRACEPARENT``; raises on any failure (``OSError``).
    """
    env = os.environ
    authorization = authorization or f"job-token {env.get('GPULAB_JOB_TOKEN', '')}"
    headers = {"Content-Type": "application/json", "Authorization": authorization}
    if traceparent := traceparent or env.get("TRACEPARENT"):
        headers["traceparent"] = traceparent
    url = f"{env['GPULAB_JOBS_URL'].rstrip('/')}/jobs/{env['GPULAB_JOB_ID']}/{endpoint}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


class _Reporter(threading.Thread):
    """Posts the newest progress (throttled) and logs metric batches to MLflow, off the caller's thread."""

    def __init__(self):
        super().__init__(name="gpulab-progress", daemon=True)
        self._cond = threading.Condition()
        self._latest: dict | None = None  # newest report not yet posted
        self._metrics: list = []  # (step, metrics, timestamp ms) not yet logged to MLflow
        self._closing = False
        self._failing: set[str] = set()
        self._post = bool(os.environ.get("GPULAB_JOBS_URL"))
        self._tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        run_id = os.environ.get("GPULAB_MLFLOW_RUN_ID") or os.environ.get("MLFLOW_RUN_ID")
        self._run_id = run_id if self._tracking_uri else None
        atexit.register(self.close)
        self.start()

    def add(self, step: int, total: int | None, metrics: dict[str, float]) -> None:
        with self._cond:
            if self._post:
                finite = {name: value if math.isfinite(value) else None for name, value in metrics.items()}
                self._latest = {"step": step, "total": total, "metrics": finite}  # JSON has no NaN
            if self._run_id and metrics:
                self._metrics.append((step, metrics, int(time.time() * 1000)))
            self._cond.notify()

    def close(self) -> None:
        """Send what is pending and stop (waits at most ``FLUSH_TIMEOUT``)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self.join(FLUSH_TIMEOUT)

    def run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._latest or self._metrics or self._closing)
                latest, batch, closing = self._latest, self._metrics, self._closing
                self._latest, self._metrics = None, []
            if batch:
                self._attempt("MLflow metric logging", self._log_mlflow, batch)
            if latest:
                self._attempt("progress report", post_to_service, "progress", latest)
            if closing and not latest and not batch:
                return
            with self._cond:  # throttle, unless closing
                self._cond.wait_for(lambda: self._closing, MIN_INTERVAL)

    def _log_mlflow(self, batch: list) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for step, values, ts in batch for k, v in values.items()]
        MlflowClient(self._tracking_uri).log_batch(self._run_id, metrics=metrics)

    def _attempt(self, what: str, call, *args) -> None:
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - a report must never break the job
            if what not in self._failing:
                self._failing.add(what)
                warn(f"gpulab.progress: {what} failed ({type(exc).__name__}: {exc}); carrying on")
        else:
            self._failing.discard(what)


_reporter: _Reporter | None = None
_reporter_lock = threading.Lock()
_wandb_failed = False


def _log_wandb(step: int, metrics: dict[str, float]) -> None:
    """Log to the active W&B run, starting one first when ``WANDB_PROJECT`` is set."""
    global _wandb_failed
    wandb = sys.modules.get("wandb")
    if _wandb_failed or not metrics or ((wandb is None or wandb.run is None) and not os.environ.get("WANDB_PROJECT")):
        return
    try:
        import wandb

        run = wandb.run or wandb.init()
        run.log(metrics, step=step)
    except Exception as exc:  # noqa: BLE001
        _wandb_failed = True
        warn(f"gpulab.progress: W&B logging failed ({type(exc).__name__}: {exc}); not logging to W&B")


def progress(step: int, total: int | None = None, **metrics: float) -> None:
    """Report that the job reached ``step`` (of ``total``), with numeric ``metrics`` (e.g. ``loss=0.3``)."""
    metrics = {name: float(value) for name, value in metrics.items()}
    if not os.environ.get("GPULAB_JOB_ID"):
        shown = " ".join(f"{name}={value:.6g}" for name, value in metrics.items())
        print(f"progress: step {step}{f'/{total}' if total is not None else ''} {shown}".rstrip(), flush=True)
        return
    global _reporter
    with _reporter_lock:
        if _reporter is None:
            _reporter = _Reporter()
    _reporter.add(step, total, metrics)
    _log_wandb(step, metrics)
