"""Preloading one extent into the page cache: the unit of work of a preload job.

A preload job (the master's, ``objfs.master.agent``; or a local warm-up, ``objfs.warmup``)
is cut into extents of ``extent_pages`` pages (``cache.ring``: the unit one owner holds).
``ExtentFetcher.fetch`` brings one extent's pages into this host's cache:

1. pin the extent's pages for the job (``PageCache.pin``): from now on nothing evicts them,
   not even the job's own later pages, until the job ends and ``release`` unpins them;
2. READY pages are *skipped* (counted, not fetched);
3. the others are fetched at preload priority (``cache.limits``: demand reads and readahead
   go first and keep slots free), after taking their bytes from the job's token bucket
   (its bandwidth limit on this host); at most ``concurrency`` extents fetch at once;
4. the extent is *done* once every page is READY: fetched bytes + skipped bytes = the
   extent's bytes. A page the cache did not keep (admission refused because pinned pages
   fill the cache, or disk trouble) or a failed fetch makes it *failed*, with one line.

Everything here runs on the daemon's event loop. Cancelling a ``fetch`` (the job was
cancelled, the master took the extent back) stops waiting at once; runs already sent to the
origin finish and are stored (at most ``concurrency`` extents), nothing new is started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future

from objfs.cache.limits import Priority, TokenBucket
from objfs.cache.pagecache import PageCache, PageState
from objfs.cache.pages import ObjectVersion
from objfs.cache.ring import extent_range
from objfs.metrics import Metrics

_STORE_POLL_S = 0.02


@dataclasses.dataclass(frozen=True)
class ExtentOutcome:
    fetched_bytes: int = 0
    skipped_bytes: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def _wait_shared(fut: Future, timeout: float) -> None:
    """Wait for a future other readers share without ever cancelling it (a cancelled
    preload must not fail a reader waiting on the same page)."""
    if fut.done():
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def done(_: Future) -> None:
        try:
            loop.call_soon_threadsafe(lambda: None if waiter.done() else waiter.set_result(None))
        except RuntimeError:  # the loop is closed
            pass

    fut.add_done_callback(done)
    await asyncio.wait_for(asyncio.shield(waiter), timeout)


class ExtentFetcher:
    """Fetches extents for preload jobs. Loop only (no locks of its own)."""

    def __init__(self, cache: PageCache, metrics: Metrics, *, concurrency: int = 8,
                 fetch_timeout_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self._metrics = metrics
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._fetch_timeout_s = fetch_timeout_s
        self._clock = clock

    async def fetch(self, holder: str, version: ObjectVersion, extent: int, extent_pages: int,
                    *, limit: TokenBucket | None = None,
                    origin_only: bool = False) -> ExtentOutcome:
        """Bring extent ``extent`` of ``version`` into the cache, pinned for ``holder``."""
        pages = extent_range(version, extent, extent_pages)
        if not pages:
            return ExtentOutcome()
        cache = self.cache
        cache.pin(holder, version, pages)
        before = cache.states(version, pages)
        skipped = sum(version.page_length(i) for i, st in zip(pages, before)
                      if st is PageState.READY)
        wanted = [i for i, st in zip(pages, before) if st is not PageState.READY]
        if not wanted:
            self._metrics.inc("preload_skipped_bytes", skipped)
            return ExtentOutcome(0, skipped)
        async with self._slots:
            nbytes = sum(version.page_length(i) for i in wanted)
            if limit is not None:
                await limit.take(nbytes)
            run = range(wanted[0], wanted[-1] + 1)
            futures = cache.fetch_pages(version, run, Priority.PRELOAD, origin_only=origin_only)
            error: str | None = None
            for fut in futures:
                try:
                    await _wait_shared(fut, self._fetch_timeout_s)
                    fut.result()
                except asyncio.TimeoutError:
                    error = error or f"no answer from the origin in {self._fetch_timeout_s:g}s"
                except Exception as exc:  # noqa: BLE001 - reported as the extent's error
                    error = error or str(exc) or type(exc).__name__
            # The bytes are here; wait until they are stored (INFLIGHT -> READY or not kept).
            deadline = self._clock() + self._fetch_timeout_s
            while True:
                after = cache.states(version, pages)
                if PageState.INFLIGHT not in after or self._clock() > deadline:
                    break
                await asyncio.sleep(_STORE_POLL_S)
        fetched = sum(version.page_length(i) for i, a, b in zip(pages, before, after)
                      if b is PageState.READY and a is not PageState.READY)
        missing = sum(1 for st in after if st is not PageState.READY)
        if missing and error is None:
            usage = cache.usage()
            error = (f"{missing} of {len(pages)} pages not kept: the cache is full "
                     f"({usage['used_bytes'] >> 20} MiB used, {usage['pinned_bytes'] >> 20} "
                     f"MiB pinned by preloads, of {usage['capacity_bytes'] >> 20} MiB) or "
                     "its disk failed")
        self._metrics.inc("preload_fetched_bytes", fetched)
        self._metrics.inc("preload_skipped_bytes", skipped)
        if error is not None:
            self._metrics.inc("preload_extents_failed_total")
            return ExtentOutcome(fetched, skipped, error)
        self._metrics.inc("preload_extents_done_total")
        return ExtentOutcome(fetched, skipped)

    def release(self, holder: str) -> int:
        """The job ended: unpin its pages (they stay cached, most recently used first)."""
        return self.cache.unpin(holder)
