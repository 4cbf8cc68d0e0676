"""Preload jobs and their extents: explicit states, the transitions allowed between them, and
the record the master keeps (and persists) per job.

Job states (``JobState``)::

    QUEUED --plan starts--> RUNNING --every extent final, none failed--> DONE
       |                      |------every extent final, some failed---> FAILED
       |                      |------listing the source failed---------> FAILED
       +---cancel-------------+------cancel----------------------------> CANCELLED
       +---the source cannot be listed---------------------------------> FAILED

A job is QUEUED from its acceptance until the (single) planner thread starts listing it;
RUNNING while the listing goes on and members fetch their extents (``listing`` says whether
the listing is complete); then DONE, FAILED or CANCELLED, which are final.

Extent (task) states (``TaskState``)::

    PENDING --leased to its owner in a heartbeat answer--> LEASED
    LEASED --the member reports it done--> DONE
    LEASED --reported failed, attempts left--> PENDING (same owner)
    LEASED --reported failed, no attempts left--> FAILED
    LEASED --member dropped / restarted / forgot it--> PENDING (new owner)
    PENDING --owner changed (member joined or dropped)--> PENDING (new owner)
    DONE --its member dropped while the job runs--> PENDING (new owner; re-homed)

An extent DONE by a member that is dropped before the job ends is fetched again by its new
owner (its counts are taken back first): the pages went with the member, and a job that says
done means its data is Ready on the members that own it now.

Counting: every byte of a job ends in exactly one of ``bytes_done`` (fetched from the origin
by this job), ``bytes_skipped`` (already Ready on its owner) and ``bytes_failed``; a file is
*skipped* when all its bytes were skipped, *failed* when any of its extents failed, else
*done*. A zero-byte file has nothing to fetch and counts as skipped.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from objfs.master.errors import Conflict


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in _FINAL_JOB_STATES


_FINAL_JOB_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class TaskState(enum.Enum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """Counted in the job's totals (a DONE extent may still be re-homed)."""
        return self in (TaskState.DONE, TaskState.FAILED)


TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.PENDING, TaskState.LEASED}),
    TaskState.LEASED: frozenset({TaskState.PENDING, TaskState.DONE, TaskState.FAILED}),
    TaskState.DONE: frozenset({TaskState.PENDING}),
    TaskState.FAILED: frozenset(),
}


class IllegalTransition(Conflict):
    code = "illegal_transition"


def check_job_transition(old: JobState, new: JobState) -> None:
    if new not in JOB_TRANSITIONS[old]:
        raise IllegalTransition(f"a {old.value} job cannot become {new.value}")


def check_task_transition(old: TaskState, new: TaskState) -> None:
    if new not in TASK_TRANSITIONS[old]:
        raise IllegalTransition(f"a {old.value} extent cannot become {new.value}")


@dataclasses.dataclass
class HostProgress:
    """One member's share of one job."""

    extents_assigned: int = 0   # not final, currently this member's
    extents_done: int = 0       # completed by this member (fetched or skipped)
    extents_failed: int = 0
    bytes_done: int = 0
    bytes_skipped: int = 0
    bytes_failed: int = 0


MAX_ERRORS_KEPT = 10


@dataclasses.dataclass
class Job:
    """The master's record of one job. Owned by ``Coordinator`` (under its lock); persisted
    as JSON in the state store on every change."""

    id: str
    source: str                     # what the user asked for, for display
    bucket: str
    kind: str                       # "dir", "file" or "files"
    prefix: str                     # dir: key prefix ("" or ending in "/"); file: the key
    keys: list[str]                 # kind "files": the keys; else empty
    group: str                      # the member group (origin) it preloads into
    extent_pages: int               # the group's extent size when the job was accepted
    created_at: float
    bandwidth_limit: int | None = None  # bytes/s for the whole job, None = unlimited
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    ended_at: float | None = None
    listing: bool = False           # the source is still being listed and planned
    next_task: int = 0
    files_total: int = 0
    files_done: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_skipped: int = 0
    bytes_failed: int = 0
    extents_total: int = 0
    extents_final: int = 0
    extents_failed: int = 0
    extents_reassigned: int = 0
    extents_retried: int = 0
    hosts: dict[str, HostProgress] = dataclasses.field(default_factory=dict)
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error_count: int = 0
    message: str | None = None      # why it failed/was cancelled, for display

    def transition(self, new: JobState, now: float) -> None:
        check_job_transition(self.state, new)
        self.state = new
        if new is JobState.RUNNING:
            self.started_at = now
        if new.final:
            self.ended_at = now
            self.listing = False

    def host(self, member: str) -> HostProgress:
        progress = self.hosts.get(member)
        if progress is None:
            progress = self.hosts[member] = HostProgress()
        return progress

    def add_error(self, entry: dict[str, Any]) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(entry)

    @property
    def bytes_final(self) -> int:
        return self.bytes_done + self.bytes_skipped + self.bytes_failed

    @property
    def complete(self) -> bool:
        """Every extent of a fully listed job is final."""
        return not self.listing and self.extents_final >= self.extents_total

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Job":
        data = dict(data)
        data["state"] = JobState(data["state"])
        data["hosts"] = {m: HostProgress(**h) for m, h in data.get("hosts", {}).items()}
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
