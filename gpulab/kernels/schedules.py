"""Schedules from Python: ``gpulab.schedule("0 3 * * *", entrypoint=["python", "etl.py"], timezone="Europe/Berlin")``,
``gpulab.schedule("@daily", notebook="report.ipynb", parameters={"day": "yesterday"})`` or
``gpulab.schedule("@hourly", pipeline="pipeline.yaml")``; ``gpulab.schedules()``.

A schedule is kept by the job service, which starts its runs (ordinary jobs) whether or not your server is up.
"""

from __future__ import annotations

import html
import os

from .client import GpulabError, Job, JobsClient, JobTable, default_client, job_spec, notebook_spec
from .pipelines import Pipeline, pipeline_spec


class Schedule:
    """A handle on one schedule; ``data`` is the service's latest view of it."""

    def __init__(self, client: JobsClient, data: dict):
        self.client, self.data = client, data

    id = property(lambda self: self.data["id"])
    name = property(lambda self: self.data["name"])
    state = property(lambda self: self.data["state"])
    next_run_at = property(lambda self: self.data["next_run_at"])

    def _update(self, **change) -> Schedule:
        self.data = self.client.request("PATCH", f"/schedules/{self.id}", json=change).json()
        return self

    def refresh(self) -> Schedule:
        self.data = self.client.request("GET", f"/schedules/{self.id}").json()
        return self

    def pause(self) -> Schedule:
        return self._update(paused=True)

    def resume(self) -> Schedule:
        """Active again, next due at its first time from now (what it would have run meanwhile is not run)."""
        return self._update(paused=False)

    def change(self, **settings) -> Schedule:
        """Change ``cron``, ``timezone``, ``max_concurrent``, ``overlap`` or ``catch_up``."""
        return self._update(**settings)

    def run_now(self) -> Job | Pipeline:
        """A run now, whatever its times and ``max_concurrent`` say: a job, or a pipeline's."""
        data = self.client.request("POST", f"/schedules/{self.id}/run").json()
        return Pipeline(self.client, data) if self.data.get("pipeline") else Job(self.client, data)

    def runs(self, limit: int = 50) -> JobTable:
        """Its newest runs."""
        data = self.client.request("GET", "/jobs", params={"schedule": self.id, "limit": limit}).json()
        return JobTable(Job(self.client, item) for item in data["jobs"])

    def delete(self) -> None:
        """Delete the schedule; its runs stay."""
        self.client.request("DELETE", f"/schedules/{self.id}")

    def __repr__(self) -> str:
        d = self.data
        when = f"next {d['next_run_at'][:16].replace('T', ' ')} UTC" if d["next_run_at"] else "paused"
        return (
            f"<gpulab Schedule '{d['name']}' ({d['id'][:8]}) '{d['cron']}' {d['timezone']}: {when}, {d['runs']} runs>"
        )


class ScheduleTable(list):
    """A list of :class:`Schedule` that shows as a table."""

    COLUMNS = ("id", "name", "cron", "timezone", "state", "next run (UTC)", "runs", "skipped")

    def rows(self) -> list[tuple[str, ...]]:
        return [
            (
                s.id[:8],
                s.name,
                s.data["cron"],
                s.data["timezone"],
                s.state,
                (s.next_run_at or "")[:16].replace("T", " "),
                str(s.data["runs"]),
                str(s.data["skipped"]),
            )
            for s in self
        ]

    def __repr__(self) -> str:
        if not self:
            return "no schedules"
        table = [self.COLUMNS, *self.rows()]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.COLUMNS))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)

    def _repr_html_(self) -> str:
        if not self:
            return "<p>no schedules</p>"
        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = "".join(
            f'<tr title="{s.id}">' + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for s, row in zip(self, self.rows())
        )
        return f'<table class="gpulab-schedules"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def schedule(
    cron: str,
    source: str | None = None,
    entrypoint: list[str] | None = None,
    *,
    notebook: str | None = None,
    parameters: dict | None = None,
    pipeline: dict | str | os.PathLike | None = None,
    name: str | None = None,
    timezone: str = "UTC",
    max_concurrent: int = 1,
    overlap: str = "skip",
    catch_up: str = "once",
    paused: bool = False,
    **fields,
) -> Schedule:
    """Run a job at the times of ``cron`` (five fields, or @hourly/@daily/...) in ``timezone``: Python ``source``, an
    ``entrypoint``, or a ``notebook`` (snapshotted now) with papermill ``parameters``; job ``fields`` as for
    :func:`gpulab.submit`. Or a ``pipeline`` (a YAML file's path or its dict, read now; each run a new pipeline
    with its own ``$PIPELINE_DIR``). ``max_concurrent`` runs at once; a run due past it is skipped or, with
    ``overlap="queue"``, started when one ends; runs missed while the platform was down run once
    (``catch_up="once"``) or are skipped."""
    if pipeline is not None:
        if notebook is not None or source is not None or entrypoint is not None or parameters is not None or fields:
            raise GpulabError("a pipeline's schedule runs its steps: give no job fields with pipeline=")
        template = {"pipeline": pipeline_spec(pipeline)}
    elif notebook is not None:
        template = {"job": notebook_spec(notebook, parameters, **fields)}
    elif parameters is not None:
        raise GpulabError("parameters= go with notebook=")
    else:
        template = {"job": job_spec(source, entrypoint, **fields)}
    body = {
        "name": name or next(iter(template.values()))["name"],
        "cron": cron,
        "timezone": timezone,
        **template,
        "max_concurrent": max_concurrent,
        "overlap": overlap,
        "catch_up": catch_up,
        "paused": paused,
    }
    client = default_client()
    return Schedule(client, client.request("POST", "/schedules", json=body).json())


def schedules(all: bool = False) -> ScheduleTable:
    """Your schedules (every user's with ``all=True``, admins only), newest first."""
    client = default_client()
    data = client.request("GET", "/schedules", params={"all": "true" if all else None}).json()
    return ScheduleTable(Schedule(client, item) for item in data["schedules"])


def get_schedule(schedule_id: str) -> Schedule:
    """The schedule with this id (or a unique prefix of it, as :func:`schedules` shows)."""
    schedule_id = schedule_id.strip().lower()
    if len(schedule_id) == 32:
        client = default_client()
        return Schedule(client, client.request("GET", f"/schedules/{schedule_id}").json())
    matches = [s for s in schedules() if s.id.startswith(schedule_id)] if schedule_id else []
    if len(matches) != 1:
        raise GpulabError(
            f"{len(matches) or 'none'} of your schedules' ids start with {schedule_id!r}; %schedules lists them"
        )
    return matches[0]
