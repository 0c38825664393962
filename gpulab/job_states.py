"""The states of a job, once for the job service, its API's schema and the kernel-side client.

``queued -> dispatching -> running -> succeeded | failed | cancelled | timed_out``; a retried or requeued
attempt goes back to ``queued``, a cancelled queued job ends there. :data:`TRANSITIONS` is the state machine
the store enforces, one event row per move.
"""

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    DISPATCHING = "dispatching"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


JOB_STATES = tuple(JobState)
ACTIVE_STATES = (JobState.DISPATCHING, JobState.RUNNING)  # holding resources
TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT)
UNFINISHED_STATES = (JobState.QUEUED, *ACTIVE_STATES)
TRANSITIONS = {
    JobState.QUEUED: {JobState.DISPATCHING, JobState.CANCELLED},
    JobState.DISPATCHING: {JobState.RUNNING, JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT, JobState.QUEUED},
}
