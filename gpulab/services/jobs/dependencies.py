"""Jobs that wait for other jobs (``depends_on``, with Slurm's ``afterok`` / ``afternotok`` / ``afterany``).

A queued job with dependencies is held (``jobs.held_by``: the one it waits for) and is no candidate of the
scheduling pass until each is met; :func:`resolve`, run before each pass, releases it then, or cancels it with
the reason when one can no longer be met (``dependency 1a2b3c4d ended failed: afterok cannot be met``).
"""

from typing import Literal

from sqlalchemy import select

from gpulab.job_states import TERMINAL_STATES

from .models import JobSpec
from .store import JobRow, JobStateError, JobStore

MAX_RESOLVED = 1000  # held jobs looked at per pass (the oldest first)
UNMET = " cannot be met"  # ends the reason of a job cancelled for a dependency


def unmet(reason: str) -> bool:
    """Whether a cancelled job's ``reason`` says it was cancelled for a dependency that could not be met (a
    pipeline's step skipped as its conditions said), not by someone."""
    return reason.startswith("dependency ") and reason.endswith(UNMET)


def verdict(condition: str, state: str | None) -> Literal["met", "waiting", "impossible"]:
    """Whether a dependency on a job in ``state`` (None: the job is gone) is met, may still be, or cannot be."""
    if state is None:
        return "impossible"
    if state not in TERMINAL_STATES:
        return "waiting"
    if condition == "afterany" or (condition == "afterok") == (state == "succeeded"):
        return "met"
    return "impossible"


def resolve(store: JobStore) -> int:
    """Release the held jobs whose dependencies are all met, cancel those with one that cannot be, and say what
    each of the others waits for; the number released. Blocking: on the store's thread."""
    with store.session() as session:
        held = session.execute(
            select(JobRow.id, JobRow.spec, JobRow.held_by, JobRow.state_reason)
            .where(JobRow.state == "queued", JobRow.held_by.is_not(None))
            .order_by(JobRow.created_at)
            .limit(MAX_RESOLVED)
        ).all()
        if not held:
            return 0
        wanted = {d.job for h in held for d in JobSpec.model_validate(h.spec).depends_on}
        states = dict(session.execute(select(JobRow.id, JobRow.state).where(JobRow.id.in_(wanted))).all())
    released = 0
    for job in held:
        outcome = None  # None: all met; else ("impossible" | "waiting", dependency)
        for dependency in JobSpec.model_validate(job.spec).depends_on:
            found = verdict(dependency.condition, states.get(dependency.job))
            if found == "impossible":
                outcome = ("impossible", dependency)
                break
            if found == "waiting" and outcome is None:
                outcome = ("waiting", dependency)
        try:
            if outcome is None:
                store.release(job.id, "dependencies met")
                released += 1
            elif outcome[0] == "impossible":
                dependency = outcome[1]
                state = states.get(dependency.job)
                why = f"ended {state}" if state else "no longer exists"
                store.transition(
                    job.id, "cancelled", f"dependency {dependency.job[:8]} {why}: {dependency.condition}{UNMET}"
                )
            else:
                dependency = outcome[1]
                reason = dependency.waiting_reason()
                if (job.held_by, job.state_reason) != (dependency.job, reason):
                    store.hold(job.id, dependency.job, reason)
        except JobStateError:
            pass  # cancelled meanwhile
    return released
