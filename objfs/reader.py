"""Read path for this stage: whole 1 MiB pages of an object version, fetched from the origin.

Reads are mapped to pages (``cache.pages``); pages not in a small in-memory buffer are
coalesced into ranged GETs pinned to the ETag and fetched in parallel on the event loop. A
sequential reader gets a readahead window that doubles while it stays sequential, so a 128 KiB
kernel read stream becomes a few multi-MiB GETs instead of one GET per read. The on-disk page
cache with Ready/Missing/Inflight states replaces the in-memory buffer later; this module's
interface (``read(version, offset, size, stream)``) is what it plugs into.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict

from objfs.cache.pages import PAGE_SIZE, ObjectVersion, PageKey, byte_range, coalesce, page_span
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from objfs.store import ObjectStore


class ReadStream:
    """Per-open-handle access pattern: is the reader sequential, and how far ahead to fetch.

    Owned by one file handle; racy updates from concurrent readers of the same handle only
    make the window guess worse, never the bytes wrong.
    """

    def __init__(self, max_window_pages: int) -> None:
        self._max = max_window_pages
        self.next_offset = 0
        self.window_pages = 1

    def observe(self, offset: int, size: int) -> int:
        """Record a read; return how many pages to fetch from the read's first page on."""
        # Tolerate the kernel delivering its own readahead slightly out of order.
        if abs(offset - self.next_offset) <= 2 * PAGE_SIZE and offset >= 0:
            self.window_pages = min(self._max, self.window_pages * 2)
        else:
            self.window_pages = 1
        self.next_offset = offset + size
        return self.window_pages


class OriginReader:
    def __init__(self, store: ObjectStore, loop: EventLoopThread, *, metrics: Metrics,
                 buffer_pages: int = 64, request_pages: int = 2, max_window_pages: int = 8,
                 parallelism: int = 8) -> None:
        self._store = store
        self._loop = loop
        self._metrics = metrics
        self._buffer: OrderedDict[PageKey, bytes] = OrderedDict()  # guarded by _lock
        self._lock = threading.Lock()
        self._buffer_pages = buffer_pages
        self._request_pages = request_pages
        self.max_window_pages = max_window_pages
        self._parallelism = parallelism

    def read(self, version: ObjectVersion, offset: int, size: int,
             stream: ReadStream | None = None) -> bytes:
        span = page_span(offset, size, version.size)
        if not span:
            return b""
        window = stream.observe(offset, size) if stream else 1
        last = min(version.page_count(), max(span.stop, span.start + window))
        wanted = range(span.start, last)
        pages: dict[int, bytes] = {}
        with self._lock:
            for index in wanted:
                page = self._buffer.get(PageKey(version, index))
                if page is not None:
                    self._buffer.move_to_end(PageKey(version, index))
                    pages[index] = page
        missing = [i for i in wanted if i not in pages]
        needed_missing = [i for i in missing if i in span]
        if needed_missing:
            fetched = self._loop.run(self._fetch(version, missing))
            pages.update(fetched)
            with self._lock:
                for index, page in fetched.items():
                    self._buffer[PageKey(version, index)] = page
                while len(self._buffer) > self._buffer_pages:
                    self._buffer.popitem(last=False)
            self._metrics.inc("read_origin_bytes", sum(len(p) for p in fetched.values()))
        else:
            self._metrics.inc("read_buffer_hits_total")
        end = min(offset + size, version.size)
        first_off = offset - span.start * PAGE_SIZE
        if len(span) == 1:
            return pages[span.start][first_off:first_off + (end - offset)]
        parts = [memoryview(pages[i]) for i in span]
        parts[0] = parts[0][first_off:]
        tail = end - (span.stop - 1) * PAGE_SIZE
        parts[-1] = parts[-1][:tail]
        return b"".join(parts)

    async def _fetch(self, version: ObjectVersion, indexes: list[int]) -> dict[int, bytes]:
        """Fetch pages with coalesced ranged GETs, at most ``parallelism`` at once."""
        limit = asyncio.Semaphore(self._parallelism)

        async def one(run: range) -> dict[int, bytes]:
            async with limit:
                start, end = byte_range(version, run)
                data = await self._store.get_range(version.key, version.etag, start, end)
            view = memoryview(data)
            return {i: bytes(view[(i - run.start) * PAGE_SIZE:(i - run.start + 1) * PAGE_SIZE])
                    for i in run}

        results = await asyncio.gather(*(one(r) for r in coalesce(indexes, self._request_pages)))
        merged: dict[int, bytes] = {}
        for part in results:
            merged.update(part)
        return merged

    def forget(self, version: ObjectVersion | None = None) -> None:
        with self._lock:
            if version is None:
                self._buffer.clear()
            else:
                for key in [k for k in self._buffer if k.version == version]:
                    del self._buffer[key]
