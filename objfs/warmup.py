"""Local preload: ``objfs preload MOUNTPOINT/PATH`` warms this one host's cache (no master).

Like ``juicefs warmup``: the daemon walks the file or directory in its metadata tree, cuts
every file into the extents of ``cache.ring`` and brings each into the page cache with
``cache.preload.ExtentFetcher`` (pinned for the job, READY pages skipped, at preload
priority, under an optional bandwidth limit). In a cluster the pages come through the usual
sources: from their owner when it has them (which fetches from the origin once if not), so a
host warms its own cache without loading the origin twice for what the cluster holds.

A job runs on the daemon's event loop: a walker fills a bounded queue of extents (so a huge
tree is never all in memory) and ``workers`` coroutines drain it. Its status has the fields
of a master job's (``master.protocol``: "Status"), so ``objfs preload`` shows both with the
same progress display. Cancelling stops the workers at once (runs already sent finish); the
job's pins go when it ends, whatever the outcome. Finished jobs are kept (the last
``_KEEP``) for ``status``.

Thread-safety: the control endpoint calls ``start``/``status``/``cancel`` from worker
threads; a job's counters are written on the loop and read under ``_lock``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from objfs.cache.limits import TokenBucket
from objfs.cache.pages import ObjectVersion
from objfs.cache.preload import ExtentFetcher
from objfs.cache.ring import DEFAULT_EXTENT_PAGES, extent_range, extents
from objfs.errors import ConfigError, NotFound
from objfs.loop import EventLoopThread
from objfs.tree import Inode, MetadataTree

log = logging.getLogger(__name__)

_KEEP = 20
_QUEUE = 256
_RATE_WINDOW_S = 10.0
_MAX_ERRORS = 10


def pin_holder(job_id: str) -> str:
    return f"local:{job_id}"


class _Job:
    def __init__(self, job_id: str, source: str, limit: int | None, now: float) -> None:
        self.id = job_id
        self.source = source
        self.limit = limit
        self.state = "running"
        self.listing = True
        self.created_at = now
        self.ended_at: float | None = None
        self.message: str | None = None
        self.files = {"total": 0, "done": 0, "skipped": 0, "failed": 0}
        self.bytes = {"total": 0, "done": 0, "skipped": 0, "failed": 0}
        self.extents = {"total": 0, "final": 0, "failed": 0, "reassigned": 0, "retried": 0}
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        # file -> [extents left, bytes fetched, failed]
        self.open_files: dict[str, list[Any]] = {}
        self.task: asyncio.Task | None = None


class LocalPreloads:
    def __init__(self, tree: MetadataTree, version_of: Callable[[Inode], ObjectVersion],
                 fetcher: ExtentFetcher, loop: EventLoopThread, *, workers: int = 16,
                 extent_pages: int = DEFAULT_EXTENT_PAGES,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._tree = tree
        self._version_of = version_of
        self._fetcher = fetcher
        self._loop = loop
        self._workers = workers
        self._extent_pages = extent_pages
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._jobs: collections.OrderedDict[str, _Job] = collections.OrderedDict()  # _lock
        self._ids = itertools.count(1)

    # ---- the control endpoint's calls (worker threads) -------------------------------------

    def start(self, relpath: str, bandwidth_limit: int | None = None) -> dict[str, Any]:
        """Start warming ``relpath`` (a file or directory below the mount root)."""
        try:
            root = self._tree.resolve(relpath)
        except NotFound:
            raise NotFound(f"{relpath or '/'}: no such file or directory in the mount") \
                from None
        if bandwidth_limit is not None and bandwidth_limit <= 0:
            raise ConfigError("bandwidth limit must be a positive number of bytes/s")
        now = self._wall()
        job = _Job(f"local-{int(now)}-{next(self._ids)}", "/" + relpath, bandwidth_limit, now)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > _KEEP:
                oldest = next(iter(self._jobs.values()))
                if oldest.state == "running":
                    break
                self._jobs.popitem(last=False)
        self._loop.run(self._launch(job, root), timeout=10)
        log.info("local preload %s of %s started", job.id, job.source)
        return self.status(job.id)

    def status(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"no local preload {job_id}")
            return self._status(job)

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._status(j) for j in reversed(self._jobs.values())]

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"no local preload {job_id}")
        self._loop.run(self._cancel(job), timeout=10)
        return self.status(job_id)

    def stop(self) -> None:
        """Daemon shutdown: cancel every running job."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.state == "running"]
        for job in jobs:
            try:
                self._loop.run(self._cancel(job), timeout=5)
            except Exception as exc:  # noqa: BLE001 - shutting down
                log.debug("cancelling local preload %s: %s", job.id, exc)

    # ---- the loop side -------------------------------------------------------------------------

    async def _launch(self, job: _Job, root: Inode) -> None:
        job.task = asyncio.get_running_loop().create_task(self._run(job, root))

    async def _cancel(self, job: _Job) -> None:
        if job.task is not None and not job.task.done():
            job.task.cancel()
            try:
                await job.task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - _run logged it
                pass

    def _walk(self, root: Inode) -> Iterator[Inode]:
        """Files under ``root`` (BLOCKS: reads the tree; run in a worker thread)."""
        pending = [root]
        while pending:
            inode = pending.pop()
            if inode.is_dir:
                for entry in self._tree.readdir(inode.ino):
                    try:
                        pending.append(self._tree.get(entry.ino))
                    except NotFound:  # removed by a relist meanwhile
                        continue
            elif inode.etag:  # a file written here and not published yet has no version
                yield inode

    async def _run(self, job: _Job, root: Inode) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(_QUEUE)
        limit = TokenBucket(job.limit) if job.limit else None
        workers = [loop.create_task(self._work(job, queue, limit))
                   for _ in range(self._workers)]
        walk = self._walk(root)
        sentinel = object()
        try:
            while True:
                inode = await loop.run_in_executor(None, next, walk, sentinel)
                if inode is sentinel:
                    break
                version = self._version_of(inode)
                numbers = list(extents(version, self._extent_pages))
                with self._lock:
                    job.files["total"] += 1
                    job.bytes["total"] += version.size
                    job.extents["total"] += len(numbers)
                    if numbers:
                        job.open_files[version.key] = [len(numbers), 0, False]
                    else:
                        job.files["skipped"] += 1
                for extent in numbers:
                    await queue.put((version, extent))
            with self._lock:
                job.listing = False
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
            with self._lock:
                failed = job.extents["failed"]
                self._end(job, "failed" if failed else "done",
                          f"{failed} extents failed" if failed else None)
        except asyncio.CancelledError:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            with self._lock:
                self._end(job, "cancelled", "cancelled by request")
            raise
        except Exception as exc:  # noqa: BLE001 - the job fails with one line
            log.exception("local preload %s failed", job.id)
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            with self._lock:
                self._end(job, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            released = self._fetcher.release(pin_holder(job.id))
            try:
                walk.close()
            except ValueError:  # still running in its worker thread (cancelled): it ends there
                pass
            log.info("local preload %s %s: %d pinned pages released", job.id, job.state,
                     released)

    async def _work(self, job: _Job, queue: asyncio.Queue, limit: TokenBucket | None) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            version, extent = item
            outcome = await self._fetcher.fetch(pin_holder(job.id), version, extent,
                                                self._extent_pages, limit=limit)
            nbytes = sum(version.page_length(i)
                         for i in extent_range(version, extent, self._extent_pages))
            with self._lock:
                job.extents["final"] += 1
                job.bytes["done"] += outcome.fetched_bytes
                job.bytes["skipped"] += outcome.skipped_bytes
                if not outcome.ok:
                    job.extents["failed"] += 1
                    job.bytes["failed"] += nbytes - outcome.fetched_bytes - \
                        outcome.skipped_bytes
                    job.error_count += 1
                    if len(job.errors) < _MAX_ERRORS:
                        job.errors.append({"time": self._wall(), "host": None,
                                           "key": version.key, "extent": extent,
                                           "error": outcome.error})
                now = self._clock()
                job.samples.append((now, job.bytes["done"]))
                while job.samples and job.samples[0][0] < now - _RATE_WINDOW_S:
                    job.samples.popleft()
                entry = job.open_files.get(version.key)
                if entry is not None:
                    entry[0] -= 1
                    entry[1] += outcome.fetched_bytes
                    entry[2] = entry[2] or not outcome.ok
                    if entry[0] == 0:
                        del job.open_files[version.key]
                        kind = "failed" if entry[2] else "done" if entry[1] else "skipped"
                        job.files[kind] += 1

    def _end(self, job: _Job, state: str, message: str | None) -> None:
        if job.state != "running":
            return
        job.state = state
        job.message = message
        job.listing = False
        job.ended_at = self._wall()

    def _status(self, job: _Job) -> dict[str, Any]:
        """The master's status format (``master.protocol``), for one host."""
        end = job.ended_at if job.ended_at is not None else self._wall()
        elapsed = max(0.0, end - job.created_at)
        rate = None
        if len(job.samples) >= 2 and job.state == "running":
            (t0, b0), (t1, b1) = job.samples[0], job.samples[-1]
            if t1 > t0:
                rate = (b1 - b0) / (t1 - t0)
        b = job.bytes
        left = b["total"] - b["done"] - b["skipped"] - b["failed"]
        eta = None
        if job.state == "running" and not job.listing and rate:
            eta = left / rate
        return {"id": job.id, "source": job.source, "group": "local", "state": job.state,
                "listing": job.listing, "created_at": job.created_at,
                "started_at": job.created_at, "ended_at": job.ended_at,
                "bandwidth_limit": job.limit, "files": dict(job.files),
                "bytes": dict(job.bytes), "extents": dict(job.extents),
                "throughput_bytes_per_s": rate, "elapsed_s": round(elapsed, 3),
                "eta_s": eta, "hosts": {}, "errors": list(job.errors),
                "error_count": job.error_count, "message": job.message, "warnings": []}
