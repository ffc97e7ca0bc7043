"""Job and worker states, and the transitions the controller may make between them.

A job's state lives in the job store, so a restart of the service keeps it. Only the
controller changes it (the HTTP API only *requests* a cancel), and every change goes
through :func:`check_transition`, so an illegal move is a bug that fails loudly.

::

    QUEUED ──admit──> RUNNING ──finished──> SUCCEEDED
      │  ^               │ │
      │  └─preempted / ──┘ └──error──> FAILED
      │    worker died     └──cancel─> CANCELLED
      ├──cancel──> CANCELLED
      └──cannot run─> FAILED
"""

from __future__ import annotations

import enum

__all__ = ["TERMINAL_STATES", "IllegalTransition", "JobState", "WorkerState", "check_transition"]


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """The controller tried a move the state machine forbids: a bug, not a user error."""


def check_transition(job_id: str, old: JobState, new: JobState) -> None:
    if new not in _ALLOWED[old]:
        raise IllegalTransition(f"job {job_id}: {old.value} -> {new.value} is not a legal transition")


class WorkerState(str, enum.Enum):
    """A worker actor as the controller sees it."""

    STARTING = "starting"  # actor created, first tick not answered yet
    READY = "ready"  # answered a tick; may hold jobs
    STOPPING = "stopping"  # asked to stop once its in-flight tick returns
    DEAD = "dead"  # the actor died (or was stopped); its jobs must be re-queued
