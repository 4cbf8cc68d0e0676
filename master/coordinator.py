"""The master's core: members, preload jobs, and who fetches what. No HTTP here.

``Coordinator`` is what the HTTP handlers (``master.app``) call, and what the unit tests drive
directly with a fake clock and a fake origin. Its methods BLOCK (LMDB, and the origin for
``submit``): the app calls them in worker threads.

How a job runs:

1. ``submit`` checks the request (syntax, a live group mounts the data, the source exists at
   the origin; an explicit file list is HEADed file by file), records the job QUEUED and hands
   it to the planner thread.
2. The planner thread (one, jobs plan in order) lists the source page by page; each page is
   cut into extents (``master.planner``) and each extent queued for its owner under the
   group's live members, in one LMDB transaction per page. The job is RUNNING from the first
   page on, so members start before a long listing ends.
3. Members pull: each heartbeat reports results and takes more work (``heartbeat``). Results
   update the extent, its file and the job's counters in one transaction.
4. When the listing is complete and every extent is final, the job is DONE (or FAILED if an
   extent failed ``max_attempts`` times); its per-extent records are deleted.

Membership changes move work, never lose it: a member that joins takes the pending extents it
now owns; a member dropped (``sweep`` after ``member_timeout_s`` without a heartbeat, or
``leave``) has its pending and leased extents moved to their new owners; an extent leased to a
member that no longer holds it (it restarted) is queued again. If a group loses every member,
its extents wait (owner "") until one registers. A restarted master reloads members (each gets
a full timeout to heartbeat again), jobs and the work indexes from LMDB, and restarts the
listing of jobs whose listing had not finished (keys already planned are skipped).

Lock: ``_lock`` guards every field below and every state-store write; origin I/O happens
outside it. Lock order: ``_lock``, then an LMDB write transaction.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from objfs.errors import ObjfsError
from objfs.master.errors import Conflict, NotFound
from objfs.master.jobs import Job, JobState, TaskState, check_task_transition
from objfs.master.members import Member, Registry
from objfs.master.origin import OriginLister
from objfs.master.planner import (choose_group, extent_bytes, is_directory_marker, owner_of,
                                  plan_object)
from objfs.master.protocol import (HeartbeatReply, JobInfo, MemberReport,
                                   PreloadRequest, TaskRef, TaskResult, WorkItem)
from objfs.master.state import StateStore, Txn
from objfs.metrics import Metrics
from objfs.store import ObjectInfo

log = logging.getLogger(__name__)

ORPHAN = ""  # the "member" whose queue holds extents of a group without live members
_LIST_CHUNK = 1000
_HEAD_CHUNK = 1000


@dataclasses.dataclass(frozen=True)
class Settings:
    heartbeat_interval_s: float = 2.0
    member_timeout_s: float = 15.0
    max_attempts: int = 3                 # per extent, then it fails
    max_tasks_per_reply: int = 2000
    max_leased_per_member: int = 4000
    keep_jobs: int = 500                  # final jobs kept for GET; older ones are forgotten
    rate_window_s: float = 10.0           # throughput is measured over this window

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat interval must be positive")
        if self.member_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError("member timeout must be at least twice the heartbeat interval")
        if self.max_attempts < 1 or self.max_tasks_per_reply < 1:
            raise ValueError("attempts and tasks per reply must be >= 1")


def _id_ms(job_id: str) -> int:
    """The creation-time part of a job id (``Coordinator._new_id``); -1 if it has none."""
    try:
        return int(job_id[:11], 16)
    except ValueError:
        return -1


class Coordinator:
    def __init__(self, state: StateStore, origin: OriginLister, *,
                 settings: Settings = Settings(),
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None,
                 planner: concurrent.futures.Executor | None = None) -> None:
        self.settings = settings
        self._state = state
        self._origin = origin
        self._clock = clock
        self._wall = wall_clock
        self.metrics = metrics or Metrics()
        self._own_planner = planner is None
        self._planner = planner or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="objfs-master-plan")
        self._lock = threading.Lock()
        self._registry = Registry(clock, settings.member_timeout_s)   # guarded by _lock
        self._jobs: dict[str, Job] = {}                                # guarded by _lock
        # (monotonic time, bytes fetched, bytes final) samples per running job
        self._rates: dict[str, collections.deque[tuple[float, int, int]]] = {}  # _lock
        self._dirty: set[str] = set()  # jobs changed in the current transaction; _lock
        self._closed = False                                           # guarded by _lock

    # ---- lifecycle -----------------------------------------------------------------------

    def resume(self) -> None:
        """Load members and jobs from the state store; restart unfinished listings."""
        replan: list[str] = []
        with self._lock, self._state.write() as txn:
            now = self._clock()
            for member_id, record in txn.members():
                self._registry.add(Member.from_record(member_id, record, last_seen=now))
            for record in txn.jobs():
                job = Job.from_json(record)
                self._jobs[job.id] = job
                if job.state is JobState.QUEUED or (job.state is JobState.RUNNING
                                                    and job.listing):
                    replan.append(job.id)
            running = [j for j in self._jobs.values() if j.state is JobState.RUNNING]
            for job in running:
                self._finish_if_complete(txn, job)
        if self._jobs or len(self._registry):
            log.info("resumed from %s: %d members, %d jobs (%d running, %d to list again)",
                     self._state.path, len(self._registry), len(self._jobs), len(running),
                     len(replan))
        for job_id in sorted(replan):
            self._planner.submit(self._plan, job_id, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self._own_planner:
            self._planner.shutdown(wait=True, cancel_futures=True)

    # ---- the preload API -----------------------------------------------------------------

    def submit(self, request: PreloadRequest) -> dict[str, Any]:
        """Accept a preload job (QUEUED) or raise a ``MasterError`` saying why not."""
        with self._lock:
            groups = self._registry.groups()
        paths = [request.path] if request.path is not None else list(request.keys)
        if not any(o.bucket == request.bucket for o, ms in groups.items() if ms):
            choose_group(groups, request.bucket, paths, request.group)  # raises not_mounted
        infos: list[ObjectInfo] | None = None
        if request.path is not None:
            kind, prefix = self._resolve(request.bucket, request.path)
            keys: list[str] = []
            group = choose_group(groups, request.bucket, [prefix], request.group)
        else:
            group = choose_group(groups, request.bucket, paths, request.group)
            found = self._origin.head_many(request.bucket, request.keys)
            missing = [k for k, info in zip(request.keys, found) if info is None]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise NotFound(f"s3://{request.bucket}/{missing[0]} does not exist{more}")
            kind, prefix, keys = "files", "", list(request.keys)
            infos = [info for info in found if info is not None]
        with self._lock:
            extent_pages = self._registry.extent_pages(group.group_id)
            if extent_pages is None:
                raise Conflict(f"the members of {group.group_id} left meanwhile",
                               code="not_mounted")
            now = self._wall()
            job = Job(id=self._new_id(now), source=request.source, bucket=request.bucket,
                      kind=kind, prefix=prefix, keys=keys, group=group.group_id,
                      extent_pages=extent_pages, created_at=now,
                      bandwidth_limit=request.bandwidth_limit)
            self._jobs[job.id] = job
            with self._state.write() as txn:
                txn.put_job(job.id, job.to_json())
            self.metrics.inc("jobs_submitted_total")
            log.info("preload %s accepted: %s into %s (%d members)", job.id, job.source,
                     job.group, len(self._registry.members_of(job.group)))
            status = self._status(job)
        self._planner.submit(self._plan, job.id, infos)
        return status

    def status(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._status(self._job(job_id))

    def list_jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.id, reverse=True)
            return [self._status(j) for j in jobs]

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._job(job_id)
            if job.state.final:
                raise Conflict(f"preload {job_id} is already {job.state.value}",
                               code="already_final")
            with self._state.write() as txn:
                self._end(txn, job, JobState.CANCELLED, "cancelled by request")
            return self._status(job)

    def members_view(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            members = [{"id": m.id, "group": m.origin.group_id, "extent_pages": m.extent_pages,
                        "capacity_bytes": m.capacity_bytes, "used_bytes": m.used_bytes,
                        "free_bytes": m.free_bytes, "registered_at": m.registered_at,
                        "last_seen_s_ago": round(now - m.last_seen, 3)}
                       for m in self._registry]
            groups = [{"id": o.group_id, "endpoint": o.endpoint, "bucket": o.bucket,
                       "prefix": o.prefix, "members": ms}
                      for o, ms in sorted(self._registry.groups().items())]
        return {"members": members, "groups": groups}

    # ---- members -------------------------------------------------------------------------

    def heartbeat(self, report: MemberReport) -> HeartbeatReply:
        with self._lock:
            self.metrics.inc("heartbeats_total")
            self._registry.check_joinable(report)  # before any change
            with self._state.write() as txn:
                member = self._register(txn, report)
                touched: set[str] = set()
                finished = {r.ref for r in report.results}
                for result in report.results:
                    self._apply_result(txn, member.id, result, touched)
                held = set(report.held) - finished
                revoked = self._reconcile(txn, member.id, held, touched)
                room = self.settings.max_leased_per_member - len(held)
                work = self._lease(txn, member.id, min(report.want_tasks, room),
                                   report.want_bytes, touched)
                for job_id in sorted(touched):
                    job = self._jobs.get(job_id)
                    if job is not None:
                        self._finish_if_complete(txn, job)
                        self._sample(job)
                self._flush(txn)
            mentioned = ({r.job for r in report.held} | {r.job for r in report.results}
                         | set(report.jobs) | {w.job for w in work})
            return HeartbeatReply(
                members=tuple(self._registry.members_of(member.origin.group_id)),
                extent_pages=member.extent_pages,
                heartbeat_interval_s=self.settings.heartbeat_interval_s,
                member_timeout_s=self.settings.member_timeout_s,
                work=tuple(work), jobs={j: self._job_info(j) for j in sorted(mentioned)},
                revoked=tuple(sorted(revoked)))

    def leave(self, member_id: str) -> bool:
        with self._lock:
            if self._registry.get(member_id) is None:
                return False
            with self._state.write() as txn:
                self._drop(txn, member_id, "it left")
                self._flush(txn)
            return True

    def sweep(self) -> None:
        """Drop members whose heartbeats stopped; forget old jobs. Called periodically."""
        with self._lock:
            expired = self._registry.expired()
            if expired:
                with self._state.write() as txn:
                    for member_id in expired:
                        self._drop(txn, member_id, f"no heartbeat for "
                                   f"{self.settings.member_timeout_s:g}s")
                    self._flush(txn)
            self._forget_old_jobs()

    def gauges(self) -> dict[str, Any]:
        """What /metrics shows besides counters: members per group, jobs per state."""
        with self._lock:
            by_state = {s.value: 0 for s in JobState}
            for job in self._jobs.values():
                by_state[job.state.value] += 1
            return {"members": {o.group_id: len(ms)
                                for o, ms in self._registry.groups().items()},
                    "jobs": by_state}

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the state is inconsistent (for tests):

        - every extent of a running job is in exactly one work index under its assignee
          (``queue`` when PENDING, ``leased`` when LEASED, ``homed`` when DONE), a FAILED
          one in none, and nothing else is in them;
        - a job's ``extents_final``/``extents_failed`` count its final extents, its bytes
          by outcome add up to the bytes of its final extents, and each host's
          ``extents_assigned`` counts the unfinished extents assigned to it;
        - a final job has no extents, files or work entries left.
        """
        with self._lock, self._state.read() as txn:
            work: dict[tuple[str, int], list[tuple[str, str]]] = {}
            for index in ("queue", "leased", "homed"):
                for member_id, job_id, task, _, _ in txn.all_work(index):
                    work.setdefault((job_id, task), []).append((index, member_id))
            for job in self._jobs.values():
                tasks = [(n, txn.get_task(job.id, n)) for n in range(job.next_task)]
                present = [(n, t) for n, t in tasks if t is not None]
                if job.state.final:
                    assert not present, f"{job.id} ({job.state.value}) kept extents"
                    assert not [k for k in work if k[0] == job.id], f"{job.id} kept work"
                    continue
                assigned: collections.Counter[str] = collections.Counter()
                final = failed = final_bytes = 0
                for n, task in present:
                    state = TaskState(task["st"])
                    entries = work.get((job.id, n), [])
                    if state.final:
                        homed = [("homed", task["a"])] if state is TaskState.DONE else []
                        assert entries == homed, f"{state.value} {job.id}/{n} in {entries}"
                        final += 1
                        failed += state is TaskState.FAILED
                        final_bytes += extent_bytes(task["s"], task["x"], task["xp"])
                        continue
                    index = "queue" if state is TaskState.PENDING else "leased"
                    assert entries == [(index, task["a"])], \
                        f"{job.id}/{n} {state.value} for {task['a']!r} but in {entries}"
                    if task["a"] != ORPHAN:
                        assigned[task["a"]] += 1
                assert len(present) == job.extents_total, (job.id, len(present),
                                                           job.extents_total)
                assert final == job.extents_final and failed == job.extents_failed, \
                    (job.id, final, job.extents_final, failed, job.extents_failed)
                assert final_bytes == job.bytes_final, (job.id, final_bytes, job.bytes_final)
                for host, progress in job.hosts.items():
                    assert progress.extents_assigned == assigned[host], \
                        (job.id, host, progress.extents_assigned, assigned[host])
            for (job_id, task), entries in work.items():
                job = self._jobs.get(job_id)
                if job is not None and job.state is JobState.RUNNING:
                    assert len(entries) == 1, (job_id, task, entries)

    # ---- internals: members --------------------------------------------------------------

    def _register(self, txn: Txn, report: MemberReport) -> Member:
        member = self._registry.get(report.member)
        if member is not None and (member.origin != report.origin
                                   or member.extent_pages != report.extent_pages):
            self._drop(txn, member.id, "it registered again with another mount")
            member = None
        if member is None:
            member = Member(report.member, report.origin, report.extent_pages,
                            report.incarnation, self._wall(), self._clock())
            self._registry.update_seen(member, report)
            self._registry.add(member)
            txn.put_member(member.id, member.to_record())
            log.info("member %s joined %s (%d members)", member.id, member.origin.group_id,
                     len(self._registry.members_of(member.origin.group_id)))
            self.metrics.inc("members_joined_total")
            self._replan(txn, member.origin.group_id)
            return member
        if member.incarnation and report.incarnation != member.incarnation:
            log.info("member %s restarted (its unfinished extents are queued again)",
                     member.id)
        self._registry.update_seen(member, report)
        return member

    def _drop(self, txn: Txn, member_id: str, why: str) -> None:
        member = self._registry.remove(member_id)
        if member is None:
            return
        txn.delete_member(member_id)
        moved = 0
        for index in ("leased", "queue"):
            for job_id, task, digest, extent in txn.work_of(index, member_id):
                moved += self._move(txn, index, member_id, job_id, task, digest, extent,
                                    reassigned=True)
        for job_id, task, digest, extent in txn.work_of("homed", member_id):
            moved += self._rehome(txn, member_id, job_id, task, digest, extent)
        self.metrics.inc("members_dropped_total")
        self.metrics.inc("extents_reassigned_total", moved)
        log.warning("member %s dropped from %s (%s): %d unfinished extents reassigned, "
                    "%d members left", member_id, member.origin.group_id, why, moved,
                    len(self._registry.members_of(member.origin.group_id)))

    def _replan(self, txn: Txn, group_id: str) -> None:
        """After a member joined: move pending extents whose owner changed (orphans too)."""
        jobs = {j.id: j for j in self._jobs.values()
                if j.group == group_id and j.state is JobState.RUNNING}
        if not jobs:
            return
        moved = 0
        for member_id, job_id, task, digest, extent in txn.all_work("queue"):
            job = jobs.get(job_id)
            if job is None:
                continue
            owner = owner_of(self._registry.ring(group_id, job.extent_pages), digest, extent)
            if owner is not None and owner != member_id:
                moved += self._move(txn, "queue", member_id, job_id, task, digest, extent)
        if moved:
            log.info("%d pending extents of %s moved to their new owners", moved, group_id)

    def _move(self, txn: Txn, index: str, member_id: str, job_id: str, task_no: int,
              digest: bytes, extent: int, reassigned: bool = False) -> int:
        """Take an extent from ``member_id``'s ``index`` and queue it for its owner now."""
        txn.delete_work(index, member_id, job_id, task_no)
        job = self._jobs.get(job_id)
        task = txn.get_task(job_id, task_no) if job is not None else None
        if job is None or task is None or job.state.final:
            return 0
        owner = owner_of(self._registry.ring(job.group, job.extent_pages), digest, extent)
        owner = ORPHAN if owner is None else owner
        self._set_task(job, task, TaskState.PENDING, owner)
        txn.put_task(job_id, task_no, task)
        txn.put_work("queue", owner, job_id, task_no, digest, extent)
        if reassigned:
            job.extents_reassigned += 1
        return 1

    def _rehome(self, txn: Txn, member_id: str, job_id: str, task_no: int, digest: bytes,
                extent: int) -> int:
        """A DONE extent of a dropped member: take its counts back and queue it for its new
        owner (its pages left with the member)."""
        txn.delete_work("homed", member_id, job_id, task_no)
        job = self._jobs.get(job_id)
        task = txn.get_task(job_id, task_no) if job is not None else None
        if job is None or task is None or job.state is not JobState.RUNNING \
                or task["st"] != TaskState.DONE.value:
            return 0
        eb = extent_bytes(task["s"], task["x"], task["xp"])
        fetched = task["fb"]
        skipped = eb - fetched
        job.extents_final -= 1
        job.bytes_done -= fetched
        job.bytes_skipped -= skipped
        host = job.host(member_id)
        host.extents_done -= 1
        host.bytes_done -= fetched
        host.bytes_skipped -= skipped
        file = txn.get_file(job_id, task["f"])
        if file is not None:
            if file["left"] == 0:  # the file was final: take its classification back
                if file["failed"]:
                    job.files_failed -= 1
                elif file["fb"] == 0:
                    job.files_skipped -= 1
                else:
                    job.files_done -= 1
            file["left"] += 1
            file["fb"] -= fetched
            file["sb"] -= skipped
            txn.put_file(job_id, task["f"], file)
        task["fb"] = 0
        task["a"] = ORPHAN  # counted as nobody's while it was DONE
        owner = owner_of(self._registry.ring(job.group, job.extent_pages), digest, extent)
        owner = ORPHAN if owner is None else owner
        self._set_task(job, task, TaskState.PENDING, owner)
        txn.put_task(job_id, task_no, task)
        txn.put_work("queue", owner, job_id, task_no, digest, extent)
        job.extents_reassigned += 1
        return 1

    def _set_task(self, job: Job, task: dict[str, Any], state: TaskState,
                  assignee: str | None = None) -> None:
        """Transition one extent (checked against the table) and keep the per-host
        ``extents_assigned`` counts in step."""
        old = TaskState(task["st"])
        check_task_transition(old, state)
        self._dirty.add(job.id)
        task["st"] = state.value
        if assignee is not None and assignee != task["a"]:
            if task["a"] != ORPHAN:
                job.host(task["a"]).extents_assigned -= 1
            task["a"] = assignee
            if assignee != ORPHAN:
                job.host(assignee).extents_assigned += 1
        if state.final and task["a"] != ORPHAN:
            job.host(task["a"]).extents_assigned -= 1

    def _flush(self, txn: Txn) -> None:
        """Write the records of the jobs changed in this transaction (once each)."""
        for job_id in sorted(self._dirty):
            job = self._jobs.get(job_id)
            if job is not None:
                txn.put_job(job.id, job.to_json())
        self._dirty.clear()

    def _reconcile(self, txn: Txn, member_id: str, held: set[TaskRef],
                   touched: set[str]) -> set[TaskRef]:
        """Square the member's ``held`` list with what is leased to it: extents it lost are
        queued again; held extents that are queued for it become leased; held extents that
        are no longer its are returned (revoked)."""
        leased: set[TaskRef] = set()
        for job_id, task, digest, extent in txn.work_of("leased", member_id):
            ref = TaskRef(job_id, task)
            if ref in held:
                leased.add(ref)
            else:
                self._move(txn, "leased", member_id, job_id, task, digest, extent)
                touched.add(job_id)
                self.metrics.inc("extents_lost_total")
        revoked = set()
        for ref in held - leased:
            job = self._jobs.get(ref.job)
            if job is not None and job.state is JobState.RUNNING \
                    and txn.has_work("queue", member_id, ref.job, ref.task):
                task = txn.get_task(ref.job, ref.task)
                if task is not None:
                    txn.delete_work("queue", member_id, ref.job, ref.task)
                    digest = bytes.fromhex(task["d"])
                    txn.put_work("leased", member_id, ref.job, ref.task, digest, task["x"])
                    self._set_task(job, task, TaskState.LEASED)
                    txn.put_task(ref.job, ref.task, task)
                    touched.add(ref.job)
                    continue
            revoked.add(ref)
        return revoked

    def _lease(self, txn: Txn, member_id: str, want_tasks: int, want_bytes: int,
               touched: set[str]) -> list[WorkItem]:
        want_tasks = min(want_tasks, self.settings.max_tasks_per_reply)
        work: list[WorkItem] = []
        nbytes = 0
        after: tuple[str, int] | None = None
        while len(work) < want_tasks and nbytes < want_bytes:
            batch = txn.work_of("queue", member_id, limit=256, after=after)
            if not batch:
                break
            for job_id, task_no, digest, extent in batch:
                after = (job_id, task_no)
                job = self._jobs.get(job_id)
                task = txn.get_task(job_id, task_no) if job is not None else None
                txn.delete_work("queue", member_id, job_id, task_no)
                if job is None or task is None or job.state is not JobState.RUNNING:
                    continue  # a leftover of a job that ended
                txn.put_work("leased", member_id, job_id, task_no, digest, extent)
                self._set_task(job, task, TaskState.LEASED)
                txn.put_task(job_id, task_no, task)
                touched.add(job_id)
                work.append(WorkItem(job_id, task_no, task["k"], task["e"], task["s"],
                                     task["x"], task["xp"]))
                nbytes += extent_bytes(task["s"], task["x"], task["xp"])
                if len(work) >= want_tasks or nbytes >= want_bytes:
                    break
        if work:
            self.metrics.inc("extents_leased_total", len(work))
        return work

    # ---- internals: results --------------------------------------------------------------

    def _apply_result(self, txn: Txn, member_id: str, result: TaskResult,
                      touched: set[str]) -> None:
        job = self._jobs.get(result.job)
        task = txn.get_task(result.job, result.task) if job is not None else None
        if job is None or task is None or job.state is not JobState.RUNNING \
                or task["a"] != member_id or task["st"] != TaskState.LEASED.value:
            self.metrics.inc("results_ignored_total")  # stale: reassigned, ended, repeated
            return
        txn.delete_work("leased", member_id, result.job, result.task)
        touched.add(job.id)
        eb = extent_bytes(task["s"], task["x"], task["xp"])
        prior = task["fb"]
        task["fb"] = min(eb, prior + result.fetched_bytes)
        if result.state == "failed":
            task["n"] += 1
            if task["n"] < self.settings.max_attempts:
                job.extents_retried += 1
                log.debug("preload %s: %s extent %d failed on %s (attempt %d), retrying: %s",
                          job.id, task["k"], task["x"], member_id, task["n"], result.error)
                txn.put_task(job.id, result.task, task)
                self._move_failed_back(txn, job, result.task, task)
                return
        fetched = task["fb"]
        if result.state == "done":
            skipped, failed = eb - fetched, 0
            self._set_task(job, task, TaskState.DONE)
            txn.put_work("homed", member_id, job.id, result.task, bytes.fromhex(task["d"]),
                         task["x"])
        else:
            skipped = min(max(0, result.skipped_bytes - prior), eb - fetched)
            failed = eb - fetched - skipped
            self._set_task(job, task, TaskState.FAILED)
            job.extents_failed += 1
            job.add_error({"time": self._wall(), "host": member_id, "key": task["k"],
                           "extent": task["x"], "error": result.error or "failed"})
            log.warning("preload %s: %s extent %d failed on %s after %d attempts: %s",
                        job.id, task["k"], task["x"], member_id, task["n"], result.error)
        txn.put_task(job.id, result.task, task)
        job.extents_final += 1
        job.bytes_done += fetched
        job.bytes_skipped += skipped
        job.bytes_failed += failed
        host = job.host(member_id)
        host.bytes_done += fetched
        host.bytes_skipped += skipped
        host.bytes_failed += failed
        if failed:
            host.extents_failed += 1
        else:
            host.extents_done += 1
        self.metrics.inc("preload_fetched_bytes", fetched)
        self.metrics.inc("preload_skipped_bytes", skipped)
        self.metrics.inc("preload_failed_bytes", failed)
        file = txn.get_file(job.id, task["f"])
        if file is None:
            return
        file["left"] -= 1
        file["fb"] += fetched
        file["sb"] += skipped
        file["failed"] = file["failed"] or bool(failed)
        txn.put_file(job.id, task["f"], file)
        if file["left"] == 0:
            self._file_final(job, failed=file["failed"], skipped=file["fb"] == 0)

    def _move_failed_back(self, txn: Txn, job: Job, task_no: int, task: dict[str, Any]) -> None:
        digest = bytes.fromhex(task["d"])
        owner = owner_of(self._registry.ring(job.group, job.extent_pages), digest, task["x"])
        owner = ORPHAN if owner is None else owner
        self._set_task(job, task, TaskState.PENDING, owner)
        txn.put_task(job.id, task_no, task)
        txn.put_work("queue", owner, job.id, task_no, digest, task["x"])

    def _file_final(self, job: Job, *, failed: bool, skipped: bool) -> None:
        if failed:
            job.files_failed += 1
            self.metrics.inc("preload_files_failed_total")
        elif skipped:
            job.files_skipped += 1
            self.metrics.inc("preload_files_skipped_total")
        else:
            job.files_done += 1
            self.metrics.inc("preload_files_done_total")

    # ---- internals: jobs -----------------------------------------------------------------

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no preload job {job_id!r}")
        return job

    def _new_id(self, now: float) -> str:
        """Creation time in ms first, so ids sort by age (``list_jobs``, and which final
        jobs are forgotten first), then randomness. The ms part is kept strictly above every
        known job's: two jobs submitted within one millisecond (or after the clock stepped
        back) still sort in submission order, and an id can never repeat a known one."""
        newest = max((_id_ms(job_id) for job_id in self._jobs), default=-1)
        return f"{max(int(now * 1000), newest + 1):011x}{secrets.token_hex(3)[:5]}"

    def _job_info(self, job_id: str) -> JobInfo:
        job = self._jobs.get(job_id)
        if job is None:
            return JobInfo("unknown")
        limit = None
        if job.bandwidth_limit is not None:
            members = max(1, len(self._registry.members_of(job.group)))
            limit = max(1, job.bandwidth_limit // members)
        return JobInfo(job.state.value, limit)

    def _end(self, txn: Txn, job: Job, state: JobState, message: str | None) -> None:
        job.transition(state, self._wall())
        job.message = message
        for index in ("queue", "leased", "homed"):
            for member_id, job_id, task, _, _ in txn.all_work(index):
                if job_id == job.id:
                    txn.delete_work(index, member_id, job_id, task)
        for host in job.hosts.values():
            host.extents_assigned = 0
        txn.drop_job_records(job.id)
        txn.put_job(job.id, job.to_json())
        self._rates.pop(job.id, None)
        self.metrics.inc(f"jobs_{state.value}_total")
        elapsed = (job.ended_at or 0) - (job.started_at or job.created_at)
        line = (f"preload {job.id} {state.value}: {job.files_total} files ({job.files_done} "
                f"fetched, {job.files_skipped} skipped, {job.files_failed} failed), "
                f"{job.bytes_done} bytes fetched, {job.bytes_skipped} skipped, "
                f"{job.bytes_failed} failed in {elapsed:.1f}s")
        if message:
            line += f": {message}"
        (log.info if state is JobState.DONE else log.warning)("%s", line)

    def _finish_if_complete(self, txn: Txn, job: Job) -> None:
        if job.state is JobState.RUNNING and job.complete:
            failed = job.extents_failed or job.files_failed
            self._end(txn, job, JobState.FAILED if failed else JobState.DONE,
                      f"{job.extents_failed} extents failed" if failed else None)

    def _fail(self, job_id: str, message: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state.final:
                return
            with self._state.write() as txn:
                self._end(txn, job, JobState.FAILED, message)

    def _forget_old_jobs(self) -> None:
        final = sorted((j for j in self._jobs.values() if j.state.final), key=lambda j: j.id)
        excess = len(final) - self.settings.keep_jobs
        if excess <= 0:
            return
        with self._state.write() as txn:
            for job in final[:excess]:
                txn.delete_job(job.id)
                del self._jobs[job.id]

    # ---- internals: planning (the planner thread) ----------------------------------------

    def _resolve(self, bucket: str, path: str) -> tuple[str, str]:
        """(kind, prefix-or-key) of a source path; ``NotFound`` if nothing is there. A name
        that is both a file and a directory is the directory (as on the mount)."""
        url = f"s3://{bucket}/{path}"
        if path == "" or path.endswith("/"):
            if self._origin.first_key(bucket, path) is None:
                raise NotFound(f"{url} does not exist (no objects under it)")
            return "dir", path
        if self._origin.first_key(bucket, path + "/") is not None:
            return "dir", path + "/"
        if self._origin.head(bucket, path) is None:
            raise NotFound(f"{url} does not exist")
        return "file", path

    def _source_pages(self, job: Job, infos: list[ObjectInfo] | None
                      ) -> Iterator[list[ObjectInfo | tuple[str, None]]]:
        if job.kind == "dir":
            yield from self._origin.list(job.bucket, job.prefix)
            return
        if infos is not None:
            for i in range(0, len(infos), _LIST_CHUNK):
                yield list(infos[i:i + _LIST_CHUNK])
            return
        keys: Sequence[str] = [job.prefix] if job.kind == "file" else job.keys
        for i in range(0, len(keys), _HEAD_CHUNK):
            chunk = keys[i:i + _HEAD_CHUNK]
            found = self._origin.head_many(job.bucket, chunk)
            yield [info if info is not None else (key, None) for key, info in zip(chunk, found)]

    def _plan(self, job_id: str, infos: list[ObjectInfo] | None) -> None:
        """Plan one job (the planner thread): list the source, queue extents for owners."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state.final or self._closed:
                return
            if job.state is JobState.QUEUED:
                job.transition(JobState.RUNNING, self._wall())
                log.info("preload %s started: listing %s", job.id, job.source)
            job.listing = True
            with self._state.write() as txn:
                txn.put_job(job.id, job.to_json())
        pages = self._source_pages(job, infos)
        try:
            for page in pages:
                with self._lock:
                    if job.state.final or self._closed:
                        return
                    self._add_objects(job, page)
            with self._lock:
                if job.state.final or self._closed:
                    return
                job.listing = False
                with self._state.write() as txn:
                    self._finish_if_complete(txn, job)
                    txn.put_job(job.id, job.to_json())
                log.info("preload %s planned: %d files, %d bytes, %d extents", job.id,
                         job.files_total, job.bytes_total, job.extents_total)
        except ObjfsError as exc:
            self._fail(job_id, f"listing {job.source} failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - the job fails, the master goes on
            log.exception("planning preload %s failed", job_id)
            self._fail(job_id, f"planning failed: {type(exc).__name__}: {exc}")
        finally:
            pages.close()

    def _add_objects(self, job: Job, page: list[Any]) -> None:
        """Plan one listing page (under ``_lock``): files, extents, queue entries."""
        ring = self._registry.ring(job.group, job.extent_pages)
        with self._state.write() as txn:
            for obj in page:
                if isinstance(obj, tuple):  # a listed file that no longer exists
                    key = obj[0]
                    if txn.claim_key(job.id, key):
                        job.files_total += 1
                        job.files_failed += 1
                        job.add_error({"time": self._wall(), "host": None, "key": key,
                                       "extent": None, "error": "no longer exists"})
                    continue
                if is_directory_marker(obj) or not txn.claim_key(job.id, obj.key):
                    continue
                file_no = job.files_total
                job.files_total += 1
                job.bytes_total += obj.size
                planned = plan_object(job.bucket, obj, ring, job.extent_pages)
                if not planned:
                    self._file_final(job, failed=False, skipped=True)
                    continue
                txn.put_file(job.id, file_no, {"k": obj.key, "s": obj.size,
                                               "left": len(planned), "fb": 0, "sb": 0,
                                               "failed": False})
                for extent in planned:
                    task_no = job.next_task
                    job.next_task += 1
                    owner = ORPHAN if extent.owner is None else extent.owner
                    txn.put_task(job.id, task_no, {
                        "k": obj.key, "e": obj.etag, "s": obj.size, "x": extent.extent,
                        "xp": extent.extent_pages, "d": extent.digest.hex(), "f": file_no,
                        "a": owner, "st": TaskState.PENDING.value, "n": 0, "fb": 0})
                    txn.put_work("queue", owner, job.id, task_no, extent.digest,
                                 extent.extent)
                    if owner != ORPHAN:
                        job.host(owner).extents_assigned += 1
                    job.extents_total += 1
            txn.put_job(job.id, job.to_json())

    # ---- status --------------------------------------------------------------------------

    def _sample(self, job: Job) -> None:
        samples = self._rates.setdefault(job.id, collections.deque())
        now = self._clock()
        samples.append((now, job.bytes_done, job.bytes_final))
        # Keep one sample at least a window old: the baseline rates are measured from.
        while len(samples) > 2 and samples[1][0] <= now - self.settings.rate_window_s:
            samples.popleft()

    def _rates_of(self, job: Job) -> tuple[float | None, float | None]:
        """(fetched bytes/s, final bytes/s) over the last window, None if unknown."""
        if job.state.final:
            elapsed = (job.ended_at or 0) - (job.started_at or job.created_at)
            return (job.bytes_done / elapsed if elapsed > 0 else None), None
        samples = self._rates.get(job.id)
        if not samples:
            return None, None
        now = self._clock()
        t0, fetched0, final0 = samples[0]
        if len(samples) == 1 and now - t0 < 1.0:
            return None, None
        span = max(now - t0, 1e-3)
        return (job.bytes_done - fetched0) / span, (job.bytes_final - final0) / span

    def _status(self, job: Job) -> dict[str, Any]:
        fetched_rate, final_rate = self._rates_of(job)
        eta = None
        if job.state is JobState.RUNNING and not job.listing and final_rate:
            eta = max(0.0, (job.bytes_total - job.bytes_final) / final_rate)
        live = set(self._registry.members_of(job.group))
        end = job.ended_at if job.ended_at is not None else self._wall()
        warnings = []
        capacity = self._registry.capacity(job.group)
        if job.state is JobState.RUNNING and capacity and job.bytes_total > capacity:
            warnings.append(f"the data ({job.bytes_total} bytes) is larger than the caches of "
                            f"the group ({capacity} bytes): not all of it can stay Ready")
        if job.state is JobState.RUNNING and not live:
            warnings.append(f"no live member in {job.group}: the job waits for one")
        return {
            "id": job.id, "source": job.source, "group": job.group, "state": job.state.value,
            "listing": job.listing, "created_at": job.created_at,
            "started_at": job.started_at, "ended_at": job.ended_at,
            "elapsed_s": round(end - (job.started_at or job.created_at), 3),
            "bandwidth_limit": job.bandwidth_limit, "extent_pages": job.extent_pages,
            "files": {"total": job.files_total, "done": job.files_done,
                      "skipped": job.files_skipped, "failed": job.files_failed},
            "bytes": {"total": job.bytes_total, "done": job.bytes_done,
                      "skipped": job.bytes_skipped, "failed": job.bytes_failed},
            "extents": {"total": job.extents_total, "final": job.extents_final,
                        "failed": job.extents_failed, "reassigned": job.extents_reassigned,
                        "retried": job.extents_retried},
            "throughput_bytes_per_s": None if fetched_rate is None else round(fetched_rate),
            "eta_s": None if eta is None else round(eta, 1),
            "hosts": {m: {"state": "up" if m in live else "gone",
                          **dataclasses.asdict(h)} for m, h in sorted(job.hosts.items())},
            "errors": list(job.errors), "error_count": job.error_count,
            "message": job.message, "warnings": warnings,
        }
