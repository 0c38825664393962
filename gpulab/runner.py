"""The job runtime: ``python -m gpulab.runner -- <argv...>`` wraps every job attempt.

It continues the trace in ``TRACEPARENT``, changes to ``GPULAB_WORKING_DIR``, opens an
MLflow run for the attempt (when ``MLFLOW_TRACKING_URI`` is set) in
``MLFLOW_EXPERIMENT_NAME`` (default "Default"), prepares W&B's environment (offline
unless ``WANDB_API_KEY`` and ``WANDB_BASE_URL`` are set; all dirs under
``GPULAB_JOB_DIR``, else ``WANDB_DIR``), reports the run ids to the job service, runs ``argv`` as a child in
its process group (SIGTERM and SIGINT are forwarded to it), heartbeats every 10 s, ends
the MLflow run FINISHED, FAILED or KILLED (signalled) and exits as the child did (a
child killed by signal N kills the runner with N).

The child gets ``MLFLOW_RUN_ID`` (so ``mlflow.start_run()`` and ``mlflow.log_*`` resume
the attempt's run), ``GPULAB_MLFLOW_RUN_ID`` (the same id, which mlflow does not
consume), ``MLFLOW_EXPERIMENT_ID``, ``TRACEPARENT`` of the runner's span and, with
``WANDB_PROJECT`` set, ``WANDB_RUN_ID`` and ``WANDB_NAME``: the runner starts no W&B run
itself (offline runs cannot be shared between processes); the child's ``wandb.init()``
or :func:`gpulab.progress` makes it.

Unreachable service or MLflow never fails the job: calls are retried with backoff,
then one line goes to stderr. Other inputs: ``GPULAB_JOB_ID``, ``GPULAB_JOB_OWNER``,
``GPULAB_JOB_NAME``, ``GPULAB_JOB_ATTEMPT``, ``GPULAB_JOBS_URL``, ``GPULAB_JOB_TOKEN`` and, for
attestation-gated jobs, ``GPULAB_ATTESTATION_FINGERPRINT`` (tagged on the MLflow run as
``gpulab.attestation_fingerprint``).

On executors whose job environments others can read (Ray's dashboard), the attempt has no secrets in its
environment but ``GPULAB_CREDENTIALS_TICKET``: the runner first claims them with it from the job service,
once. A ticket someone else claimed first (409) or that is refused stops the attempt before the job runs:
its credentials are someone else's now.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

from opentelemetry import trace
from tenacity import retry, retry_if_not_exception_type, stop_after_attempt, wait_exponential

from .reporting import post_to_service, warn
from .tracing import extract, inject, setup_tracing, tracer

HEARTBEAT_INTERVAL = 10.0
_service_retry = retry(stop=stop_after_attempt(3), wait=wait_exponential(multiplier=0.5, max=2), reraise=True)
# a claim is retried only when the service gave no answer: a refusal is final
_claim_retry = retry(
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.5, max=2),
    reraise=True,
    retry=retry_if_not_exception_type(urllib.error.HTTPError),
)
_mlflow_retry = retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=1, max=4), reraise=True)


def _attempt(what: str, call, *args):
    """``call(*args)``; on failure one stderr line and ``None``."""
    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001 - tracking must never break the job
        warn(f"gpulab.runner: {what} failed ({type(exc).__name__}: {exc}); carrying on")
        return None


class Runner:
    """One job attempt around the child process ``argv``."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        env = os.environ
        self.job_id = env.get("GPULAB_JOB_ID", "")
        self.attempt = env.get("GPULAB_JOB_ATTEMPT", "1")
        self.name = env.get("GPULAB_JOB_NAME") or self.job_id
        self.reporting = bool(env.get("GPULAB_JOBS_URL") and self.job_id)
        self.child: subprocess.Popen | None = None
        self.signalled = 0
        self.forwarded = False
        self.done = threading.Event()

    def run(self, trace_id: str) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if os.environ.get("GPULAB_CREDENTIALS_TICKET") and not self._claim_credentials():
            return 1
        child_env = dict(os.environ)
        child_env.update(TRACEPARENT=inject({}).get("traceparent", ""))
        # the runner retries MLflow itself; MLflow's own retries would stall the job's start for minutes
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="20")
        tracking = {"mlflow_run_id": None, "mlflow_experiment_id": None, "wandb_run_path": self._wandb_env(child_env)}
        if os.environ.get("MLFLOW_TRACKING_URI"):
            run = _attempt("opening the MLflow run", _mlflow_retry(self._create_mlflow_run), trace_id)
            if run:
                tracking.update(mlflow_run_id=run.info.run_id, mlflow_experiment_id=run.info.experiment_id)
                child_env.update(
                    MLFLOW_RUN_ID=run.info.run_id,
                    GPULAB_MLFLOW_RUN_ID=run.info.run_id,
                    MLFLOW_EXPERIMENT_ID=run.info.experiment_id,
                )
        if self.reporting:
            if any(tracking.values()):
                _attempt("reporting tracking ids", self._post, "tracking", tracking)
            threading.Thread(target=self._heartbeat, name="gpulab-heartbeat", daemon=True).start()
        code = self._run_child(child_env)
        self.done.set()
        if tracking["mlflow_run_id"]:
            status = "KILLED" if self.signalled else "FINISHED" if code == 0 else "FAILED"
            _attempt("ending the MLflow run", _mlflow_retry(self._end_mlflow_run), tracking["mlflow_run_id"], status)
        return code

    def _run_child(self, env: dict) -> int:
        if self.signalled:  # stopped before the child started: end as if it had been killed
            return -self.signalled
        try:
            self.child = subprocess.Popen(self.argv, env=env)
        except OSError as exc:
            print(f"gpulab.runner: cannot run {self.argv[0]!r}: {exc.strerror}", file=sys.stderr, flush=True)
            return 127 if isinstance(exc, FileNotFoundError) else 126
        if self.signalled and not self.forwarded:  # signal arrived while the child was being started
            self._forward()
        return self.child.wait()

    def _on_signal(self, signum, _frame) -> None:
        self.signalled = signum
        if self.child is not None:
            self._forward()

    def _forward(self) -> None:
        self.forwarded = True
        self.child.send_signal(self.signalled)  # a no-op once the child has been reaped

    def _wandb_env(self, env: dict) -> str | None:
        """Set W&B's mode and dirs in ``env``; with ``WANDB_PROJECT``, the run id and path."""
        if env.get("WANDB_MODE") != "disabled" and not (env.get("WANDB_API_KEY") and env.get("WANDB_BASE_URL")):
            env["WANDB_MODE"] = "offline"
        if job_dir := env.get("GPULAB_JOB_DIR") or env.get("WANDB_DIR"):
            env.setdefault("WANDB_DIR", job_dir)  # runs go to <job dir>/wandb/
            for name in ("cache", "data", "config", "artifacts"):  # not under $HOME
                env.setdefault(f"WANDB_{name.upper()}_DIR", str(Path(job_dir, "wandb", name)))
        if not (project := env.get("WANDB_PROJECT")):
            return None
        run_id = env.setdefault("WANDB_RUN_ID", f"{self.job_id or os.getpid()}-{self.attempt}")
        env.setdefault("WANDB_NAME", self.name or run_id)
        return "/".join(filter(None, (env.get("WANDB_ENTITY"), project, run_id)))

    def _create_mlflow_run(self, trace_id: str):
        from mlflow import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_USER

        client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        experiment = client.get_experiment_by_name(name)  # a lost creation race fails here; the retry finds it
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        owner = os.environ.get("GPULAB_JOB_OWNER", "")
        tags = {
            "gpulab.job_id": self.job_id,
            "gpulab.user": owner,
            "gpulab.trace_id": trace_id,
            "gpulab.attempt": self.attempt,
            MLFLOW_USER: owner,
            "gpulab.attestation_fingerprint": os.environ.get("GPULAB_ATTESTATION_FINGERPRINT"),
        }
        return client.create_run(experiment_id, run_name=self.name or None, tags={k: v for k, v in tags.items() if v})

    @staticmethod
    def _end_mlflow_run(run_id: str, status: str) -> None:
        from mlflow import MlflowClient

        MlflowClient().set_terminated(run_id, status)

    def _claim_credentials(self) -> bool:
        """Put the attempt's secrets into the environment, claimed with its ticket (which is then dropped);
        False when the service refuses the ticket. An unreachable service leaves the job without them."""
        ticket = os.environ.pop("GPULAB_CREDENTIALS_TICKET")
        try:
            body = _claim_retry(post_to_service)("credentials", {}, authorization=f"job-ticket {ticket}")
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("error", {}).get("message", exc.reason)
            print(
                f"gpulab.runner: the job service refused this attempt's credentials ticket ({exc.code}: "
                f"{detail}); not running the job",
                file=sys.stderr,
                flush=True,
            )
            return False
        except Exception as exc:  # noqa: BLE001 - as every report: an outage never fails the job
            warn(
                f"gpulab.runner: claiming the job's credentials failed ({type(exc).__name__}: {exc}); "
                "running without them (no progress reports or MLflow run)"
            )
            return True
        os.environ.update(json.loads(body)["env"])
        return True

    def _post(self, endpoint: str, body: dict) -> None:
        _service_retry(post_to_service)(endpoint, body, inject({}).get("traceparent"))

    def _heartbeat(self) -> None:
        failing = False
        while not self.done.is_set():
            try:
                self._post("heartbeat", {})
                failing = False
            except Exception as exc:  # noqa: BLE001
                if not failing:
                    warn(f"gpulab.runner: heartbeat failed ({type(exc).__name__}: {exc}); will keep trying")
                failing = True
            self.done.wait(HEARTBEAT_INTERVAL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m gpulab.runner -- <command> [args...]", file=sys.stderr)
        return 2
    if pipeline_dir := os.environ.get("PIPELINE_DIR"):  # a pipeline's steps share it; the first to start makes it
        try:
            os.makedirs(pipeline_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            warn(f"gpulab.runner: could not make the pipeline directory {pipeline_dir} ({e})")
    if working_dir := os.environ.get("GPULAB_WORKING_DIR"):
        os.chdir(working_dir)
    provider = setup_tracing("gpulab-job")
    runner = Runner(args)
    parent = extract({"traceparent": os.environ["TRACEPARENT"]}) if os.environ.get("TRACEPARENT") else None
    with tracer(__name__).start_as_current_span(
        "job attempt", context=parent, attributes={"gpulab.job_id": runner.job_id, "gpulab.attempt": runner.attempt}
    ) as span:
        code = runner.run(format(span.get_span_context().trace_id, "032x"))
        span.set_attribute("gpulab.exit_code", code)
        if code != 0:
            span.set_status(trace.StatusCode.ERROR)
    provider.shutdown()
    if code < 0:  # the child died of a signal: die of the same one
        sys.stdout.flush()
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main())
