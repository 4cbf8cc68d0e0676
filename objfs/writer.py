"""Write path: sequential multipart uploads with bounded memory, and a disk-staged fallback.

Why: training stops while a checkpoint is written, so a sequential write must go out to the
origin while the application is still writing, and memory must not grow with the file
(../shared/ARCHITECTURE.md, "Write path").

How a sequential upload works (``SequentialUpload``):

1. ``write(offset, data)`` appends to the part being filled, an anonymous ``mmap`` of the
   part's size (pages are committed as they are written, so a 1-byte file costs one page, and
   ``munmap`` hands the memory back to the OS at once). A part is a whole number of 4 MiB
   logical blocks, sized by ``PartSchedule``.
2. When the part is full it is uploaded on the event loop (UploadPart) while ``write`` returns;
   at most ``concurrency`` parts of one upload are in flight (``write`` waits for a slot), and
   optionally at most N across all uploads (``part_slots``, an asyncio.Semaphore on the loop).
   The multipart upload itself is created by the first part, on the loop.
3. Memory is bounded by one ``WriteBudget`` shared by all open files. A part's whole size is
   reserved when its first byte arrives and released when its upload ends. Reserving the
   whole part (rather than block by block) is what keeps the budget free of deadlock: a
   writer never needs more budget to finish a part it has started, so every reservation is
   either being filled by its own writer or being uploaded, and both end without help.
4. ``finish()`` ships the last (short) part, waits for all parts and completes the upload;
   only then does the object exist. A file that never filled its first part is one PUT
   (0-byte files included).
5. The first failure of any part after the store's retries latches the error: the other
   parts are cancelled, the multipart upload is aborted (no orphan left behind; the abort is
   idempotent and also retried by ``finish``), and ``write``/``finish`` raise ``UploadFailed``
   (errno EIO). A partial object is never published.

Threads and ownership. ``write``/``finish``/``abort`` are called from FUSE worker threads and
BLOCK (budget, in-flight slots, the final requests). They are serialized per upload by
``_order`` (a Condition, also used to let a write that arrives ahead of its turn wait briefly
for the one before it: the kernel may deliver in-order writes from two threads out of order).
Part coroutines run on the event-loop thread; the state they share with writers (in-flight
count, part ETags, the latched error, the upload id) is guarded by ``_state``, a second
Condition that is only ever held for a few statements, so the loop thread never waits behind
a blocked writer. Lock order: ``_order`` before ``_state`` before the budget's lock; the loop
thread takes only ``_state`` and the budget's lock, never ``_order``.

The local copy (``spool``). A file being streamed out must stay readable here (``head`` of a
checkpoint still being written) and must be able to fall back to staging when the writer
seeks back, without publishing what was written so far (a partial object every host would
see) and without downloading it again. So a streaming upload writes through to a spool: a
sparse temp file in the staging dir. Each part's buffer *is* the spool's bytes at the part's
offset, a shared file mapping whose range was ``fallocate``d first (so a full disk is an
error at allocation, never a SIGBUS at the first touch of a page): the write path copies each
byte once, into the mapping, and the kernel writes the spool back to disk in the background.
Where the filesystem cannot preallocate, parts are anonymous memory copied into the spool
when they ship. The spool is bounded by the disk: a part whose allocation would cross the
cache's free-space floor is not spooled, and from then on that file cannot be read back or
rewritten out of order while it streams (ENOSPC); the upload itself goes on, and the object
is published complete at close as usual.

``read`` serves the bytes written so far from the spool. ``spill`` turns the upload into a
``StagedFile`` (the caller falls back to it after ``NotSequential``, a truncate, an unlink):
the multipart upload is aborted (nothing published) and the spool becomes the staged file.
Non-sequential writes raise ``NotSequential``; a ``StagedFile`` is a sparse temp file on local
disk, uploaded on close through the same part machinery, read back with ``os.pread`` so
memory stays bounded.

Part schedule (defaults: 4 MiB blocks, 2 blocks per part, part size doubling every 1,000
parts; ``PartSchedule().describe()``)::

    parts        part size   object size up to
    1-1000       8 MiB       7.8 GiB
    1001-2000    16 MiB      23.4 GiB
    2001-3000    32 MiB      54.7 GiB
    3001-4000    64 MiB      117.2 GiB
    4001-5000    128 MiB     242.2 GiB
    5001-6000    256 MiB     492.2 GiB
    6001-7000    512 MiB     992.2 GiB
    7001-8000    1 GiB       1.9 TiB
    8001-9000    2 GiB       3.9 TiB
    9001-10000   4 GiB       7.8 TiB

The rule needs no final size up front (a streaming writer does not know it). Memory per part
grows with the file only past 7.8 GiB, and then as little as possible: fitting 5 TiB into
10,000 parts needs parts averaging 0.5 GiB whatever the rule. A store that takes 4 MiB parts
(US3) uses ``blocks_per_part=1, min_part_bytes=4 MiB``; the step is then chosen so that the
schedule still reaches 5 TiB.

Metrics: ``upload_parts_inflight`` (up/down counter), ``upload_bytes_buffered`` and
``upload_budget_limit_bytes`` (gauges), ``upload_budget_wait_s``,
``upload_budget_overcommit_total``, ``upload_parts_total``, ``upload_bytes``,
``upload_single_put_total``, ``upload_multipart_total``, ``upload_completed_total``,
``upload_failed_total``, ``upload_cancelled_total``, ``upload_abort_failures_total``,
``upload_not_sequential_total``, ``upload_staged_total``, ``upload_staged_download_bytes``,
``upload_spool_lost_total``, ``upload_spilled_total``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import errno
import logging
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from objfs.errors import ConfigError, InvalidArgument, ObjfsError
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from objfs.store import MAX_PARTS, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


class NotSequential(ObjfsError):
    """A write that does not continue where the previous one ended. Not an application error:
    the caller falls back to staging (``SequentialUpload.spill``)."""

    errno = errno.EINVAL
    log_level = logging.DEBUG

    def __init__(self, offset: int, expected: int) -> None:
        super().__init__(f"write at {offset}, expected {expected}")
        self.offset = offset
        self.expected = expected


class UploadFailed(ObjfsError):
    """An upload failed (a part after retries, the completion, or it was cancelled); nothing
    was published. errno EIO (EFBIG when the file outgrew the part schedule)."""

    errno = errno.EIO
    log_level = logging.ERROR


class UploadCancelled(UploadFailed):
    """The upload was cancelled with ``abort()``."""

    log_level = logging.DEBUG


class LocalCopyLost(UploadFailed):
    """A streaming file's local copy was given up for lack of disk space, so what it needs
    (reading it back, rewriting it out of order) cannot be done. errno ENOSPC."""

    errno = errno.ENOSPC
    log_level = logging.WARNING


def statvfs_free_bytes(path: str | os.PathLike[str]) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# ---- part schedule --------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            text = f"{n:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class PartSchedule:
    """Sizes of the parts of a streamed multipart upload.

    Part ``n`` (1-based) is ``blocks_per_part * 2**((n-1) // parts_per_step)`` blocks, capped at
    ``max_part_bytes``: the size depends only on the part number, so no final size is needed.
    Every part but the last is at least ``min_part_bytes`` (S3: 5 MiB). ``parts_per_step=None``
    picks the longest round step (a multiple of 100) with which ``max_parts`` parts still hold
    ``min_object_bytes``; a schedule that cannot is rejected with ``ConfigError``.
    """

    block_size: int = 4 * MiB
    blocks_per_part: int = 2
    max_parts: int = MAX_PARTS
    max_part_bytes: int = 5 * GiB
    min_part_bytes: int = 5 * MiB
    parts_per_step: int | None = None
    min_object_bytes: int = 5 * TiB

    def __post_init__(self) -> None:
        for name in ("block_size", "blocks_per_part", "max_parts", "max_part_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"part schedule: {name} must be a positive integer, "
                                  f"not {value!r}")
        if self.max_parts > MAX_PARTS:
            raise ConfigError(f"part schedule: max_parts {self.max_parts} exceeds S3's "
                              f"{MAX_PARTS}")
        first = self.block_size * self.blocks_per_part
        if first < self.min_part_bytes:
            raise ConfigError(f"part schedule: a part of {self.blocks_per_part} x "
                              f"{_fmt_bytes(self.block_size)} is under the store's minimum "
                              f"part size {_fmt_bytes(self.min_part_bytes)}")
        if first > self.max_part_bytes:
            raise ConfigError(f"part schedule: the first part ({_fmt_bytes(first)}) exceeds "
                              f"max_part_bytes ({_fmt_bytes(self.max_part_bytes)})")
        if self.parts_per_step is None:
            object.__setattr__(self, "parts_per_step", self._auto_step())
        elif not isinstance(self.parts_per_step, int) or self.parts_per_step < 1:
            raise ConfigError(f"part schedule: parts_per_step must be a positive integer, "
                              f"not {self.parts_per_step!r}")
        if self.max_object_bytes < self.min_object_bytes:
            raise ConfigError(
                f"part schedule: {self.max_parts} parts hold at most "
                f"{_fmt_bytes(self.max_object_bytes)}, less than "
                f"{_fmt_bytes(self.min_object_bytes)}: use larger or faster-growing parts")

    @property
    def _cap_blocks(self) -> int:
        return self.max_part_bytes // self.block_size

    @property
    def _step(self) -> int:
        assert self.parts_per_step is not None  # set by __post_init__
        return self.parts_per_step

    def _total_blocks(self, parts: int, step: int) -> int:
        """Blocks in parts 1..``parts`` with a doubling every ``step`` parts."""
        total, group, remaining = 0, 0, parts
        while remaining > 0:
            blocks = min(self.blocks_per_part << group, self._cap_blocks)
            take = remaining if blocks == self._cap_blocks else min(step, remaining)
            total += take * blocks
            remaining -= take
            group += 1
        return total

    def _auto_step(self) -> int:
        candidates = list(range(self.max_parts - self.max_parts % 100, 0, -100)) \
            or list(range(self.max_parts, 0, -1))
        for step in candidates + list(range(min(candidates[-1], 100) - 1, 0, -1)):
            if self._total_blocks(self.max_parts, step) * self.block_size >= \
                    self.min_object_bytes:
                return step
        raise ConfigError(f"part schedule: no growth step lets {self.max_parts} parts of "
                          f"{_fmt_bytes(self.block_size)} blocks hold "
                          f"{_fmt_bytes(self.min_object_bytes)}")

    def part_blocks(self, number: int) -> int:
        """Blocks in part ``number`` (1-based)."""
        if not 1 <= number <= self.max_parts:
            raise InvalidArgument(f"part number {number} is outside 1..{self.max_parts}")
        group = (number - 1) // self._step
        if group >= 62:  # past any cap; keep the shift small
            return self._cap_blocks
        return min(self.blocks_per_part << group, self._cap_blocks)

    def part_bytes(self, number: int) -> int:
        return self.part_blocks(number) * self.block_size

    def part_start(self, number: int) -> int:
        """Offset in the object of the first byte of part ``number``."""
        if not 1 <= number <= self.max_parts + 1:
            raise InvalidArgument(f"part number {number} is outside 1..{self.max_parts + 1}")
        return self._total_blocks(number - 1, self._step) * self.block_size

    @property
    def first_part_bytes(self) -> int:
        """Files smaller than this are one PUT."""
        return self.part_bytes(1)

    @property
    def max_object_bytes(self) -> int:
        return self._total_blocks(self.max_parts, self._step) * self.block_size

    def rows(self) -> list[tuple[int, int, int, int]]:
        """[(first part, last part, part bytes, object bytes up to)] of the whole schedule."""
        out: list[tuple[int, int, int, int]] = []
        first = 1
        while first <= self.max_parts:
            size = self.part_bytes(first)
            last = first
            if size == self._cap_blocks * self.block_size:
                last = self.max_parts
            else:
                last = min(self.max_parts, ((first - 1) // self._step + 1) * self._step)
            out.append((first, last, size, self.part_start(last + 1)))
            first = last + 1
        return out

    def describe(self) -> str:
        """The schedule as a table (what the module docstring shows for the defaults)."""
        lines = [f"{'parts':<12} {'part size':<11} object size up to"]
        for first, last, size, upto in self.rows():
            lines.append(f"{f'{first}-{last}':<12} {_fmt_bytes(size):<11} {_fmt_bytes(upto)}")
        return "\n".join(lines)


# ---- write budget ---------------------------------------------------------------------------


class WriteBudget:
    """A global byte budget for write buffers, shared by all open files.

    ``acquire`` BLOCKS until the bytes fit, first come first served (a large request is not
    starved by small ones). A request larger than the whole limit is let in when nothing else
    is held, so it cannot wait forever. Held bytes are either being filled by a writer or
    being uploaded (``handed_off``); uploads end by themselves, and a writer filling a part
    needs no more budget to finish it. One case cannot resolve itself: a single thread that
    fills parts of more files than the budget holds, round-robin, waits for its own other
    files. So when nothing is being uploaded and nothing was released for
    ``stall_timeout_s``, the waiter is let in over the limit (counted in
    ``upload_budget_overcommit_total``, logged) instead of hanging; ``None`` waits forever.
    """

    def __init__(self, limit_bytes: int, *, metrics: Metrics | None = None,
                 stall_timeout_s: float | None = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(limit_bytes, int) or limit_bytes < 1:
            raise ConfigError(f"write budget must be a positive number of bytes, "
                              f"not {limit_bytes!r}")
        if stall_timeout_s is not None and stall_timeout_s <= 0:
            raise ConfigError("write budget stall timeout must be positive")
        self.limit_bytes = limit_bytes
        self._metrics = metrics or Metrics()
        self._stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._cond = threading.Condition()
        self._used = 0        # guarded by _cond: bytes held
        self._peak = 0        # guarded by _cond: highest _used seen
        self._releases = 0    # guarded by _cond: release() calls so far (progress marker)
        self._uploading = 0   # guarded by _cond: held bytes whose part is being uploaded
        self._next_ticket = 0  # guarded by _cond: FIFO admission
        self._serving = 0      # guarded by _cond: the ticket allowed to try next
        if metrics is not None:
            metrics.gauge("upload_bytes_buffered", lambda: self._used)
            metrics.gauge("upload_budget_limit_bytes", lambda: self.limit_bytes)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def _fits(self, n: int) -> bool:
        return self._used == 0 or self._used + n <= self.limit_bytes

    def acquire(self, n: int) -> None:
        """Take ``n`` bytes of budget. BLOCKS."""
        if n < 0:
            raise ValueError("negative budget request")
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            if ticket == self._serving and self._fits(n):
                self._take(n)
                return
            started = progress_at = self._clock()
            seen = self._releases
            overcommit = False
            while not (ticket == self._serving and self._fits(n)):
                timeout = None
                if self._stall_timeout_s is not None and ticket == self._serving:
                    timeout = progress_at + self._stall_timeout_s - self._clock()
                    if timeout <= 0:
                        overcommit = True
                        break
                self._cond.wait(timeout)
                if self._releases != seen or self._uploading:
                    seen, progress_at = self._releases, self._clock()
            self._take(n)
        self._metrics.inc("upload_budget_wait_s", self._clock() - started)
        if overcommit:
            self._metrics.inc("upload_budget_overcommit_total")
            log.warning("write budget (%s) stalled for %.0fs with no upload finishing; "
                        "letting %s in over the limit", _fmt_bytes(self.limit_bytes),
                        self._stall_timeout_s, _fmt_bytes(n))

    def _take(self, n: int) -> None:  # caller holds _cond
        self._used += n
        self._peak = max(self._peak, self._used)
        self._serving += 1
        self._cond.notify_all()

    def handed_off(self, n: int) -> None:
        """``n`` held bytes now belong to a part being uploaded (they will come back alone)."""
        with self._cond:
            self._uploading += n

    def release(self, n: int, *, uploaded: bool = False) -> None:
        """Give ``n`` bytes back (``uploaded``: they had been ``handed_off``). Never blocks
        for long: called on the event loop too."""
        if n == 0:
            return
        with self._cond:
            if n > self._used:
                raise AssertionError(f"releasing {n} bytes of budget, {self._used} held")
            self._used -= n
            if uploaded:
                self._uploading -= n
            self._releases += 1
            self._cond.notify_all()


# ---- sequential upload ----------------------------------------------------------------------


def _close_buffer(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:
        # A view of it is still alive somewhere (e.g. a finished request object); the memory
        # is returned when that view is collected.
        pass


class SequentialUpload:
    """One object written front to back from FUSE worker threads (see the module docstring).

    Guarded by ``_order`` (held by writers, ``finish``, ``abort``; never by the loop):
    ``_written`` (bytes accepted), ``_part_no`` (number of the part being filled),
    ``_buf``/``_buf_len``/``_reserved`` (that part's mmap, bytes in it, budget held for it),
    ``_shipped`` (whether any part left), ``_closed`` (None while open, else why),
    ``_result`` (the ObjectInfo once finished), ``_spool`` (the local copy, owned by this
    upload until ``spill`` hands it over or the upload ends), ``_spool_mode``,
    ``_spooled_until`` (bytes [0, n) of the object are in the spool or the part buffer).
    Guarded by ``_state`` (short sections, writer threads and the loop): ``_inflight`` (parts
    submitted and not yet ended), ``_etags`` (part number -> ETag), ``_error`` (the first
    failure, latched), ``_upload_id``.
    Owned by the loop thread: ``_create_task``, ``_abort_task``, ``_tasks`` (running parts).
    """

    def __init__(self, store: ObjectStore, loop: EventLoopThread, key: str, *,
                 budget: WriteBudget, schedule: PartSchedule | None = None,
                 concurrency: int = 4, metrics: Metrics | None = None,
                 metadata: Mapping[str, str] | None = None,
                 part_slots: asyncio.Semaphore | None = None,
                 reorder_wait_s: float = 0.05, spool: StagedFile | None = None,
                 spool_floor_bytes: int = 0,
                 free_bytes: Callable[[str], int] = statvfs_free_bytes) -> None:
        if concurrency < 1:
            raise ConfigError(f"upload concurrency must be >= 1, not {concurrency}")
        self.key = key
        self._store = store
        self._loop = loop
        self._budget = budget
        self._schedule = schedule or PartSchedule()
        self._concurrency = concurrency
        self._metrics = metrics or Metrics()
        self._metadata = dict(metadata or {})
        self._part_slots = part_slots
        self._reorder_wait_s = reorder_wait_s

        self._order = threading.Condition()
        self._written = 0
        self._part_no = 1
        self._buf: mmap.mmap | None = None
        self._buf_len = 0
        self._reserved = 0
        self._shipped = False
        self._closed: str | None = None
        self._result: ObjectInfo | None = None
        self._spool = spool
        # "mapped": part buffers are mappings of the spool; "copied": parts are copied into it
        # when they ship; "lost": given up from ``_spooled_until`` on; None: no spool.
        self._spool_mode: str | None = "mapped" if spool is not None else None
        self._spooled_until = 0
        self._spool_floor_bytes = spool_floor_bytes
        self._free_bytes = free_bytes

        self._state = threading.Condition()
        self._inflight = 0
        self._etags: dict[int, str] = {}
        self._error: BaseException | None = None
        self._upload_id: str | None = None

        self._create_task: asyncio.Future[str] | None = None
        self._abort_task: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- public API (worker threads; all BLOCK) ----------------------------------------------

    @property
    def written(self) -> int:
        """Bytes accepted so far (the offset the next write must have)."""
        return self._written

    @property
    def multipart_started(self) -> bool:
        return self._shipped

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` at ``offset`` (== ``written``); return its length. BLOCKS while the
        budget is exhausted or ``concurrency`` parts are in flight. Raises ``NotSequential``
        (nothing written) or ``UploadFailed`` (latched failure)."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        with self._order:
            self._check_open()
            if offset > self._written and self._reorder_wait_s > 0:
                # Possibly the write before this one is still on its way from another thread.
                deadline = time.monotonic() + self._reorder_wait_s
                while offset > self._written and self._closed is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._order.wait(remaining)
                self._check_open()
            if offset != self._written:
                self._metrics.inc("upload_not_sequential_total")
                raise NotSequential(offset, self._written)
            self._raise_if_failed()
            pos = 0
            try:
                while pos < n:
                    if self._buf is None:
                        self._start_part()
                    assert self._buf is not None
                    take = min(n - pos, self._reserved - self._buf_len)
                    self._buf[self._buf_len:self._buf_len + take] = view[pos:pos + take]
                    self._buf_len += take
                    self._written += take
                    pos += take
                    if self._buf_len == self._reserved:
                        self._ship()
            finally:
                self._order.notify_all()
        return n

    def finish(self) -> ObjectInfo:
        """Upload what is left, wait for every part, complete; return the new object.
        Idempotent once it succeeded. Raises ``UploadFailed`` (nothing published)."""
        with self._order:
            if self._result is not None:
                return self._result
            self._check_open()
            try:
                if not self._shipped:
                    info = self._single_put()
                else:
                    if self._buf is not None:
                        self._ship()
                    self._wait_drained()
                    self._raise_if_failed()
                    info = self._loop.run(self._complete())
                    self._metrics.inc("upload_multipart_total")
            except BaseException as exc:
                raise self._fail(exc) from exc
            self._result = info
            self._closed = "finished"
            self._close_spool()
            self._order.notify_all()
        self._metrics.inc("upload_completed_total")
        return info

    def set_metadata(self, metadata: Mapping[str, str]) -> bool:
        """Replace the object's user metadata (chmod/chown/utimens while writing). True if it
        will be the published metadata; False once the multipart upload was created with the
        old one (the caller then updates the object after ``finish``)."""
        with self._order:
            if dict(metadata) == self._metadata:
                return True
            if self._shipped:
                return False
            self._metadata = dict(metadata)
            return True

    def abort(self) -> None:
        """Cancel: drop buffered bytes, stop parts in flight, abort the multipart upload.
        Nothing is published. A no-op once finished, failed or aborted."""
        with self._order:
            if self._closed is not None:
                return
            self._latch(UploadCancelled(f"upload of {self.key} was cancelled"))
            self._metrics.inc("upload_cancelled_total")
            self._shutdown("cancelled")

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of what was written so far (short at its end), from the
        local copy. Raises ``LocalCopyLost`` (ENOSPC) if they were not kept."""
        with self._order:
            end = min(offset + size, self._written)
            if offset >= end:
                return b""
            if self._spool_mode is None or end > self._spooled_until:
                raise LocalCopyLost(f"{self.key}: the local copy of this file being written was "
                                    f"given up (cache disk full), so it cannot be read back "
                                    f"before it is closed")
            assert self._spool is not None
            buf_start = self._written - self._buf_len
            if self._buf is None or self._spool_mode == "mapped" or end <= buf_start:
                return self._spool.pread(offset, end - offset)
            # "copied": the part being filled is only in memory.
            head = self._spool.pread(offset, buf_start - offset) if offset < buf_start else b""
            lo = max(offset, buf_start) - buf_start
            return head + bytes(self._buf[lo:end - buf_start])

    def spill(self) -> StagedFile:
        """Turn this upload into a staged file holding everything written so far, and close
        it (the fallback after ``NotSequential``, a truncate or an unlink). Parts already
        uploaded are discarded: the multipart upload is aborted, nothing is published, nothing
        is downloaded. Raises ``LocalCopyLost`` (the upload then fails: nothing will be
        published) if the local copy was given up, ``UploadFailed`` if it had failed."""
        with self._order:
            self._check_open()
            self._raise_if_failed()
            if self._spool_mode is None or self._spooled_until < self._written:
                err = LocalCopyLost(f"{self.key}: cannot rewrite this file out of order: its "
                                    f"local copy was given up (cache disk full) and parts of "
                                    f"it were already uploaded")
                self._latch(err)
                self._shutdown("failed")
                raise err
            spool = self._spool
            assert spool is not None
            if self._buf is not None and self._spool_mode == "copied":
                with memoryview(self._buf) as mv, mv[:self._buf_len] as tail:
                    spool.pwrite(self._written - self._buf_len, tail)
            self._spool = None  # handed over: _shutdown must not close it
            if self._shipped:
                self._latch(UploadCancelled(f"upload of {self.key} was turned into a staged "
                                            f"file"))
                self._shutdown("spilled")
            else:
                self._release_buffer()
                self._closed = "spilled"
                self._order.notify_all()
            spool.truncate(self._written)
        self._metrics.inc("upload_spilled_total")
        return spool

    # ---- writer-side helpers (caller holds _order) -------------------------------------------

    def _check_open(self) -> None:
        if self._closed is None:
            return
        if self._closed == "finished" or self._closed == "spilled":
            raise InvalidArgument(f"upload of {self.key} is already {self._closed}")
        self._raise_if_failed()
        raise UploadFailed(f"upload of {self.key} is {self._closed}")

    def _raise_if_failed(self) -> None:
        with self._state:
            err = self._error
        if err is None:
            return
        if isinstance(err, UploadFailed):
            raise UploadFailed(str(err), errno_value=err.errno) from err
        raise UploadFailed(f"upload of {self.key} failed: {err}") from err

    def _start_part(self) -> None:
        if self._part_no > self._schedule.max_parts:
            err = UploadFailed(f"{self.key}: larger than the part schedule allows "
                               f"({_fmt_bytes(self._schedule.max_object_bytes)})",
                               errno_value=errno.EFBIG)
            self._latch(err)
            raise err
        size = self._schedule.part_bytes(self._part_no)
        self._budget.acquire(size)
        self._reserved = size
        try:
            self._buf = self._part_buffer(self._written, size)
        except BaseException:
            self._budget.release(size)
            self._reserved = 0
            raise
        self._buf_len = 0
        try:
            self._raise_if_failed()  # the upload may have failed while we waited for budget
        except UploadFailed:
            self._release_buffer()
            raise

    def _part_buffer(self, start: int, size: int) -> mmap.mmap:
        """The buffer of a part starting at ``start``: a mapping of the spool where that
        works, else anonymous memory (copied into the spool at ship, or not spooled)."""
        if self._spool_mode in ("mapped", "copied"):
            assert self._spool is not None
            if not self._spool_has_room(size):
                self._lose_spool(start, "the cache disk is at its free-space floor")
            elif self._spool_mode == "mapped":
                try:
                    buf = self._spool.map_range(start, size)
                    self._spooled_until = start + size
                    return buf
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        self._lose_spool(start, "the cache disk is full")
                    else:  # no preallocation here (EOPNOTSUPP...): copy parts instead
                        self._spool_mode = "copied"
        if self._spool_mode == "copied":
            self._spooled_until = start + size  # the tail is in memory until it ships
        return mmap.mmap(-1, size)

    def _spool_has_room(self, size: int) -> bool:
        assert self._spool is not None
        try:
            return self._free_bytes(self._spool.directory) - size >= self._spool_floor_bytes
        except OSError:
            return False

    def _lose_spool(self, start: int, why: str) -> None:
        log.warning("%s: not keeping a local copy past %s while it uploads: %s (reading it "
                    "back or rewriting it out of order before close is ENOSPC now)",
                    self.key, _fmt_bytes(start), why)
        self._metrics.inc("upload_spool_lost_total")
        self._spool_mode = "lost"
        self._spooled_until = start

    def _release_buffer(self) -> None:
        if self._buf is not None:
            _close_buffer(self._buf)
            self._buf = None
            self._buf_len = 0
        if self._reserved:
            self._budget.release(self._reserved)
            self._reserved = 0

    def _ship(self) -> None:
        """Hand the part being filled to the loop. BLOCKS for an in-flight slot."""
        buf, length, reserved, number = self._buf, self._buf_len, self._reserved, self._part_no
        assert buf is not None and length > 0
        if self._spool_mode == "copied":
            assert self._spool is not None
            start = self._written - length
            try:
                with memoryview(buf) as mv, mv[:length] as part:
                    self._spool.pwrite(start, part)
            except OSError as exc:
                self._lose_spool(start, f"writing it failed ({exc.strerror or exc})")
        with self._state:
            while self._inflight >= self._concurrency and self._error is None:
                self._state.wait()
            failed = self._error is not None
            if not failed:
                self._inflight += 1
        if failed:
            self._release_buffer()
            self._raise_if_failed()
        # From here the part (buffer and reservation) belongs to its coroutine.
        self._buf, self._buf_len, self._reserved = None, 0, 0
        self._part_no += 1
        self._shipped = True
        self._budget.handed_off(reserved)
        self._metrics.inc("upload_parts_inflight")
        self._loop.submit(self._upload_part(number, buf, length, reserved))

    def _wait_drained(self) -> None:
        with self._state:
            while self._inflight > 0:
                self._state.wait()

    def _single_put(self) -> ObjectInfo:
        try:
            if self._buf is None:
                body: memoryview | bytes = b""
                info = self._loop.run(self._store.put_object(self.key, body, self._metadata))
            else:
                with memoryview(self._buf) as mv, mv[:self._buf_len] as body:
                    info = self._loop.run(self._store.put_object(self.key, body,
                                                                 self._metadata))
        finally:
            self._release_buffer()
        self._metrics.inc("upload_single_put_total")
        self._metrics.inc("upload_bytes", info.size)
        return info

    def _latch(self, err: BaseException) -> bool:
        """Record the first failure; True if this one was the first."""
        with self._state:
            if self._error is not None:
                return False
            self._error = err
            self._state.notify_all()
        if not isinstance(err, UploadCancelled):
            self._metrics.inc("upload_failed_total")
            log.error("upload of %s failed: %s", self.key, err)
        return True

    def _fail(self, exc: BaseException) -> UploadFailed:
        """The failure path of ``finish``: latch, abort remotely, free; the error to raise."""
        self._latch(exc)
        self._shutdown("failed")
        with self._state:
            first = self._error
        if isinstance(first, UploadFailed):
            return UploadFailed(str(first), errno_value=first.errno)
        return UploadFailed(f"upload of {self.key} failed: {first}")

    def _shutdown(self, why: str) -> None:
        """Stop everything after a failure or a cancel; leave no multipart upload behind."""
        self._closed = why
        try:
            self._loop.run(self._ensure_aborted())
        except Exception:  # noqa: BLE001 - logged and counted by _abort_remote
            pass
        finally:
            self._release_buffer()
            self._wait_drained()
            self._close_spool()
            self._order.notify_all()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # ---- loop side ---------------------------------------------------------------------------

    async def _upload_part(self, number: int, buf: mmap.mmap, length: int,
                           reserved: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            with self._state:
                failed = self._error is not None
            if failed:
                return  # failed or cancelled before this part started: do not send it
            if self._part_slots is not None:
                async with self._part_slots:
                    await self._send_part(number, buf, length)
            else:
                await self._send_part(number, buf, length)
        except BaseException as exc:  # noqa: BLE001 - latched; CancelledError included
            if self._latch(exc if not isinstance(exc, asyncio.CancelledError)
                           else UploadCancelled(f"part {number} of {self.key} was cancelled")):
                # First failure: stop the other parts and abort the upload now rather than
                # at finish(), so nothing is left open even if finish() never comes.
                for other in list(self._tasks):
                    if other is not task:
                        other.cancel()
                if self._abort_task is None:
                    self._abort_task = asyncio.ensure_future(self._abort_remote())
                    # Its failure is logged there and retried by finish(); mark it retrieved.
                    self._abort_task.add_done_callback(
                        lambda t: t.cancelled() or t.exception())
        finally:
            self._tasks.discard(task)
            _close_buffer(buf)
            self._budget.release(reserved, uploaded=True)
            with self._state:
                self._inflight -= 1
                self._state.notify_all()
            self._metrics.inc("upload_parts_inflight", -1)

    async def _send_part(self, number: int, buf: mmap.mmap, length: int) -> None:
        upload_id = await self._ensure_upload_id()
        with memoryview(buf) as mv, mv[:length] as body:
            etag = await self._store.upload_part(self.key, upload_id, number, body)
        with self._state:
            self._etags[number] = etag
        self._metrics.inc("upload_parts_total")
        self._metrics.inc("upload_bytes", length)

    async def _ensure_upload_id(self) -> str:
        if self._create_task is None:
            self._create_task = asyncio.ensure_future(self._create())
        # Shielded: a cancelled part must not cancel the creation (its id is needed to abort).
        return await asyncio.shield(self._create_task)

    async def _create(self) -> str:
        upload_id = await self._store.create_multipart(self.key, self._metadata)
        with self._state:
            self._upload_id = upload_id
        return upload_id

    async def _settled_upload_id(self) -> str | None:
        if self._create_task is not None:
            await asyncio.gather(self._create_task, return_exceptions=True)
        with self._state:
            return self._upload_id

    async def _complete(self) -> ObjectInfo:
        upload_id = await self._settled_upload_id()
        if upload_id is None:
            raise UploadFailed(f"upload of {self.key}: no multipart upload was created")
        with self._state:
            parts = sorted(self._etags.items())
        return await self._store.complete_multipart(self.key, upload_id, parts,
                                                    size=self._written)

    async def _ensure_aborted(self) -> None:
        """Cancel running parts and make sure the multipart upload (if any) is aborted: reuse
        the abort a failing part started, or try again if that one failed."""
        for task in list(self._tasks):
            task.cancel()
        if self._abort_task is not None:
            results = await asyncio.gather(self._abort_task, return_exceptions=True)
            if not isinstance(results[0], BaseException):
                return
        self._abort_task = asyncio.ensure_future(self._abort_remote())
        await self._abort_task

    async def _abort_remote(self) -> None:
        """Wait out the running parts, then abort the multipart upload if one exists."""
        running = [t for t in self._tasks if t is not asyncio.current_task()]
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        upload_id = await self._settled_upload_id()
        if upload_id is None:
            return
        try:
            await self._store.abort_multipart(self.key, upload_id)
        except Exception as exc:
            self._metrics.inc("upload_abort_failures_total")
            log.error("could not abort the multipart upload of %s (%s): %s", self.key,
                      upload_id, exc)
            raise


# ---- staged file (non-sequential fallback) --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UploadSettings:
    """What every upload of a mount shares: the store and loop, the memory budget, the part
    schedule, how many parts of one file are in flight, the metrics, an optional cap on
    parts in flight across all uploads, and where local copies live (``staging_dir``, kept
    above ``spool_floor_bytes`` of free space). Staged files upload through the same
    settings."""

    store: ObjectStore
    loop: EventLoopThread
    budget: WriteBudget
    schedule: PartSchedule = dataclasses.field(default_factory=PartSchedule)
    concurrency: int = 4
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    part_slots: asyncio.Semaphore | None = None
    staging_dir: str | None = None
    spool_floor_bytes: int = 0
    free_bytes: Callable[[str], int] = statvfs_free_bytes

    def upload(self, key: str, metadata: Mapping[str, str] | None = None, *,
               reorder_wait_s: float = 0.05, spooled: bool = False) -> SequentialUpload:
        """A sequential upload; ``spooled``: with a local copy in ``staging_dir`` (readable
        while it streams, turned into a staged file by ``spill``)."""
        spool = None
        if spooled:
            if self.staging_dir is None:
                raise ConfigError("a spooled upload needs a staging dir")
            spool = StagedFile(self.staging_dir, key, self, metadata=metadata)
        return SequentialUpload(self.store, self.loop, key, budget=self.budget,
                                schedule=self.schedule, concurrency=self.concurrency,
                                metrics=self.metrics, metadata=metadata,
                                part_slots=self.part_slots, reorder_wait_s=reorder_wait_s,
                                spool=spool, spool_floor_bytes=self.spool_floor_bytes,
                                free_bytes=self.free_bytes)


class StagedFile:
    """A file staged on local disk, uploaded whole when closed: the fallback for writes that
    are not sequential (seek back, overwrite of an existing object, append, truncate).

    The data lives in a sparse temp file under ``staging_dir`` whose name is unlinked at once:
    the open descriptor keeps it, and a crash leaves nothing behind. ``init_from`` fills it
    from an existing object (ranged GETs pinned to its ETag). ``upload`` streams it through a
    ``SequentialUpload`` (same schedule, budget, concurrency, failure latching and abort; one
    PUT when small), reading with ``os.pread`` a block at a time, then closes it.

    Thread-safe: every call holds ``_lock`` (guards ``_fd`` and ``_closed``), so a descriptor
    is never used after close (it could be another file's by then).
    """

    def __init__(self, staging_dir: str | os.PathLike[str], key: str, settings: UploadSettings,
                 *, metadata: Mapping[str, str] | None = None) -> None:
        self.key = key
        self._settings = settings
        self._store = settings.store
        self._loop = settings.loop
        self._metrics = settings.metrics
        self.metadata = dict(metadata or {})
        self.directory = str(staging_dir)
        self._lock = threading.Lock()
        fd, path = tempfile.mkstemp(prefix=".objfs-staged-", dir=Path(staging_dir))
        os.unlink(path)
        self._fd = fd
        self._closed = False
        self._metrics.inc("upload_staged_total")

    def _check(self) -> int:  # caller holds _lock
        if self._closed:
            raise InvalidArgument(f"staged file of {self.key} is closed")
        return self._fd

    @property
    def size(self) -> int:
        with self._lock:
            return os.fstat(self._check()).st_size

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        with self._lock:
            fd = self._check()
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], offset + done)
        return view.nbytes

    def pread(self, offset: int, size: int) -> bytes:
        with self._lock:
            return os.pread(self._check(), size, offset)

    def map_range(self, offset: int, size: int) -> mmap.mmap:
        """A shared writable mapping of bytes [offset, offset+size), allocated on disk first
        (``posix_fallocate``), so that writing it can never meet a full disk (which would be
        SIGBUS, not an error). ``offset`` must be a multiple of the page size. Raises OSError
        (ENOSPC; EOPNOTSUPP where the filesystem cannot preallocate)."""
        with self._lock:
            fd = self._check()
            if os.fstat(fd).st_size < offset + size:
                os.ftruncate(fd, offset + size)
            os.posix_fallocate(fd, offset, size)
            return mmap.mmap(fd, size, offset=offset)

    def truncate(self, size: int) -> None:
        if size < 0:
            raise InvalidArgument("negative size")
        with self._lock:
            os.ftruncate(self._check(), size)

    def init_from(self, info: ObjectInfo, *, chunk_bytes: int = 8 * MiB,
                  parallelism: int = 4) -> None:
        """Make the staged content that of the object version ``info`` (key, ETag, size).
        BLOCKS; raises StaleObject (ESTALE) if the object changes meanwhile."""
        pending: collections.deque[tuple[int, concurrent.futures.Future[bytearray]]] = \
            collections.deque()
        try:
            for start in range(0, info.size, chunk_bytes):
                end = min(start + chunk_bytes, info.size)
                pending.append((start, self._loop.submit(
                    self._store.get_range(info.key, info.etag, start, end))))
                if len(pending) >= parallelism:
                    self._land(*pending.popleft())
            while pending:
                self._land(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()
        self.truncate(info.size)

    def _land(self, start: int, future: concurrent.futures.Future[bytearray]) -> None:
        data = future.result()
        self.pwrite(start, data)
        self._metrics.inc("upload_staged_download_bytes", len(data))

    def upload(self, metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        """Upload the staged content as the object (one PUT if small, else multipart), then
        close. BLOCKS. Raises ``UploadFailed`` (nothing published)."""
        upload = self._settings.upload(
            self.key, self.metadata if metadata is None else metadata, reorder_wait_s=0)
        block_size = self._settings.schedule.block_size
        try:
            with self._lock:
                fd = self._check()
                size = os.fstat(fd).st_size
                pos = 0
                while pos < size:
                    chunk = os.pread(fd, min(block_size, size - pos), pos)
                    if not chunk:  # cannot happen while we hold the lock; never loop forever
                        raise UploadFailed(f"staged file of {self.key} shrank while uploading")
                    upload.write(pos, chunk)
                    pos += len(chunk)
            return upload.finish()
        except BaseException:
            upload.abort()
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Drop the staged data (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
