"""The local page cache: every read goes through 1 MiB pages of an object version on local disk.

States and transitions of one page (``PageState``)::

    MISSING --claim--> INFLIGHT --stored--> READY --evict/corrupt/drop--> MISSING
                         |  fetch failed, admission refused or disk error  ^
                         +-------------------------------------------------+

- A page is INFLIGHT while it has an entry in ``_inflight``: one ``concurrent.futures.Future``
  shared by every reader that wants it, so any number of concurrent readers cause one fetch.
  The future resolves with the page's bytes as soon as they arrive, before they are written to
  disk; readers never wait for the disk write. A failed fetch resolves it with the error, which
  every waiter raises, and the page is MISSING again.
- A page is READY when the eviction policy holds it (and its file and index entry exist). A hit
  is served by the FUSE worker thread itself: ``open`` + two ``os.pread`` (header, then only the
  128 KiB chunks asked for) + checksum. It never touches the event loop. A file that is gone or
  does not verify is a miss: the page is forgotten and refetched, never EIO.
- Missing runs are coalesced into ranged GETs of up to ``request_pages`` pages, issued on the
  event loop through the source chain. Writing pages to disk happens on a small writer pool,
  off the loop.
- Fetch slots are a ``cache.limits.PriorityGate`` of ``parallelism`` slots: demand reads go
  before readahead, readahead before preload, and the less urgent kinds leave slots free for
  demand reads. A reader that starts waiting on a queued readahead run promotes it.
- Sequential readers claim a readahead window beyond the pages they asked for
  (``cache.readahead.ReadStream``); those fetches run in the background.

In a cluster (``extent_pages`` set, a peer source in the chain): runs are also cut at extent
boundaries (``cache.ring.split_at_extents``) so each run has one owner. A run owned by another
member waits for a slot of a second gate (``_peer_gate``) and asks that owner; on a miss it
gives that slot back and takes an origin slot. Origin slots are only ever held by origin GETs,
so two members asking each other can never hold all of each other's slots (no deadlock).
The owner side is ``claim_for_peer``/``pages_for_peer``: READY pages are handed out as open
page files (sent with sendfile by ``cache.peer``), missing ones are claimed in this cache's
own single-flight ``_inflight`` state and fetched from the origin only (an owner never
forwards). Eviction is replica-aware (``cache.policy``): ``owns(page id)`` says which pages
this host owns; a membership change reclassifies in the maintenance thread.

Capacity: ``capacity_bytes`` counts page files including headers; the policy admits a page only
after evicting enough, so usage never exceeds capacity beyond pages in flight (which are in
memory, not on disk). A free-space floor on the cache filesystem lowers the effective capacity
when the disk is shared and filling up. Disk trouble (ENOSPC, EIO, unwritable dir) degrades to
read-through: the bytes still reach the reader from memory, the page is not kept, a counter
rises and a warning is logged at most once a minute.

Persistence: page files live in ``DIR/data/XX/<page id hex>``; the LMDB index
(``cache.index``) lists them with their last use. Start-up loads the index (no directory walk);
a background pass then removes orphan files (written but never indexed, or temp files of a
crash). An indexed page whose file vanished is found on first read and refetched.

Locks: ``_lock`` guards the in-memory state; ``OpenPageFiles`` has its own, taken inside or
outside ``_lock`` but never around anything else. Neither is ever held across file I/O (an
``open``, a ``statvfs``), an LMDB transaction, the event loop or a future wait: the FUSE
adapter serves hits holding llfuse's global lock, so anything a hit may wait for must never
wait for the disk. A hit (``read_if_ready``) reads only through descriptors already open and
only bytes already in memory (``RWF_NOWAIT``); anything else is left to ``read``, which runs
with llfuse's lock released. Stored pages get their index entries outside ``_lock`` and go
READY under it afterwards (``_persist``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import enum
import errno
import logging
import os
import resource
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lmdb

from objfs.cache.format import (CHUNK_SIZE, HEADER_SIZE, CorruptPage, PageHeader,
                                decode_header, encode_header, verify_chunks)
from objfs.cache.index import PageIndex
from objfs.cache.limits import Priority, PriorityGate, Ticket
from objfs.cache.pages import (PAGE_SIZE, ObjectVersion, coalesce, page_id, page_span,
                               version_digest)
from objfs.cache.policy import EvictionPolicy, make_policy
from objfs.cache.readahead import ReadStream
from objfs.cache.ring import split_at_extents
from objfs.cache.sources import SourceChain
from objfs.errors import ObjfsError, OriginError
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics

log = logging.getLogger(__name__)

_WARN_INTERVAL_S = 60.0
_MAINTENANCE_INTERVAL_S = 2.0
# Verified headers of READY pages, so a hit costs one pread of the chunks it returns (their
# checksums still verified) instead of two preads and a header parse: ~45 of ~110 µs.
# A page's bytes never change (its id names version and index), so an entry stays valid
# while the page exists; it is dropped when the page goes.
_HEADER_CACHE_ENTRIES = 16384


def open_page_files_budget(floor: int = 256, ceiling: int = 16384) -> int:
    """How many page files to keep open between hits: half of the descriptors the process
    may open (the daemon raises its soft RLIMIT_NOFILE to the hard limit at start), between
    ``floor`` and ``ceiling`` (16 GiB of pages). A random reader of a file that is larger
    than this working set pays an ``open`` per page it touches: with 256 descriptors that was
    a fifth of a random hit's CPU on a 1 GiB file."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return floor
    if soft == resource.RLIM_INFINITY:
        return ceiling
    return max(floor, min(ceiling, (soft - 1024) // 2))
_SCRATCH_BYTES = 128 * 1024 + CHUNK_SIZE  # per reader thread: a read up to 128 KiB, unaligned


def _page_pieces(version: ObjectVersion, span: range, ids: list[bytes], offset: int,
                 size: int) -> Iterator[tuple[int, bytes, int, int]]:
    """(index, page id, lo, hi) for each page of ``span``: the bytes [lo, hi) of that page
    that the read [offset, offset+size) wants."""
    end = min(offset + size, version.size)
    for index, pid in zip(span, ids):
        base = index * PAGE_SIZE
        yield index, pid, max(offset, base) - base, min(end, base + PAGE_SIZE) - base


class _WouldBlock(Exception):
    """A read that must not wait would have to (``read_if_ready``)."""


class _OpenPageFile:
    __slots__ = ("fd", "users", "retired")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.retired = False


class OpenPageFiles:
    """Descriptors of READY page files kept open between reads.

    An ``open`` and a ``close`` per hit were a quarter of a 4 KiB hit's CPU. A descriptor is
    closed only once no read uses it (``users``): ``retire`` (the page's file was removed)
    closes it at once if idle, else when its last reader gives it back; the LRU bound closes
    idle ones. ``borrow`` opens a file outside the lock (an ``open`` can wait for the disk,
    and a hit that needs no open must never wait behind one) and keeps it only if it still
    has a name (``st_nlink``, checked under the lock): removals retire after unlinking, so
    a descriptor of a removed file is never kept (it would pin the file's disk space).
    Content is immutable per page id, so a descriptor is never "of an older version".
    """

    def __init__(self, capacity: int) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[bytes, _OpenPageFile] = OrderedDict()  # guarded by _lock
        self._capacity = capacity

    def borrow(self, pid: bytes, path: str, *, open_file: bool = True) -> _OpenPageFile | None:
        """The open file of ``pid`` (opening ``path`` if needed and ``open_file``), held
        until ``give_back``; None if it is not open and ``open_file`` is False. Raises what
        ``os.open`` raises (FileNotFoundError for a file removed meanwhile)."""
        idle: list[int] = []
        with self._lock:
            entry = self._open.get(pid)
            if entry is not None:
                self._open.move_to_end(pid)
                entry.users += 1  # before trimming: the entry is in use from here on
                if len(self._open) > self._capacity:
                    idle = self._trim_locked()
        if entry is None:
            if not open_file:
                return None
            entry = self._open_and_keep(pid, path)
        for fd in idle:
            os.close(fd)
        return entry

    def _open_and_keep(self, pid: bytes, path: str) -> _OpenPageFile:
        fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # may wait: no lock held
        idle: list[int] = []
        try:
            with self._lock:
                entry = self._open.get(pid)
                if entry is None:
                    if os.fstat(fd).st_nlink == 0:  # removed after our open: not kept
                        raise FileNotFoundError(path)
                    entry = self._open[pid] = _OpenPageFile(fd)
                    fd = None
                else:  # opened by another reader meanwhile
                    self._open.move_to_end(pid)
                entry.users += 1
                if len(self._open) > self._capacity:
                    idle = self._trim_locked()
        finally:
            if fd is not None:
                os.close(fd)
        for old in idle:
            os.close(old)
        return entry

    def give_back(self, entry: _OpenPageFile) -> None:
        idle: list[int] = []
        with self._lock:
            entry.users -= 1
            if entry.retired:
                if entry.users == 0:
                    idle.append(entry.fd)
            elif len(self._open) > self._capacity:  # all were in use at the last borrow
                idle = self._trim_locked()
        for fd in idle:
            os.close(fd)

    def retire(self, pids: list[bytes]) -> None:
        """The files of ``pids`` were removed: close their descriptors (once idle)."""
        idle: list[int] = []
        with self._lock:
            for pid in pids:
                entry = self._open.pop(pid, None)
                if entry is not None:
                    entry.retired = True
                    if entry.users == 0:
                        idle.append(entry.fd)
        for fd in idle:
            os.close(fd)

    def close_all(self) -> None:
        with self._lock:
            pids = list(self._open)
        self.retire(pids)

    def __len__(self) -> int:
        return len(self._open)

    def _trim_locked(self) -> list[int]:
        """Drop the least recently used idle descriptors down to the capacity; returns them
        to close outside the lock. Walks from the LRU end only as far as it needs to (a
        copy of the whole table per hit was a tenth of a random hit's CPU)."""
        excess = len(self._open) - self._capacity
        victims: list[bytes] = []
        for pid, entry in self._open.items():
            if len(victims) >= excess:
                break
            if entry.users == 0:
                victims.append(pid)
        idle: list[int] = []
        for pid in victims:
            entry = self._open.pop(pid)
            entry.retired = True
            idle.append(entry.fd)
        return idle


class PageState(enum.Enum):
    MISSING = "missing"
    INFLIGHT = "inflight"
    READY = "ready"


class ServedPage:
    """One page of a peer request (``PageCache.claim_for_peer``): either an open READY page
    file (``file``: send ``HEADER_SIZE + length`` bytes of it, then ``give_back``) or the
    page's bytes (``data``, once its fetch is done; ``future`` until then)."""

    __slots__ = ("index", "length", "file", "future", "data")

    def __init__(self, index: int, length: int, file: _OpenPageFile | None = None,
                 future: Future | None = None) -> None:
        self.index = index
        self.length = length
        self.file = file
        self.future = future
        self.data: memoryview | bytes | None = None


async def _shared_result(fut: Future, timeout: float) -> object:
    """Await a ``concurrent.futures.Future`` that other threads share, without ever
    cancelling it (``asyncio.wrap_future`` cancels the source when the waiter is cancelled:
    a peer hanging up would fail every local reader of that page)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def done(f: Future) -> None:
        try:
            loop.call_soon_threadsafe(
                lambda: None if waiter.done() else waiter.set_result(None))
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    fut.add_done_callback(done)
    await asyncio.wait_for(asyncio.shield(waiter), timeout)
    return fut.result()


def statvfs_free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class PageCache:
    """Thread-safe. Fields under ``_lock``: ``_inflight``, ``_policy``, ``_touched``, ``_seq``,
    ``_free_estimate``, ``_pins``. The event-loop thread runs fetches; writer threads persist
    pages; the maintenance thread flushes last-use order, reconciles files and reclassifies
    pages after a membership change."""

    def __init__(self, directory: Path, sources: SourceChain, loop: EventLoopThread, *,
                 metrics: Metrics, capacity_bytes: int, policy: str = "lru",
                 free_floor_bytes: int = 0, request_pages: int = 8, parallelism: int = 8,
                 max_window_pages: int = 32, writer_threads: int = 2,
                 fetch_timeout_s: float = 300.0, unkept_pages: int = 64,
                 fresh_bytes: int | None = None, whole_object_bytes: int = 0,
                 free_bytes: Callable[[Path], int] = statvfs_free_bytes,
                 clock: Callable[[], float] = time.monotonic,
                 background: bool = True, extent_pages: int | None = None,
                 owns: Callable[[bytes], bool] | None = None) -> None:
        if request_pages < 1 or parallelism < 1 or max_window_pages < 1:
            raise ValueError("request pages, parallelism and readahead must be >= 1")
        self.directory = directory
        self._pages_dir = directory / "data"
        self._pages_dir.mkdir(parents=True, exist_ok=True)
        self._pages_dir_text = str(self._pages_dir)
        self._sources = sources
        self._loop = loop
        self._metrics = metrics
        self._request_pages = request_pages
        if extent_pages is not None and extent_pages < 1:
            raise ValueError("extent pages must be >= 1")
        self._extent_pages = extent_pages  # cut runs at these boundaries (one owner per run)
        self._gate = PriorityGate(parallelism)  # origin fetch slots; used on the loop only
        # Slots of runs asking a peer (loop only); None without a cache source in the chain.
        self._peer_gate = PriorityGate(parallelism) if sources.has_cache_sources else None
        # Tickets of runs not finished yet, by page id, to promote them when a more urgent
        # reader waits on their pages. Guarded by _tickets_lock (never held across anything,
        # so the loop may take it).
        self._tickets: dict[bytes, Ticket] = {}
        self._tickets_lock = threading.Lock()
        self._owns = owns  # page id -> owned by this host; None: every page is (no cluster)
        self._reclassify_due = threading.Event()
        self.max_window_pages = max_window_pages
        self._fetch_timeout_s = fetch_timeout_s
        self._free_bytes = free_bytes
        self._clock = clock
        self.capacity_bytes = capacity_bytes
        self.free_floor_bytes = free_floor_bytes

        self._lock = threading.Lock()
        self._inflight: dict[bytes, Future] = {}          # guarded by _lock
        self._policy: EvictionPolicy = make_policy(policy, capacity_bytes)  # guarded by _lock
        self._touched: dict[bytes, int] = {}              # guarded by _lock: last use to persist
        self._pins: dict[str, set[bytes]] = {}            # guarded by _lock: holder -> pages
        # Fetched pages the cache did not keep (refused by the policy, disk trouble): the
        # kernel asks for a page in 128 KiB pieces, so without these a read-through page
        # would be fetched once per piece. Bounded LRU of done futures.
        self._unkept: OrderedDict[bytes, Future] = OrderedDict()  # guarded by _lock
        self._unkept_pages = unkept_pages
        # Pages just fetched and stored, still in memory (views into their run's buffer):
        # a sequential reader reads them moments after readahead fetched them, and serving
        # them from here spares a page-file read and a checksum per 128 KiB. Bounded LRU of
        # ``_fresh_limit`` pages (64 MiB by default); a page evicted from the cache leaves it.
        self._fresh: OrderedDict[bytes, memoryview] = OrderedDict()  # guarded by _lock
        self._fresh_limit = 64 if fresh_bytes is None else fresh_bytes // PAGE_SIZE
        # A reader jumping around an object of at most this size gets the whole object
        # fetched in the background (0: never); versions already asked for, bounded.
        self.whole_object_bytes = whole_object_bytes
        self._whole_started: OrderedDict[bytes, None] = OrderedDict()  # guarded by _lock
        # Page files of READY pages a sequential reader is about to read: opened (kept open
        # for the hit path) and their bytes asked of the disk ahead (POSIX_FADV_WILLNEED).
        self._warmer = ThreadPoolExecutor(1, thread_name_prefix="objfs-cache-warm")
        self._headers: dict[bytes, PageHeader] = {}  # pid -> verified header; see above
        self._files = OpenPageFiles(open_page_files_budget())
        self._nowait_reads = hasattr(os, "RWF_NOWAIT")  # off if the kernel refuses it
        self._scratch = threading.local()  # .buf: a reader thread's chunk buffer
        # READY pages stored by readahead -> bytes of them not read yet (hit accounting)
        self._prefetched: dict[bytes, int] = {}           # guarded by _lock
        self._seq = 0                                     # guarded by _lock
        self._last_warning: dict[str, float] = {}         # guarded by _lock
        self._free_estimate = self._sample_free()         # guarded by _lock
        self._free_sampled_at = clock()                   # guarded by _lock

        self._index = PageIndex(directory / "index")
        self._load_index()
        self._writer = ThreadPoolExecutor(writer_threads, thread_name_prefix="objfs-cache-write")
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        metrics.gauge("cache_used_bytes", lambda: self._policy.used_bytes)
        metrics.gauge("cache_capacity_bytes", lambda: self.capacity_bytes)
        metrics.gauge("cache_pages_ready", lambda: len(self._policy))
        metrics.gauge("cache_pages_inflight", lambda: len(self._inflight))
        metrics.gauge("cache_pinned_bytes", lambda: self._policy.pinned_bytes)
        if owns is not None:
            metrics.gauge("cache_pages_copies", lambda: self._policy.copies)
        if background:
            self._maintenance = threading.Thread(target=self._maintain,
                                                 name="objfs-cache-maint", daemon=True)
            self._maintenance.start()

    @property
    def policy_name(self) -> str:
        return self._policy.name

    @property
    def used_bytes(self) -> int:
        return self._policy.used_bytes

    # ---- start-up and shutdown -------------------------------------------------------------

    def _load_index(self) -> None:
        started = time.monotonic()
        entries = sorted(self._index.entries(), key=lambda e: e[2])
        victims: list[Hashable] = []
        for pid, size, seq in entries:
            victims.extend(self._policy.load(pid, size, self._owned(pid)))
            self._seq = max(self._seq, seq)
        if victims:  # the capacity was lowered since the last run
            self._remove_pages([bytes(v) for v in victims])
        log.info("page cache %s: %d pages, %.1f MiB of %.1f MiB (%s), index loaded in %.2fs",
                 self.directory, len(self._policy), self._policy.used_bytes / 2**20,
                 self.capacity_bytes / 2**20, self._policy.name, time.monotonic() - started)

    def close(self) -> None:
        self._stop.set()
        self._warmer.shutdown(wait=True, cancel_futures=True)
        if self._maintenance is not None:
            self._maintenance.join(timeout=10)
        self._writer.shutdown(wait=True)
        self._flush_touched()
        self._index.close()
        self._files.close_all()

    def _maintain(self) -> None:
        try:
            self.reconcile()
        except Exception:
            log.exception("page cache reconcile failed")
        while not self._stop.wait(_MAINTENANCE_INTERVAL_S):
            try:
                self._flush_touched()
                if self._reclassify_due.is_set():
                    self.reclassify()
            except Exception:
                log.exception("page cache maintenance failed")

    # ---- ownership (cluster) ---------------------------------------------------------------

    def _owned(self, pid: bytes) -> bool:
        owns = self._owns
        return True if owns is None else owns(pid)

    def set_owner_function(self, owns: Callable[[bytes], bool]) -> None:
        """The member list changed (``Membership.subscribe``; any thread): new pages are
        admitted under ``owns`` at once; resident ones are reclassified by the maintenance
        thread, off the read path (without one, e.g. in tests, call ``reclassify``)."""
        self._owns = owns
        self._reclassify_due.set()

    def reclassify(self, batch: int = 4096) -> int:
        """Sort resident pages into owned and copies under the current owner function;
        returns how many moved. The hashing runs outside the lock; the lock is taken per
        batch, so reads are never held up for long."""
        self._reclassify_due.clear()
        with self._lock:
            pages = [bytes(p) for p in self._policy.pages()]
        moved = 0
        for start in range(0, len(pages), batch):
            if self._stop.is_set():
                break
            part = [(pid, self._owned(pid)) for pid in pages[start:start + batch]]
            with self._lock:
                moved += self._policy.reclassify(part)
        if moved:
            log.info("page cache: the member list changed; %d pages changed owner class",
                     moved)
            self._metrics.inc("cache_pages_reclassified_total", moved)
        return moved

    def reconcile(self) -> int:
        """Remove page files that no index entry or fetch owns (crash leftovers). Returns how
        many were removed."""
        removed = 0
        try:
            subdirs = list(os.scandir(self._pages_dir))
        except OSError as exc:
            self._disk_error("scan", exc)
            return 0
        for sub in subdirs:
            if self._stop.is_set():
                break
            if not sub.is_dir(follow_symlinks=False):
                continue
            try:
                names = os.listdir(sub.path)
            except OSError:
                continue
            for name in names:
                try:
                    # "<40 hex>" or a temp file "<40 hex>.tmp<thread>" of a page being written
                    pid = bytes.fromhex(name[:40]) if len(name) >= 40 else None
                except ValueError:
                    pid = None
                if pid is not None:
                    with self._lock:
                        if pid in self._policy or pid in self._inflight:
                            continue
                try:
                    os.unlink(os.path.join(sub.path, name))
                    removed += 1
                except OSError:
                    pass
        if removed:
            log.info("page cache: removed %d orphan files", removed)
            self._metrics.inc("cache_orphans_removed_total", removed)
        return removed

    # ---- reading ---------------------------------------------------------------------------

    def new_stream(self) -> ReadStream:
        return ReadStream(self.max_window_pages)

    def state(self, version: ObjectVersion, index: int) -> PageState:
        pid = page_id(version, index)
        with self._lock:
            if pid in self._inflight:
                return PageState.INFLIGHT
            return PageState.READY if pid in self._policy else PageState.MISSING

    def read(self, version: ObjectVersion, offset: int, size: int,
             stream: ReadStream | None = None, *, zero_copy: bool = False) -> bytes:
        """Bytes [offset, offset+size) of ``version`` (short at its end). Blocks on misses.

        With ``zero_copy`` the result may be a memoryview of a buffer that this thread's
        next read reuses: for a caller that hands it on at once (the FUSE reply)."""
        span = page_span(offset, size, version.size)
        if not span:
            return b""
        window = stream.observe(offset, size) if stream is not None else 1
        ids = [page_id(version, i) for i in span]
        waits: dict[int, Future] = {}
        fresh: dict[int, memoryview] = {}
        claimed: list[tuple[int, Future]] = []
        ahead: list[tuple[int, Future]] = []
        joined: list[bytes] = []  # pages someone else is fetching: maybe less urgently
        with self._lock:
            for index, pid in zip(span, ids):
                fut = self._inflight.get(pid)
                if fut is None and (page := self._fresh.get(pid)) is not None:
                    fresh[index] = page
                    self._fresh.move_to_end(pid)
                    self._touch_locked(pid)
                    continue
                if fut is None and pid not in self._policy:
                    fut = self._unkept.get(pid)
                    if fut is not None:
                        self._unkept.move_to_end(pid)
                    else:
                        fut = self._inflight[pid] = Future()
                        claimed.append((index, fut))
                elif fut is not None:
                    joined.append(pid)
                if fut is not None:
                    waits[index] = fut
            warm: list[bytes] = []
            if stream is not None and window > len(span):
                ahead, warm = self._claim_readahead_locked(version, span, window, stream)
        if claimed:
            self._start_fetches(version, claimed)
            if stream is not None and stream.jumps >= 2:
                self._fetch_whole(version)
        if joined:
            self._promote(joined, Priority.DEMAND)
        self._start_readahead(version, ahead, warm)
        view = zero_copy and len(span) == 1  # a scratch buffer serves one piece at a time
        pieces = [self._fresh_bytes(pid, fresh[index], lo, hi, view) if index in fresh else
                  self._page_bytes(version, index, pid, lo, hi, waits.get(index), view)
                  for index, pid, lo, hi in _page_pieces(version, span, ids, offset, size)]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _fetch_whole(self, version: ObjectVersion) -> None:
        """A reader that jumps around an object missed again: fetch all of it (if it is
        small enough next to the cache) in the background, at readahead priority, in large
        parallel runs, as s3fs does for every file. Random readers of a file they will read
        mostly whole (an index, a shard read out of order) then hit instead of paying a GET
        per page; demand reads still go first (they promote the run they wait for)."""
        if not 0 < version.size <= self.whole_object_bytes:
            return
        digest = version_digest(version)
        with self._lock:
            if digest in self._whole_started:
                return
            self._whole_started[digest] = None
            while len(self._whole_started) > 1024:
                self._whole_started.popitem(last=False)
        self._metrics.inc("readahead_whole_objects_total")
        self.fetch_pages(version, range(version.page_count()), priority=Priority.READAHEAD)

    def _fresh_bytes(self, pid: bytes, page: memoryview, lo: int, hi: int,
                     view: bool) -> bytes:
        with self._lock:
            prefetched = self._read_prefetched_locked(pid, hi - lo)
        self._count_hit(hi - lo, prefetched)
        self._metrics.inc("read_fresh_bytes", hi - lo)
        return page[lo:hi] if view else bytes(page[lo:hi])  # type: ignore[return-value]

    def _touch_locked(self, pid: bytes) -> None:
        """A use of a READY page (caller holds _lock): LRU order, last use, and the hit
        accounting of readahead."""
        self._policy.touch(pid)
        self._seq += 1
        self._touched[pid] = self._seq

    def read_if_ready(self, version: ObjectVersion, offset: int, size: int,
                      stream: ReadStream | None = None, *,
                      zero_copy: bool = False) -> bytes | None:
        """``read`` for when waiting is not allowed (the FUSE adapter calls it holding
        llfuse's lock, which saves two lock hand-offs per hit): the bytes if every page is
        READY and its data is in the kernel's page cache (``RWF_NOWAIT``), else None, having
        changed nothing but pages found damaged (now MISSING). Never waits for a fetch or
        the disk; the caller then uses ``read``."""
        if not self._nowait_reads:
            return None
        span = page_span(offset, size, version.size)
        if not span:
            return b""
        if len(span) == 1:
            data = self._read_one_if_ready(version, span.start, offset, size, zero_copy)
            if data is not None and stream is not None:
                self._observe(version, span, stream, offset, size)
            return data
        ids = [page_id(version, i) for i in span]
        fresh: dict[bytes, memoryview] = {}
        with self._lock:
            for pid in ids:
                if pid in self._inflight:
                    return None
                page = self._fresh.get(pid)
                if page is not None:
                    fresh[pid] = page
                    self._fresh.move_to_end(pid)
                    self._touch_locked(pid)
                elif pid not in self._policy:
                    return None
        view = zero_copy and len(span) == 1
        pieces = []
        for index, pid, lo, hi in _page_pieces(version, span, ids, offset, size):
            if pid in fresh:
                pieces.append(self._fresh_bytes(pid, fresh[pid], lo, hi, view))
                continue
            try:
                data = self._read_ready(version, index, pid, lo, hi, nowait=True, view=view)
            except _WouldBlock:
                return None
            if data is None:
                return None
            pieces.append(data)
        if stream is not None:
            self._observe(version, span, stream, offset, size)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_one_if_ready(self, version: ObjectVersion, index: int, offset: int, size: int,
                           zero_copy: bool) -> bytes | None:
        """``read_if_ready`` of a read within one page: the common case (the kernel asks for
        128 KiB, a page holds eight), without the lists of the general path."""
        pid = page_id(version, index)
        with self._lock:
            if pid in self._inflight:
                return None
            page = self._fresh.get(pid)
            if page is not None:
                self._fresh.move_to_end(pid)
                self._touch_locked(pid)
            elif pid not in self._policy:
                return None
        base = index * PAGE_SIZE
        lo, hi = offset - base, min(offset + size, version.size) - base
        if page is not None:
            return self._fresh_bytes(pid, page, lo, hi, zero_copy)
        try:
            return self._read_ready(version, index, pid, lo, hi, nowait=True, view=zero_copy)
        except _WouldBlock:
            return None

    def _observe(self, version: ObjectVersion, span: range, stream: ReadStream, offset: int,
                 size: int) -> None:
        """A read was served from the cache: the reader's stream goes on, and a sequential
        one's readahead is topped up."""
        window = stream.observe(offset, size)
        if window > len(span):
            with self._lock:
                ahead, warm = self._claim_readahead_locked(version, span, window, stream)
            self._start_readahead(version, ahead, warm)

    def _start_readahead(self, version: ObjectVersion, ahead: list[tuple[int, Future]],
                         warm: list[bytes] | None = None) -> None:
        if ahead:
            self._metrics.inc("readahead_pages_total", len(ahead))
            self._start_fetches(version, ahead, prefetch=True, priority=Priority.READAHEAD)
        if warm:
            try:
                self._warmer.submit(self._warm, warm)
            except RuntimeError:  # shutting down
                pass

    def _warm(self, pids: list[bytes]) -> None:
        """Open the page files of READY pages a sequential reader will read next and ask
        the kernel to read them in (warmer thread): the reader then finds them open and in
        memory, served by the hit path without waiting for the disk, one file after the
        other (a 1 MiB page file is too small for the kernel's own readahead to cross)."""
        for pid in pids:
            try:
                entry = self._files.borrow(pid, self._path(pid))
            except OSError:
                continue  # gone or unreadable: the read will find out and refetch
            try:
                os.posix_fadvise(entry.fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                self._files.give_back(entry)
        self._metrics.inc("readahead_warmed_pages_total", len(pids))

    def _promote(self, pids: list[bytes], priority: Priority) -> None:
        """Make the runs fetching ``pids`` at least as urgent as ``priority`` (any thread)."""
        with self._tickets_lock:
            tickets = {id(t): t for pid in pids
                       if (t := self._tickets.get(pid)) is not None and t.priority > priority}
        if tickets:
            def promote() -> None:
                for ticket in tickets.values():
                    PriorityGate.promote(ticket, priority)
            try:
                self._loop.loop.call_soon_threadsafe(promote)
            except RuntimeError:  # the loop is closed: shutting down
                pass

    def _claim_readahead_locked(self, version: ObjectVersion, span: range, window: int,
                                stream: ReadStream
                                ) -> tuple[list[tuple[int, Future]], list[bytes]]:
        """Claim the pages a sequential reader's window wants next (caller holds _lock);
        returns them and the READY pages of the window to warm (``_warm``).

        The window is topped up in batches of at least half a window, so readahead becomes
        a few coalesced GETs rather than one GET per page read."""
        ahead: list[tuple[int, Future]] = []
        warm: list[bytes] = []
        last = min(version.page_count(), span.start + window)
        first = max(span.stop, stream.ahead_until)
        if last - first >= max(1, window // 2) or (last > first and
                                                  last == version.page_count()):
            for index in range(first, last):
                pid = page_id(version, index)
                if pid in self._inflight or pid in self._fresh:
                    continue
                if pid in self._policy:
                    warm.append(pid)
                else:
                    ahead.append((index, self._inflight.setdefault(pid, Future())))
            stream.ahead_until = last
        return ahead, warm

    def _page_bytes(self, version: ObjectVersion, index: int, pid: bytes, lo: int, hi: int,
                    fut: Future | None, view: bool = False) -> bytes:
        if fut is None:
            data = self._read_ready(version, index, pid, lo, hi, view=view)
            if data is not None:
                return data
            fut = self._claim_after_bad_page(version, index, pid)
        try:
            page = fut.result(timeout=self._fetch_timeout_s)
        except concurrent.futures.TimeoutError:
            raise OriginError(f"timed out after {self._fetch_timeout_s:.0f}s waiting for page "
                              f"{index} of {version.key}", retryable=True) from None
        except ObjfsError as exc:
            raise copy.copy(exc) from None  # one instance per waiter: tracebacks are per raise
        self._metrics.inc("read_fetched_bytes", hi - lo)
        return page[lo:hi] if view else bytes(page[lo:hi])

    def _claim_after_bad_page(self, version: ObjectVersion, index: int, pid: bytes) -> Future:
        with self._lock:
            fut = self._inflight.get(pid)
            mine = fut is None
            if mine:
                fut = self._inflight[pid] = Future()
        if mine:
            self._start_fetches(version, [(index, fut)])
        return fut

    # ---- serving peers, preloading -------------------------------------------------------

    def claim_for_peer(self, version: ObjectVersion, run: range,
                       priority: Priority = Priority.DEMAND) -> tuple[list[ServedPage], int]:
        """BLOCKS (opens page files): call in an executor, never on the loop.

        The pages of ``run`` for a peer's request: READY pages as open page files (served
        is used: they are touched), the others as futures: pages already in flight are
        joined (their runs promoted to ``priority``), missing ones are claimed here and
        fetched **from the origin only** (an owner never forwards). Returns the pages and
        the number of origin fetches started. Every returned file must be given back
        (``give_back``) whatever happens next."""
        served: list[ServedPage] = []
        claimed: list[tuple[int, Future]] = []
        joined: list[bytes] = []
        ready: list[ServedPage] = []
        with self._lock:
            for index in run:
                pid = page_id(version, index)
                page = ServedPage(index, version.page_length(index))
                served.append(page)
                fut = self._inflight.get(pid)
                if fut is None and pid in self._policy:
                    ready.append(page)
                    self._policy.touch(pid)
                    self._seq += 1
                    self._touched[pid] = self._seq
                    continue
                if fut is None:
                    fut = self._unkept.get(pid)
                    if fut is None:
                        fut = self._inflight[pid] = Future()
                        claimed.append((index, fut))
                else:
                    joined.append(pid)
                page.future = fut
        for page in ready:  # open outside the lock; a file that is gone or short is a miss
            pid = page_id(version, page.index)
            reason = None
            try:
                entry = self._files.borrow(pid, self._path(pid))
            except FileNotFoundError:
                reason = "missing"
            except OSError as exc:
                self._disk_error("open", exc)
                reason = "unreadable"
            else:
                try:
                    size = os.fstat(entry.fd).st_size
                except OSError:
                    size = -1
                if size == HEADER_SIZE + page.length:
                    page.file = entry
                    continue
                self._files.give_back(entry)
                self._metrics.inc("cache_corrupt_pages_total")
                reason = "corrupt"
            self._forget(pid, reason)
            with self._lock:
                fut = self._inflight.get(pid)
                if fut is None:
                    fut = self._inflight[pid] = Future()
                    claimed.append((page.index, fut))
            page.future = fut
        fetches = self._start_fetches(version, claimed, priority=priority,
                                      origin_only=True) if claimed else 0
        if joined:
            self._promote(joined, priority)
        return served, fetches

    async def pages_for_peer(self, version: ObjectVersion, run: range, priority: Priority,
                             executor: concurrent.futures.Executor
                             ) -> tuple[list[ServedPage], int]:
        """The event-loop side of ``claim_for_peer``: claims in ``executor``, then waits for
        the pages being fetched without blocking the loop. Raises what their fetch raised
        (``StaleObject``, ``OriginError``...) or ``asyncio.TimeoutError``, having given the
        files back; on success the caller gives them back once sent."""
        loop = asyncio.get_running_loop()
        served, fetches = await loop.run_in_executor(executor, self.claim_for_peer, version,
                                                     run, priority)
        try:
            for page in served:
                if page.future is not None:
                    page.data = await _shared_result(page.future, self._fetch_timeout_s)
                    page.future = None
        except BaseException:
            for page in served:
                self.give_back(page)
            raise
        return served, fetches

    def give_back(self, page: ServedPage) -> None:
        """Return the page file a ``ServedPage`` borrowed (idempotent; any thread)."""
        entry, page.file = page.file, None
        if entry is not None:
            self._files.give_back(entry)

    def check_page(self, version: ObjectVersion, index: int) -> bool:
        """BLOCKS. Verify a READY page whole (a peer found it corrupt); one that does not
        verify is forgotten (MISSING). True if it verified or is not READY."""
        pid = page_id(version, index)
        with self._lock:
            if pid in self._inflight or pid not in self._policy:
                return True
        self._headers.pop(pid, None)  # verify the header on disk too, not the one in memory
        return self._read_ready(version, index, pid, 0, version.page_length(index),
                                account=False) is not None

    def fetch_pages(self, version: ObjectVersion, pages: range,
                    priority: Priority = Priority.PRELOAD,
                    origin_only: bool = False) -> list[Future]:
        """Get ``pages`` of ``version`` into the cache without reading them (preload; any
        thread, never blocks). READY pages are left alone; returns the futures of the
        others (claimed now, or already in flight and promoted to ``priority``). A page
        fetched this way comes from its owner like any other, unless ``origin_only`` (the
        master's work: this host is the owner the master named, whatever its own member
        list said a moment ago). A future resolves when the bytes arrive; the page is
        READY (or not kept) once ``states`` no longer says INFLIGHT."""
        pages = range(max(0, pages.start), min(pages.stop, version.page_count()))
        claimed: list[tuple[int, Future]] = []
        joined: list[bytes] = []
        futures: list[Future] = []
        with self._lock:
            for index in pages:
                pid = page_id(version, index)
                fut = self._inflight.get(pid)
                if fut is None:
                    if pid in self._policy:
                        continue
                    fut = self._inflight[pid] = Future()
                    claimed.append((index, fut))
                else:
                    joined.append(pid)
                futures.append(fut)
        if claimed:  # readahead's pages are "prefetched" (no hit when read); preload's are hits
            self._start_fetches(version, claimed, prefetch=priority is Priority.READAHEAD,
                                priority=priority, origin_only=origin_only)
        if joined:
            self._promote(joined, priority)
        return futures

    def states(self, version: ObjectVersion, pages: range) -> list[PageState]:
        """The state of each page of ``pages`` (one lock acquisition; any thread)."""
        with self._lock:
            out = []
            for index in pages:
                pid = page_id(version, index)
                out.append(PageState.INFLIGHT if pid in self._inflight else
                           PageState.READY if pid in self._policy else PageState.MISSING)
            return out

    # ---- pins (preload) --------------------------------------------------------------------

    def pin(self, holder: str, version: ObjectVersion, pages: range) -> None:
        """Pin ``pages`` of ``version`` for ``holder`` (a preload job): resident or not,
        nothing evicts them until ``unpin(holder)`` (``cache.policy``: pins). Any thread,
        never blocks."""
        pids = [page_id(version, i) for i in pages]
        with self._lock:
            held = self._pins.setdefault(holder, set())
            for pid in pids:
                if pid not in held:
                    held.add(pid)
                    self._policy.pin(pid)

    def unpin(self, holder: str) -> int:
        """Release every pin of ``holder``; returns how many pages it had pinned."""
        with self._lock:
            held = self._pins.pop(holder, set())
            for pid in held:
                self._policy.unpin(pid)
        return len(held)

    def pin_holders(self) -> list[str]:
        with self._lock:
            return sorted(self._pins)

    def usage(self) -> dict[str, int]:
        """Capacity, bytes used and pinned, free bytes on the cache filesystem (estimate)."""
        with self._lock:
            return {"capacity_bytes": self.capacity_bytes,
                    "used_bytes": self._policy.used_bytes,
                    "pinned_bytes": self._policy.pinned_bytes,
                    "free_bytes": max(0, self._free_estimate)}

    def _read_ready(self, version: ObjectVersion, index: int, pid: bytes, lo: int,
                    hi: int, nowait: bool = False, account: bool = True,
                    view: bool = False) -> bytes | None:
        """A READY page's bytes [lo, hi), verified; None if it must be refetched. With
        ``nowait``, raises ``_WouldBlock`` where reading would wait for the disk. Without
        ``account`` the read is not a use (no touch, no read counters). With ``view``, a
        memoryview that may be this thread's scratch buffer (valid until its next read)."""
        path = self._path(pid)
        try:
            file = self._files.borrow(pid, path, open_file=not nowait)
        except FileNotFoundError:
            self._forget(pid, "missing")
            return None
        except OSError as exc:
            self._disk_error("open", exc)
            return None
        if file is None:  # not open: opening may wait for the disk
            raise _WouldBlock
        fd = file.fd
        try:
            header = self._headers.get(pid)
            if header is None:
                header = decode_header(bytes(self._read_chunks(fd, HEADER_SIZE, 0, nowait)))
                if (header.index != index or header.key != version.key
                        or header.etag != version.etag or header.bucket != version.bucket
                        or header.length != version.page_length(index)):
                    raise CorruptPage("page file belongs to another page")
                if len(self._headers) >= _HEADER_CACHE_ENTRIES:
                    self._headers.clear()  # cheap and rare: re-reading headers is correct
                self._headers[pid] = header
            first, stop = header.chunk_range(lo, hi)
            start = first * CHUNK_SIZE
            wanted = min(stop * CHUNK_SIZE, header.length) - start
            raw = self._read_chunks(fd, wanted, HEADER_SIZE + start, nowait)
            if len(raw) != wanted:  # a truncated file: a short pread would verify nothing
                raise CorruptPage(f"page file holds {len(raw)} of {wanted} bytes at {start}")
            verify_chunks(header, first, raw)
            piece = raw[lo - start:hi - start]
            data = piece if view else bytes(piece)  # raw may be this thread's scratch
        except CorruptPage as exc:
            self._metrics.inc("cache_corrupt_pages_total")
            self._warn("corrupt", f"corrupt cached page {path} ({exc}): refetching")
            self._forget(pid, "corrupt")
            return None
        except OSError as exc:
            self._disk_error("read", exc)
            self._forget(pid, "unreadable")
            return None
        finally:
            self._files.give_back(file)
        if not account:
            return data
        with self._lock:
            self._touch_locked(pid)
            prefetched = self._read_prefetched_locked(pid, hi - lo)
        self._count_hit(hi - lo, prefetched)
        return data

    def _read_prefetched_locked(self, pid: bytes, n: int) -> bool:
        """Count ``n`` bytes of ``pid`` read; True if readahead stored it moments ago and
        it had not been read yet (caller holds _lock)."""
        unread = self._prefetched.get(pid)
        if unread is None:
            return False
        if unread - n <= 0:
            del self._prefetched[pid]
        else:
            self._prefetched[pid] = unread - n
        return True

    def _count_hit(self, n: int, prefetched: bool) -> None:
        # A page readahead fetched moments ago is no cache hit: the origin just served it.
        self._metrics.inc2("read_cache_bytes",
                           "read_prefetched_bytes" if prefetched else "read_cache_hit_bytes", n)

    def _read_chunks(self, fd: int, size: int, offset: int, nowait: bool) -> memoryview:
        """Bytes of a page file (a header, or checksum chunks), read into this thread's
        scratch buffer when they fit (a 4 KiB hit reads and verifies its whole 128 KiB
        chunk: a fresh 128 KiB buffer per hit cost more than the read), else into a new one.
        Valid until this thread's next read: copy what must outlive it."""
        if size > _SCRATCH_BYTES:
            view = memoryview(bytearray(size))
        else:
            scratch = getattr(self._scratch, "buf", None)
            if scratch is None:
                scratch = self._scratch.buf = bytearray(_SCRATCH_BYTES)
            view = memoryview(scratch)[:size]
        got = self._preadv(fd, view, offset, nowait)
        return view[:got]

    def _preadv(self, fd: int, view: memoryview, offset: int, nowait: bool) -> int:
        if not nowait:
            return os.preadv(fd, [view], offset)
        try:
            got = os.preadv(fd, [view], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            raise _WouldBlock from None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no RWF_NOWAIT here
                self._nowait_reads = False
                raise _WouldBlock from None
            raise
        if got != len(view):  # partly in the page cache, or truncated: let read decide
            raise _WouldBlock
        return got

    # ---- fetching (event loop) -------------------------------------------------------------

    def _start_fetches(self, version: ObjectVersion, claimed: list[tuple[int, Future]],
                       prefetch: bool = False, priority: Priority = Priority.DEMAND,
                       origin_only: bool = False) -> int:
        """Fetch the claimed pages in coalesced runs (cut at extents in a cluster); returns
        how many runs were started."""
        futures = dict(claimed)
        indexes = sorted(futures)
        if self._extent_pages:  # whole extents where possible: one GET at the owner each
            runs = [part for run in coalesce(indexes, len(indexes))
                    for piece in split_at_extents(run, self._extent_pages)
                    for part in coalesce(list(piece), self._request_pages)]
        else:
            runs = list(coalesce(indexes, self._request_pages))
        for run in runs:
            ticket = Ticket(priority)
            with self._tickets_lock:
                for index in run:
                    self._tickets[page_id(version, index)] = ticket
            self._loop.submit(self._fetch_run(version, run, [futures[i] for i in run],
                                              prefetch, ticket, origin_only))
        return len(runs)

    async def _fetch_run(self, version: ObjectVersion, run: range, futures: list[Future],
                         prefetch: bool = False, ticket: Ticket | None = None,
                         origin_only: bool = False) -> None:
        """Fetch a run, hand the bytes to the waiters, then store them. The run holds its
        fetch slot until stored, so the bytes in memory are bounded by ``parallelism`` runs
        (per gate) even when readers outpace the cache disk."""
        ticket = ticket or Ticket(Priority.DEMAND)
        gate: PriorityGate | None = None
        try:
            try:
                data = None
                if (not origin_only and self._peer_gate is not None
                        and self._sources.wants_cache(version, run)):
                    await self._peer_gate.acquire(ticket)
                    gate = self._peer_gate
                    data = await self._sources.fetch_cached(version, run, ticket.priority)
                    if data is None:  # a miss: trade the peer slot for an origin slot
                        gate = None
                        self._peer_gate.release(ticket)
                if data is None:
                    await self._gate.acquire(ticket)
                    gate = self._gate
                    data = await self._sources.fetch_origin(version, run)
                expected = min(run.stop * PAGE_SIZE, version.size) - run.start * PAGE_SIZE
                if len(data) != expected:
                    raise OriginError(f"short read of {version.key}: {len(data)} of "
                                      f"{expected} bytes", retryable=True)
            except BaseException as exc:
                error = exc if isinstance(exc, ObjfsError) else OriginError(
                    f"fetching {version.key}: {type(exc).__name__}: {exc}", retryable=True)
                self._metrics.inc("read_fetch_errors_total")
                with self._lock:
                    for index in run:
                        self._inflight.pop(page_id(version, index), None)
                for fut in futures:
                    if not fut.done():
                        fut.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
                return
            view = memoryview(data)
            pages = [view[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] for k in range(len(run))]
            for fut, page in zip(futures, pages):
                fut.set_result(page)
            self._metrics.inc("cache_misses_total", len(run))
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._writer, self._persist, version, run, pages, prefetch)
            except RuntimeError:  # shutting down: the pages stay MISSING
                with self._lock:
                    for index in run:
                        self._inflight.pop(page_id(version, index), None)
        finally:
            if gate is not None:
                gate.release(ticket)
            with self._tickets_lock:
                for index in run:
                    pid = page_id(version, index)
                    if self._tickets.get(pid) is ticket:
                        del self._tickets[pid]

    # ---- storing (writer threads) ----------------------------------------------------------

    def _persist(self, version: ObjectVersion, run: range, pages: list[memoryview],
                 prefetch: bool = False) -> None:
        """Store a fetched run: admit, write, then commit. Runs on a writer thread.

        The index entries are committed outside ``_lock`` (an LMDB commit can wait for the
        disk and for the maintenance thread's transaction, and the hit path takes
        ``_lock``); then, under ``_lock``, the pages the policy still holds go INFLIGHT ->
        READY. Another writer may have evicted a page of this run (even one admitted moments
        ago in this same loop) while its file was written or indexed: its file and index
        entry are deleted here, so files, index and policy agree.
        """
        written: list[tuple[bytes, int]] = []
        settled: list[bytes] = []
        index_of: dict[bytes, int] = {}  # pid -> position in ``pages``
        try:
            for index, page in zip(run, pages):
                index_of[page_id(version, index)] = index - run.start
                pid = page_id(version, index)
                size = HEADER_SIZE + len(page)
                owned = self._owned(pid)
                self._resample_free()
                with self._lock:
                    admitted, victims = self._admit_locked(pid, size, owned)
                if victims:
                    self._remove_pages(victims)
                if not admitted:
                    self._metrics.inc("cache_admissions_refused_total")
                    settled.append(pid)
                    continue
                try:
                    self._write_page(pid, encode_header(version.bucket, version.key,
                                                        version.etag, index, page), page)
                except OSError as exc:
                    self._disk_error("write", exc)
                    with self._lock:
                        if self._policy.remove(pid):
                            self._free_estimate += size
                    settled.append(pid)
                    continue
                written.append((pid, size))
        finally:
            with self._lock:
                indexed = [(pid, size) for pid, size in written if pid in self._policy]
                self._seq += 1
                seq = self._seq
            index_failed = False
            if indexed:
                try:
                    self._index.put((pid, size, seq) for pid, size in indexed)
                except lmdb.Error as exc:
                    self._disk_error("index", exc)
                    index_failed = True
            with self._lock:
                if index_failed:
                    for pid, _ in indexed:
                        self._policy.remove(pid)
                    kept = []
                else:
                    kept = [(pid, size) for pid, size in indexed if pid in self._policy]
                committed = len(kept)
                if prefetch:
                    for pid, size in kept:
                        self._prefetched[pid] = size - HEADER_SIZE
                for pid in settled:
                    fut = self._inflight.pop(pid, None)
                    if fut is not None and fut.done() and fut.exception() is None:
                        # A copy: the fetched page is a view that pins its whole run.
                        kept_copy: Future = Future()
                        kept_copy.set_result(bytes(fut.result()))
                        self._unkept[pid] = kept_copy
                        self._unkept.move_to_end(pid)
                while len(self._unkept) > self._unkept_pages:
                    self._unkept.popitem(last=False)
                for pid, _ in written:
                    self._inflight.pop(pid, None)
                for pid, _ in kept:
                    self._fresh[pid] = pages[index_of[pid]]
                    self._fresh.move_to_end(pid)
                while len(self._fresh) > self._fresh_limit:
                    self._fresh.popitem(last=False)
            kept_ids = {pid for pid, _ in kept}
            evicted = [pid for pid, _ in indexed if pid not in kept_ids]
            if evicted and not index_failed:  # evicted while being indexed: entry goes too
                try:
                    self._index.delete(evicted)
                except lmdb.Error as exc:
                    self._disk_error("index", exc)
            for pid, _ in written:
                if pid not in kept_ids:  # evicted while being written: its file must go
                    _unlink_quietly(self._path(pid))
            if committed:
                self._metrics.inc("cache_stored_pages_total", committed)

    def _admit_locked(self, pid: bytes, size: int,
                      owned: bool = True) -> tuple[bool, list[bytes]]:
        """Ask the policy to admit a page; returns (admitted, pages to evict first)."""
        # The free-space floor can lower the effective capacity, never raise it.
        room = self._policy.used_bytes + self._free_estimate - self.free_floor_bytes
        victims = list(self._policy.resize(max(0, min(self.capacity_bytes, room))))
        admitted = self._policy.admit(pid, size, owned)
        self._policy.capacity_bytes = self.capacity_bytes
        if admitted is not None:
            victims += admitted
            self._free_estimate -= size
        # Victims are whole pages, except an object's last one: close enough until resampled.
        self._free_estimate += len(victims) * (HEADER_SIZE + PAGE_SIZE)
        return admitted is not None, [bytes(v) for v in victims]

    def _resample_free(self) -> None:
        """Refresh the free-space estimate once a second, with ``statvfs`` outside ``_lock``
        (it can wait for the disk)."""
        now = self._clock()
        if now - self._free_sampled_at < 1.0:  # racy read: at worst two samples
            return
        free = self._sample_free()
        with self._lock:
            self._free_estimate = free
            self._free_sampled_at = now

    def _sample_free(self) -> int:
        """Free bytes on the cache filesystem; 0 (keep nothing) if that cannot be known.
        Never called holding ``_lock``."""
        try:
            return self._free_bytes(self._pages_dir)
        except OSError as exc:
            self._metrics.inc("cache_disk_errors_total")
            self._warn("statvfs", f"page cache: cannot check free space in {self._pages_dir} "
                       f"({exc}); keeping no pages until it can")
            return 0

    def _path(self, pid: bytes) -> str:
        name = pid.hex()
        return f"{self._pages_dir_text}/{name[:2]}/{name}"

    def _write_page(self, pid: bytes, header: bytes, page: memoryview) -> None:
        path = self._path(pid)
        tmp = f"{path}.tmp{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            total = len(header) + len(page)
            written = os.writev(fd, [header, page])
            while written < total:  # short writes are legal; finish from where it stopped
                rest = (header + bytes(page))[written:]
                written += os.write(fd, rest)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)

    # ---- removal ---------------------------------------------------------------------------

    def _forget(self, pid: bytes, reason: str) -> None:
        """A READY page turned out unusable: make it MISSING."""
        with self._lock:
            if pid in self._inflight:
                return  # being refetched already
            known = self._policy.remove(pid)
            self._touched.pop(pid, None)
            self._headers.pop(pid, None)
        if known:
            self._metrics.inc(f"cache_pages_{reason}_total")
            self._remove_pages([pid], evicted=False)

    def _remove_pages(self, pids: list[bytes], *, evicted: bool = True) -> None:
        """Delete index entries, then files (a crash in between leaves orphans, never an
        index entry pointing at another page's file)."""
        if not pids:
            return
        with self._lock:
            for pid in pids:
                self._touched.pop(pid, None)
                self._prefetched.pop(pid, None)
                self._headers.pop(pid, None)
                self._fresh.pop(pid, None)
        try:
            self._index.delete(pids)
        except lmdb.Error as exc:
            self._disk_error("index", exc)
        for pid in pids:
            _unlink_quietly(self._path(pid))
        self._files.retire(pids)  # after the unlink: see OpenPageFiles
        if evicted:
            self._metrics.inc("cache_evicted_pages_total", len(pids))

    def drop(self, version: ObjectVersion) -> int:
        """Remove every READY page of ``version``; returns how many were removed."""
        pids = []
        with self._lock:
            for index in range(version.page_count()):
                pid = page_id(version, index)
                self._unkept.pop(pid, None)
                self._fresh.pop(pid, None)
                if pid not in self._inflight and self._policy.remove(pid):
                    pids.append(pid)
        self._remove_pages(pids, evicted=False)
        self._metrics.inc("cache_pages_dropped_total", len(pids))
        return len(pids)

    def _flush_touched(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, {}
        if touched:
            try:
                self._index.touch(touched)
            except lmdb.Error as exc:
                self._disk_error("index", exc)

    # ---- trouble ---------------------------------------------------------------------------

    def _disk_error(self, what: str, exc: BaseException) -> None:
        self._metrics.inc("cache_disk_errors_total")
        reason = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
        self._warn(f"disk-{what}-{reason}",
                   f"page cache {what} failed ({exc}); reading through from the origin")

    def _warn(self, kind: str, message: str) -> None:
        with self._lock:
            if self._warned_recently_locked(kind):
                return
        log.warning("%s", message)

    def _warned_recently_locked(self, kind: str) -> bool:
        """Whether a warning of ``kind`` was logged in the last minute; if not, count this one
        as logged now. Caller holds ``_lock`` (or is the constructor)."""
        now = self._clock()
        last = self._last_warning.get(kind)
        if last is not None and now - last < _WARN_INTERVAL_S:
            return True
        self._last_warning[kind] = now
        return False


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
