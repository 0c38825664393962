"""Hyperparameter sweeps from a notebook: ``gpulab.sweep(space, source=..., strategy="grid")`` submits the job as a
job array of trials (the job service expands the space, :mod:`gpulab.sweeps`), each trial reads its parameters
with ``gpulab.trial_params()`` and reports its metrics with ``gpulab.progress``; :meth:`Sweep.best` is the trial
with the best latest metric. Trials run in their owner's quota as any job; cancelling the sweep cancels them."""

from __future__ import annotations

import json
import os
import time

from .. import sweeps
from ..job_states import TERMINAL_STATES
from .client import GpulabError, Job, JobsClient, JobTable, WaitTimeout, default_client, job_spec


class Sweep:
    """A submitted sweep: the job array of its trials."""

    def __init__(self, client: JobsClient, first: Job):
        self.client, self.array = client, first.data["array"]

    id = property(lambda self: self.array["id"])

    def trials(self) -> JobTable:
        """Every trial's job, by index; each job's ``data["array"]["params"]`` are its parameters."""
        return self.client.list(array=self.id, limit=self.array["count"])

    def wait(self, timeout: float | None = None, interval: float = 2.0) -> JobTable:
        """Wait until every trial has ended; the trials."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            trials = self.trials()
            if all(t.state in TERMINAL_STATES for t in trials):
                return trials
            if deadline is not None and time.monotonic() > deadline:
                running = sum(t.state not in TERMINAL_STATES for t in trials)
                raise WaitTimeout(
                    f"sweep {self.id}: {running} of {len(trials)} trials still running after {timeout:g} s"
                )
            time.sleep(interval)

    def best(self, metric: str, goal: str = "minimize") -> Job | None:
        """The trial whose latest reported ``metric`` (``gpulab.progress(..., loss=...)``) is lowest (``goal``
        minimize) or highest (maximize), among those that reported it; its parameters are
        ``job.data["array"]["params"]``."""
        trials = {t.id: t for t in self.trials()}
        scored = [
            {"id": t.id, "params": t.data["array"]["params"], "metrics": t.data["progress"]["metrics"]}
            for t in trials.values()
        ]
        found = sweeps.best(scored, metric, goal)
        return trials[found["id"]] if found else None

    def cancel(self) -> JobTable:
        """Cancel every trial that has not ended (waits until they have stopped)."""
        return self.client.cancel_array(self.id)

    def _repr_html_(self) -> str:
        return self.trials()._repr_html_()

    def __repr__(self) -> str:
        return f"<Sweep {self.id}: {self.array['count']} trials>"


def sweep(
    parameters: dict,
    source: str | None = None,
    entrypoint: list[str] | None = None,
    *,
    strategy: str = "grid",
    trials: int | None = None,
    max_concurrent: int | None = None,
    seed: int | None = None,
    **fields,
) -> Sweep:
    """Submit a sweep over ``parameters`` (name -> list of values, or ``{"low", "high"[, "log", "int",
    "count"]}``) of the job ``source`` / ``entrypoint`` and ``fields`` describe (as :func:`gpulab.submit`)."""
    try:
        sweeps.check(parameters, strategy, trials)
    except sweeps.SpaceError as e:
        raise GpulabError(f"sweep {e.field}: {e}") from None
    body = {"parameters": parameters, "strategy": strategy, "trials": trials, "max_concurrent": max_concurrent}
    if seed is not None:
        body["seed"] = seed
    client = default_client()
    return Sweep(client, client.submit(job_spec(source, entrypoint, sweep=body, **fields)))


def trial_params() -> dict:
    """In a sweep's trial: its parameters; elsewhere, ``{}``."""
    return json.loads(os.environ.get("GPULAB_TRIAL_PARAMS") or "{}")
