"""The daemon's side of the master protocol (``objfs mount --master URL``).

``MasterAgent`` registers this daemon with the master and keeps it a member: a thread
(``objfs-master``) sends a heartbeat (``master.protocol``: ``MemberReport``) every
``heartbeat_interval_s`` the master asks for, and at once when its queue of preload work runs
low or when it has just finished all of it. Each answer

- replaces the member list (``objfs.cluster.MutableMembership``): the peer cache's owner
  function and the replica-aware eviction follow it. A master that does not answer changes
  nothing: the last list is kept and reads go on; only preload work pauses once the extents
  already received are done (their results are kept and sent when the master is back);
- hands out work: extents this host owns, each fetched by ``cache.preload.ExtentFetcher`` on
  the event loop (pinned for its job, READY pages skipped, at preload priority, under the
  job's bandwidth share as a token bucket, from the origin); the outcome goes back in the
  next heartbeat;
- says which jobs ended: a cancelled job's extents stop at once (nothing new is fetched; runs
  already sent finish, at most ``ExtentFetcher``'s concurrency), and any final or unknown
  job's pins are released; extents the master took back (``revoked``) stop the same way.

Threads: the heartbeat thread owns the HTTP calls; the extents run on the event loop. The
work bookkeeping shared between them (``_held``, ``_results``, ``_state``) is under
``_lock``; the running extents (``_running``), the jobs that ended (``_ended``) and the
token buckets are touched on the loop only, so a job's end (cancel its extents, then unpin)
is ordered with the extents that pin.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from objfs.cache.limits import TokenBucket
from objfs.cache.pages import ObjectVersion
from objfs.cache.preload import ExtentFetcher
from objfs.cluster import MutableMembership
from objfs.loop import EventLoopThread
from objfs.master.client import MasterClient
from objfs.master.errors import Conflict, MasterError, Unauthorized
from objfs.master.protocol import (HeartbeatReply, MemberReport, Origin, TaskRef,
                                   TaskResult, WorkItem)
from objfs.metrics import Metrics

log = logging.getLogger(__name__)

_MIN_GAP_S = 0.2            # between two heartbeats, however eager
_FINAL = frozenset({"done", "failed", "cancelled", "unknown"})
_ENDED_KEPT = 1000


def pin_holder(job_id: str) -> str:
    """The page-cache pin holder of a master job."""
    return f"master:{job_id}"


class MasterAgent:
    def __init__(self, client: MasterClient, membership: MutableMembership, origin: Origin,
                 fetcher: ExtentFetcher, loop: EventLoopThread, metrics: Metrics, *,
                 queue_extents: int = 64, interval_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.membership = membership
        self.origin = origin
        self.fetcher = fetcher
        self._loop = loop
        self._metrics = metrics
        self._queue_extents = max(2, queue_extents)
        self._clock = clock
        self._incarnation = f"{int(time.time())}-{id(self):x}"
        self._lock = threading.Lock()
        self._held: dict[TaskRef, WorkItem] = {}        # guarded by _lock
        self._results: list[TaskResult] = []            # guarded by _lock
        self._state: dict[str, Any] = {                 # guarded by _lock
            "state": "starting", "last_ok": None, "last_error": None, "jobs": {},
            "interval_s": interval_s}
        self._more_work = False                         # guarded by _lock: last reply had work
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Loop only:
        self._running: dict[TaskRef, asyncio.Task] = {}
        self._ended: dict[str, None] = {}               # ordered: oldest first
        self._limits: dict[str, tuple[int, TokenBucket]] = {}
        metrics.gauge("preload_extents_held", lambda: len(self._held))

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "MasterAgent":
        self._thread = threading.Thread(target=self._run, name="objfs-master", daemon=True)
        self._thread.start()
        return self

    def stop(self, leave: bool = True) -> None:
        """Stop heartbeating, stop the extents, and (``leave``) tell the master this member
        is gone, so its extents move at once instead of after the member timeout."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return  # never started (the mount failed)
        self._thread.join(timeout=15)
        try:
            self._loop.run(self._stop_extents(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.debug("stopping preload extents: %s", exc)
        if leave:
            try:
                self.client.leave(self.membership.self_id, timeout=3.0)
            except MasterError as exc:
                log.info("could not tell the master this member leaves (%s); it drops it "
                         "after its member timeout", exc)

    async def _stop_extents(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3)

    def describe(self) -> dict[str, Any]:
        """What ``objfs peers`` shows about the master (any thread)."""
        with self._lock:
            last_ok = self._state["last_ok"]
            return {"url": self.client.url, "state": self._state["state"],
                    "last_heartbeat_s_ago": None if last_ok is None
                    else round(self._clock() - last_ok, 1),
                    "last_error": self._state["last_error"],
                    "extents_held": len(self._held), "results_pending": len(self._results),
                    "jobs": dict(self._state["jobs"])}

    # ---- the heartbeat thread --------------------------------------------------------------

    def _run(self) -> None:
        last = -1e9
        while not self._stop.is_set():
            gap = self._clock() - last
            if gap < _MIN_GAP_S:
                self._stop.wait(_MIN_GAP_S - gap)
            last = self._clock()
            self._wake.clear()
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - never let the thread die
                log.exception("master heartbeat failed unexpectedly")
            with self._lock:
                interval = self._state["interval_s"]
            self._wake.wait(interval)

    def report(self) -> tuple[MemberReport, int]:
        """This member's report now, and how many results it carries."""
        usage = self.fetcher.cache.usage()
        with self._lock:
            results = tuple(self._results)
            held = tuple(sorted(self._held))
            jobs = {ref.job for ref in held}
        jobs |= {h.split(":", 1)[1] for h in self.fetcher.cache.pin_holders()
                 if h.startswith("master:")}
        want = max(0, self._queue_extents - len(held))
        extent_pages = self.membership.ring().extent_pages
        return MemberReport(
            member=self.membership.self_id, incarnation=self._incarnation,
            origin=self.origin, extent_pages=extent_pages,
            capacity_bytes=usage["capacity_bytes"], used_bytes=usage["used_bytes"],
            free_bytes=usage["free_bytes"], held=held, results=results,
            jobs=tuple(sorted(jobs)), want_tasks=want,
            want_bytes=want * extent_pages * (1 << 20)), len(results)

    def beat(self) -> bool:
        """One heartbeat; True if the master answered. (The thread's step; tests call it.)"""
        report, sent = self.report()
        try:
            reply = self.client.heartbeat(report)
        except MasterError as exc:
            self._failed(exc)
            return False
        self._metrics.inc("master_heartbeats_total")
        with self._lock:
            del self._results[:sent]  # delivered; later ones stay for the next heartbeat
            was = self._state["state"]
            self._state.update(state="up", last_ok=self._clock(), last_error=None,
                               interval_s=reply.heartbeat_interval_s)
            self._more_work = bool(reply.work)
        if was != "up":
            log.info("master %s: registered as %s, %d members in %s", self.client.url,
                     self.membership.self_id, len(reply.members), self.origin.group_id)
        self.apply(reply)
        return True

    def _failed(self, exc: MasterError) -> None:
        self._metrics.inc("master_heartbeat_failures_total")
        state = "refused" if isinstance(exc, (Unauthorized, Conflict)) or \
            (exc.status < 500) else "unreachable"
        with self._lock:
            was = self._state["state"]
            self._state.update(state=state, last_error=str(exc))
            self._more_work = False
        if was != state:
            members = len(self.membership.ring().members)
            log.warning("master %s: %s; keeping the last member list (%d members), preload "
                        "work pauses after the extents already received", self.client.url,
                        exc, members)

    def apply(self, reply: HeartbeatReply) -> None:
        if reply.members:
            if self.membership.update(reply.members):
                log.info("members of %s: %s", self.origin.group_id, ", ".join(reply.members))
        ended: list[str] = []
        limits: dict[str, int | None] = {}
        with self._lock:
            jobs = self._state["jobs"]
            for job_id, info in reply.jobs.items():
                if info.state in _FINAL:
                    ended.append(job_id)
                    jobs.pop(job_id, None)
                    for ref in [r for r in self._held if r.job == job_id]:
                        del self._held[ref]
                    self._results = [r for r in self._results if r.job != job_id]
                else:
                    jobs[job_id] = info.state
                    limits[job_id] = info.limit_bytes_per_s
            revoked = [ref for ref in reply.revoked if self._held.pop(ref, None) is not None]
            work = [item for item in reply.work
                    if item.ref not in self._held and item.job not in ended]
            for item in work:
                self._held[item.ref] = item
        if ended or revoked or work or limits:
            self._loop.loop.call_soon_threadsafe(self._apply_on_loop, ended, revoked, work,
                                                 limits)
        if work:
            self._metrics.inc("preload_extents_received_total", len(work))

    # ---- the loop side ---------------------------------------------------------------------

    def _apply_on_loop(self, ended: list[str], revoked: list[TaskRef], work: list[WorkItem],
                       limits: dict[str, int | None]) -> None:
        for job_id, rate in limits.items():
            current = self._limits.get(job_id)
            if rate is None:
                self._limits.pop(job_id, None)
            elif current is None or current[0] != rate:
                self._limits[job_id] = (rate, TokenBucket(rate))
        for job_id in ended:
            self._ended[job_id] = None
            while len(self._ended) > _ENDED_KEPT:
                del self._ended[next(iter(self._ended))]
            self._limits.pop(job_id, None)
            for ref, task in list(self._running.items()):
                if ref.job == job_id:
                    task.cancel()
            released = self.fetcher.release(pin_holder(job_id))
            log.info("preload %s ended: %d pinned pages released", job_id, released)
        for ref in revoked:
            task = self._running.get(ref)
            if task is not None:
                task.cancel()
        for item in work:
            if item.ref in self._running:
                continue
            if item.job in self._ended:  # ended before its work arrived: nothing to do
                with self._lock:
                    self._held.pop(item.ref, None)
                continue
            self._running[item.ref] = asyncio.get_running_loop().create_task(
                self._run_extent(item))

    async def _run_extent(self, item: WorkItem) -> None:
        ref = item.ref
        result: TaskResult | None = None
        try:
            if not item.key.startswith(self.origin.prefix):
                result = TaskResult(ref.job, ref.task, "failed",
                                    error=f"{item.key} is not under this member's prefix "
                                    f"{self.origin.prefix!r}")
            else:
                version = ObjectVersion(self.origin.bucket, item.key, item.etag, item.size)
                limit = self._limits.get(item.job)
                outcome = await self.fetcher.fetch(
                    pin_holder(item.job), version, item.extent, item.extent_pages,
                    limit=limit[1] if limit is not None else None, origin_only=True)
                result = TaskResult(ref.job, ref.task, "done" if outcome.ok else "failed",
                                    outcome.fetched_bytes, outcome.skipped_bytes,
                                    outcome.error)
        except asyncio.CancelledError:
            with self._lock:
                self._held.pop(ref, None)  # revoked or its job ended: nothing to report
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the extent's failure
            log.exception("preload extent %s/%d failed unexpectedly", ref.job, ref.task)
            result = TaskResult(ref.job, ref.task, "failed",
                                error=f"{type(exc).__name__}: {exc}")
        finally:
            self._running.pop(ref, None)
        with self._lock:
            if self._held.pop(ref, None) is None:
                return  # taken back meanwhile
            self._results.append(result)
            held = len(self._held)
            eager = held == 0 or (self._more_work and held <= self._queue_extents // 2)
        if eager:
            self._wake.set()

    # ---- for tests ---------------------------------------------------------------------------

    def held(self) -> Iterable[TaskRef]:
        with self._lock:
            return list(self._held)
