"""Unit tests of ``objfs.cache.pagecache.PageCache`` over an in-memory page source.

No FUSE and no S3 server: the cache takes a ``SourceChain``, and ``FakeSource`` below is a
``PageSource`` over a dict of object bytes that records every fetch (so tests count pages and
requests), adds latency and fails on demand. The cache runs for real otherwise: its event-loop
thread, writer threads, page files and LMDB index in a temporary directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import objfs.cache.pagecache as pagecache_module
from objfs.cache.format import CHUNK_SIZE, HEADER_SIZE
from objfs.cache.pagecache import OpenPageFiles, PageCache, PageState
from objfs.cache.pages import PAGE_SIZE, ObjectVersion, byte_range, page_id
from objfs.cache.sources import SourceChain
from objfs.errors import OriginError, StaleObject
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics

P = PAGE_SIZE
K128 = 128 * 1024
PAGE_FILE = HEADER_SIZE + PAGE_SIZE  # bytes on disk of one whole page


class FakeSource:
    """A ``PageSource`` over in-memory objects keyed by (key, etag), so old versions stay
    readable like on a versioned origin. Records every fetch; ``latency_s`` delays each one on
    the loop; ``fail_next`` makes the next fetches raise."""

    name = "fake"

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.objects: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self.calls: list[tuple[ObjectVersion, range]] = []  # guarded by _lock
        self._failures: list[BaseException] = []             # guarded by _lock
        self._etags = itertools.count(1)

    def put(self, key: str, data: bytes, bucket: str = "bkt") -> ObjectVersion:
        """Store a new version of ``key`` (a fresh ETag) and return it."""
        etag = f'"etag-{next(self._etags)}"'
        self.objects[(key, etag)] = bytes(data)
        return ObjectVersion(bucket, key, etag, len(data))

    def fail_next(self, *errors: BaseException) -> None:
        with self._lock:
            self._failures.extend(errors)

    async def fetch(self, version: ObjectVersion, pages: range) -> bytearray:
        with self._lock:
            self.calls.append((version, pages))
            error = self._failures.pop(0) if self._failures else None
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if error is not None:
            raise error
        data = self.objects.get((version.key, version.etag))
        if data is None:
            raise StaleObject(f"{version.key} {version.etag} is gone")
        start, end = byte_range(version, pages)
        return bytearray(data[start:end])

    def fetched_pages(self, version: ObjectVersion | None = None) -> list[int]:
        """Every page index fetched (of ``version``, or of any), with repeats, sorted."""
        with self._lock:
            return sorted(i for v, run in self.calls if version in (None, v) for i in run)

    def call_count(self) -> int:
        with self._lock:
            return len(self.calls)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def settle(cache: PageCache, timeout: float = 10.0) -> None:
    """Wait until no page is INFLIGHT: fetches done and their pages stored (or refused)."""
    deadline = time.monotonic() + timeout
    while True:
        with cache._lock:
            if not cache._inflight:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"pages still in flight after {timeout}s")
        time.sleep(0.002)


def page_files(directory: Path) -> dict[bytes, int]:
    """Page id -> file size of every page file under DIR/data (temp files excluded)."""
    found = {}
    data = directory / "data"
    if not data.is_dir():
        return found
    for sub in data.iterdir():
        if sub.is_dir():
            for f in sub.iterdir():
                if len(f.name) == 40:
                    found[bytes.fromhex(f.name)] = f.stat().st_size
    return found


def disk_bytes(directory: Path) -> int:
    """Every byte under DIR/data, temp files included."""
    total = 0
    for root, _dirs, files in os.walk(directory / "data"):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # a temp file renamed meanwhile
                pass
    return total


def page_path(directory: Path, version: ObjectVersion, index: int) -> Path:
    name = page_id(version, index).hex()
    return directory / "data" / name[:2] / name


@dataclasses.dataclass
class Env:
    directory: Path
    loop: EventLoopThread
    source: FakeSource
    metrics: Metrics
    caches: list[PageCache] = dataclasses.field(default_factory=list)
    closed: set[int] = dataclasses.field(default_factory=set)

    def open(self, capacity_bytes: int = 64 * PAGE_FILE, **kwargs) -> PageCache:
        kwargs.setdefault("background", False)
        # These tests are about pages on disk (states, files, checksums, eviction): reads
        # go to the page files unless a test asks for the in-memory window of fresh pages.
        kwargs.setdefault("fresh_bytes", 0)
        cache = PageCache(self.directory, SourceChain([self.source], metrics=self.metrics),
                          self.loop, metrics=self.metrics, capacity_bytes=capacity_bytes,
                          **kwargs)
        self.caches.append(cache)
        return cache

    def close(self, cache: PageCache) -> None:
        if id(cache) not in self.closed:
            self.closed.add(id(cache))
            settle(cache)
            cache.close()

    def reopen(self, cache: PageCache, **kwargs) -> PageCache:
        self.close(cache)
        return self.open(cache.capacity_bytes, **kwargs)


@pytest.fixture
def loop() -> Iterator[EventLoopThread]:
    thread = EventLoopThread("test-loop").start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def env(tmp_path: Path, loop: EventLoopThread) -> Iterator[Env]:
    e = Env(tmp_path / "cache", loop, FakeSource(), Metrics())
    try:
        yield e
    finally:
        for cache in e.caches:
            e.close(cache)


def in_threads(n: int, target: Callable[[int], object]) -> list[object]:
    """Run ``target(i)`` in ``n`` threads released together; results (or exceptions) by i."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except BaseException as exc:  # handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# ---- byte-exact reads ------------------------------------------------------------------------

SIZE = 3 * P + 12345  # three whole pages and a short one
CASES = [
    (0, 1), (0, P), (0, P + 1), (P - 1, 1), (P - 1, 2), (P - 5, P + 10), (P, P),
    (CHUNK_SIZE - 1, 2), (2 * P + CHUNK_SIZE - 3, 3 * CHUNK_SIZE + 7), (K128 * 5, K128),
    (3 * P, 12345), (3 * P, P), (3 * P + 12344, 100), (SIZE - 1, 1), (SIZE - 1, P),
    (0, SIZE), (0, 10 * P), (123, SIZE - 123), (2 * P + 1, 0),
    (SIZE, 10), (SIZE + 1, 10), (10 * P, P), (0, 0),
]


def random_cases(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        offset = rng.randrange(0, SIZE + 100)
        size = rng.choice([rng.randrange(0, 300), rng.randrange(0, 2 * P), K128, P])
        cases.append((offset, size))
    return cases


def test_reads_are_byte_exact(env: Env) -> None:
    data = random_bytes(SIZE, 1)
    v = env.source.put("x", data)
    cache = env.open()
    cases = CASES + random_cases(150, 2)
    for offset, size in cases:  # cold: misses, hits and in-flight pages mixed
        assert cache.read(v, offset, size) == data[offset:offset + size], (offset, size)
    settle(cache)
    assert env.source.fetched_pages(v) == [0, 1, 2, 3]
    assert all(cache.state(v, i) is PageState.READY for i in range(4))
    for offset, size in cases:  # warm: every byte from the page files
        assert cache.read(v, offset, size) == data[offset:offset + size], (offset, size)
    assert env.source.fetched_pages(v) == [0, 1, 2, 3]
    assert env.metrics.get("read_cache_bytes") > 0


def test_page_files_on_disk(env: Env) -> None:
    data = random_bytes(SIZE, 3)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, SIZE)
    settle(cache)
    files = page_files(env.directory)
    assert files == {page_id(v, i): HEADER_SIZE + v.page_length(i) for i in range(4)}
    assert cache.used_bytes == sum(files.values()) == 3 * PAGE_FILE + HEADER_SIZE + 12345
    raw = page_path(env.directory, v, 3).read_bytes()
    assert raw[HEADER_SIZE:] == data[3 * P:]


def test_object_of_exact_pages_and_empty_object(env: Env) -> None:
    data = random_bytes(2 * P, 4)
    v = env.source.put("exact", data)
    empty = env.source.put("empty", b"")
    cache = env.open()
    assert cache.read(v, 0, 3 * P) == data
    assert cache.read(v, 2 * P, 1) == b""
    assert cache.read(empty, 0, 100) == b""
    settle(cache)
    assert env.source.fetched_pages(v) == [0, 1]
    assert env.source.fetched_pages(empty) == []


def test_states(env: Env) -> None:
    env.source.latency_s = 0.3
    v = env.source.put("x", random_bytes(2 * P, 5))
    cache = env.open()
    assert cache.state(v, 0) is PageState.MISSING
    reader = threading.Thread(target=cache.read, args=(v, 0, 1))
    reader.start()
    deadline = time.monotonic() + 5
    while cache.state(v, 0) is not PageState.INFLIGHT and time.monotonic() < deadline:
        time.sleep(0.001)
    assert cache.state(v, 0) is PageState.INFLIGHT
    assert cache.state(v, 1) is PageState.MISSING
    reader.join(5)
    settle(cache)
    assert cache.state(v, 0) is PageState.READY
    assert cache.state(v, 1) is PageState.MISSING


# ---- single flight ---------------------------------------------------------------------------

def test_32_concurrent_readers_fetch_each_page_once(env: Env) -> None:
    env.source.latency_s = 0.05
    data = random_bytes(8 * P + 777, 6)
    v = env.source.put("shared", data)
    cache = env.open()

    def reader(i: int) -> bytes:
        if i % 2:  # half read whole pages in one call, half in 128 KiB requests
            return cache.read(v, 0, len(data))
        return b"".join(cache.read(v, off, K128) for off in range(0, len(data), K128))

    results = in_threads(32, reader)
    assert all(r == data for r in results), [type(r) for r in results if r != data]
    settle(cache)
    assert env.source.fetched_pages(v) == list(range(9))  # each page exactly once
    assert env.metrics.get("cache_misses_total") == 9
    # And the pages are now served from disk, still without a fetch.
    results = in_threads(32, reader)
    assert all(r == data for r in results)
    assert env.source.fetched_pages(v) == list(range(9))


def test_concurrent_readers_of_different_ranges_of_one_inflight_page(env: Env) -> None:
    env.source.latency_s = 0.1
    data = random_bytes(P, 7)
    v = env.source.put("x", data)
    cache = env.open()
    ranges = [(i * 4099 % P, (i * 7919) % 70000) for i in range(32)]
    results = in_threads(32, lambda i: cache.read(v, *ranges[i]))
    assert results == [data[o:o + n] for o, n in ranges]
    assert env.source.call_count() == 1


# ---- failures --------------------------------------------------------------------------------

def test_failed_fetch_reaches_every_waiter_and_page_goes_back_to_missing(env: Env) -> None:
    env.source.latency_s = 0.1
    data = random_bytes(P + 10, 8)
    v = env.source.put("x", data)
    cache = env.open()
    env.source.fail_next(OriginError("origin exploded", status=500))
    results = in_threads(8, lambda i: cache.read(v, i * 1000, 100))
    assert env.source.call_count() == 1
    assert all(isinstance(r, OriginError) for r in results), results
    assert all("origin exploded" in str(r) for r in results)
    assert len({id(r) for r in results}) == 8  # one instance per waiter
    assert cache.state(v, 0) is PageState.MISSING
    assert env.metrics.get("read_fetch_errors_total") == 1
    settle(cache)
    assert page_files(env.directory) == {}
    # A later read fetches again and succeeds.
    assert cache.read(v, 0, len(data)) == data
    assert env.source.fetched_pages(v) == [0, 0, 1]


def test_unexpected_source_exception_becomes_origin_error(env: Env) -> None:
    v = env.source.put("x", random_bytes(100, 9))
    cache = env.open()
    env.source.fail_next(RuntimeError("bug in a source"))
    with pytest.raises(OriginError, match="RuntimeError"):
        cache.read(v, 0, 10)
    assert cache.state(v, 0) is PageState.MISSING
    assert cache.read(v, 0, 10) == env.source.objects[("x", v.etag)][:10]


def test_stale_object_reaches_the_reader(env: Env) -> None:
    v = env.source.put("x", random_bytes(100, 10))
    del env.source.objects[("x", v.etag)]  # replaced at the origin: If-Match fails
    cache = env.open()
    with pytest.raises(StaleObject):
        cache.read(v, 0, 10)
    assert cache.state(v, 0) is PageState.MISSING


def test_short_answer_from_source_is_an_error(env: Env) -> None:
    v = env.source.put("x", random_bytes(2 * P, 11))
    truncated = ObjectVersion(v.bucket, v.key, v.etag, 3 * P)  # claims more than the origin has
    cache = env.open()
    with pytest.raises(OriginError, match="short read"):
        cache.read(truncated, 0, 3 * P)
    settle(cache)
    assert all(cache.state(truncated, i) is PageState.MISSING for i in range(3))


def test_fetch_timeout(env: Env) -> None:
    env.source.latency_s = 0.3
    v = env.source.put("x", random_bytes(100, 12))
    cache = env.open(fetch_timeout_s=0.05)
    with pytest.raises(OriginError, match="timed out") as info:
        cache.read(v, 0, 10)
    assert info.value.retryable


# ---- persistence -----------------------------------------------------------------------------

def test_reopen_rereads_with_zero_fetches(env: Env) -> None:
    data = random_bytes(5 * P + 3, 13)
    v = env.source.put("x", data)
    cache = env.open()
    assert cache.read(v, 0, len(data)) == data
    settle(cache)  # pages are stored after the read returns
    used = cache.used_bytes
    assert used == 5 * PAGE_FILE + HEADER_SIZE + 3
    cache = env.reopen(cache)
    env.source.reset()
    assert cache.used_bytes == used
    assert all(cache.state(v, i) is PageState.READY for i in range(6))
    assert cache.read(v, 0, len(data)) == data
    for offset in range(0, len(data), 333_333):
        assert cache.read(v, offset, K128) == data[offset:offset + K128]
    assert env.source.call_count() == 0


def test_lru_order_survives_restart(env: Env) -> None:
    v = env.source.put("x", random_bytes(6 * P, 14))
    cache = env.open(capacity_bytes=4 * PAGE_FILE)
    for i in range(4):
        cache.read(v, i * P, 1)
        settle(cache)
    cache.read(v, 0, 1)  # page 0 is now the most recently used
    cache = env.reopen(cache)
    cache.read(v, 4 * P, 1)
    settle(cache)
    assert cache.state(v, 0) is PageState.READY
    assert cache.state(v, 1) is PageState.MISSING  # the least recently used went first
    assert [cache.state(v, i) for i in (2, 3, 4)] == [PageState.READY] * 3


def test_lower_capacity_on_restart_evicts(env: Env) -> None:
    v = env.source.put("x", random_bytes(6 * P, 15))
    cache = env.open(capacity_bytes=6 * PAGE_FILE)
    cache.read(v, 0, 6 * P)
    env.close(cache)
    cache = env.open(capacity_bytes=2 * PAGE_FILE)
    assert cache.used_bytes <= 2 * PAGE_FILE
    files = page_files(env.directory)
    assert sum(files.values()) == cache.used_bytes
    assert len(files) == 2


def test_damaged_index_starts_empty(env: Env) -> None:
    data = random_bytes(2 * P, 16)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, len(data))
    env.close(cache)
    (env.directory / "index" / "data.mdb").write_bytes(b"this is not an lmdb file" * 1000)
    cache = env.open()
    assert cache.used_bytes == 0
    env.source.reset()
    assert cache.read(v, 0, len(data)) == data
    assert env.source.fetched_pages(v) == [0, 1]


# ---- damaged page files ----------------------------------------------------------------------

def flip_byte(path: Path, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x55]))


@pytest.mark.parametrize("position", [0, 20, HEADER_SIZE - 1, HEADER_SIZE,
                                      HEADER_SIZE + 5 * K128 + 7, HEADER_SIZE + P - 1])
def test_corrupt_page_is_refetched_once(env: Env, position: int) -> None:
    data = random_bytes(2 * P, 17)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, len(data))
    settle(cache)
    flip_byte(page_path(env.directory, v, 0), position)
    env.source.reset()
    assert cache.read(v, 0, len(data)) == data
    settle(cache)
    assert env.source.fetched_pages(v) == [0]
    assert env.metrics.get("cache_corrupt_pages_total") == 1
    # The refetched page was stored again, intact: no more fetches.
    assert cache.state(v, 0) is PageState.READY
    assert cache.read(v, 0, len(data)) == data
    assert env.source.fetched_pages(v) == [0]
    assert env.metrics.get("cache_corrupt_pages_total") == 1


def test_corruption_in_unread_chunk_is_found_when_that_chunk_is_read(env: Env) -> None:
    data = random_bytes(P, 18)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, P)
    settle(cache)
    flip_byte(page_path(env.directory, v, 0), HEADER_SIZE + 6 * K128 + 1)
    env.source.reset()
    assert cache.read(v, 0, K128) == data[:K128]  # chunk 0 verifies: a hit
    assert env.source.call_count() == 0
    assert cache.read(v, 6 * K128, 10) == data[6 * K128:6 * K128 + 10]
    assert env.source.fetched_pages(v) == [0]
    assert env.metrics.get("cache_corrupt_pages_total") == 1


def test_page_file_of_another_page_is_refetched(env: Env) -> None:
    data = random_bytes(2 * P, 19)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, len(data))
    settle(cache)
    shutil.copy(page_path(env.directory, v, 1), page_path(env.directory, v, 0))
    env.source.reset()
    assert cache.read(v, 0, P) == data[:P]
    assert env.source.fetched_pages(v) == [0]
    assert env.metrics.get("cache_corrupt_pages_total") == 1


def test_deleted_page_file_is_refetched(env: Env) -> None:
    data = random_bytes(2 * P, 20)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, len(data))
    settle(cache)
    page_path(env.directory, v, 1).unlink()
    env.source.reset()
    assert cache.read(v, 0, len(data)) == data
    settle(cache)
    assert env.source.fetched_pages(v) == [1]
    assert page_path(env.directory, v, 1).exists()
    assert cache.read(v, P, P) == data[P:]
    assert env.source.fetched_pages(v) == [1]


@pytest.mark.parametrize("keep", [0, HEADER_SIZE, HEADER_SIZE + K128, HEADER_SIZE + 4 * K128,
                                  HEADER_SIZE + P // 2 + 1])
def test_truncated_page_file_is_refetched(env: Env, keep: int) -> None:
    """A page file cut short (a torn write, a crash of the filesystem after the rename) is
    corrupt: the read must return the page's full bytes, never a short or empty piece."""
    data = random_bytes(2 * P, 21)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, len(data))
    settle(cache)
    os.truncate(page_path(env.directory, v, 0), keep)
    env.source.reset()
    got = cache.read(v, 0, P)
    assert len(got) == P, f"truncated page file served as {len(got)} bytes"
    assert got == data[:P]
    assert env.source.fetched_pages(v) == [0]


# ---- versions --------------------------------------------------------------------------------

def test_new_etag_never_returns_old_bytes(env: Env) -> None:
    old_data = random_bytes(2 * P + 5, 22)
    new_data = random_bytes(2 * P + 5, 23)  # same size, different bytes
    old = env.source.put("x", old_data)
    cache = env.open()
    assert cache.read(old, 0, len(old_data)) == old_data
    settle(cache)
    new = env.source.put("x", new_data)
    assert new.etag != old.etag and new.key == old.key
    assert all(cache.state(new, i) is PageState.MISSING for i in range(3))
    for offset, size in CASES[:12]:
        assert cache.read(new, offset, size) == new_data[offset:offset + size]
    assert cache.read(new, 0, len(new_data)) == new_data
    settle(cache)
    assert env.source.fetched_pages(new) == [0, 1, 2]
    assert cache.read(old, 0, len(old_data)) == old_data  # still its own pages
    assert env.source.fetched_pages(old) == [0, 1, 2]
    # The next daemon sees the same separation.
    cache = env.reopen(cache)
    assert cache.read(new, 0, len(new_data)) == new_data
    assert cache.read(old, 0, len(old_data)) == old_data


def test_drop_removes_a_version(env: Env) -> None:
    data = random_bytes(3 * P, 24)
    v = env.source.put("x", data)
    other = env.source.put("y", data)
    cache = env.open()
    cache.read(v, 0, len(data))
    cache.read(other, 0, len(data))
    settle(cache)
    assert cache.drop(v) == 3
    assert all(cache.state(v, i) is PageState.MISSING for i in range(3))
    assert set(page_files(env.directory)) == {page_id(other, i) for i in range(3)}
    assert cache.used_bytes == 3 * PAGE_FILE
    assert cache.drop(v) == 0
    env.source.reset()
    assert cache.read(v, 0, len(data)) == data
    assert env.source.fetched_pages(v) == [0, 1, 2]
    cache = env.reopen(cache)  # the index forgot the dropped pages too
    settle(cache)
    assert cache.used_bytes == sum(page_files(env.directory).values())


# ---- capacity --------------------------------------------------------------------------------

def check_disk(env: Env, cache: PageCache) -> None:
    """Page files on disk (temp files included) fit the capacity.

    A directory walk is no snapshot: while writers run, it can count a victim's file in one
    subdirectory and, later in the same walk, the page written after that victim was
    unlinked. So a measurement over capacity is repeated; a real excess (a file the cache
    does not account for) persists, a walk artifact does not."""
    assert cache.used_bytes <= cache.capacity_bytes
    measured = []
    for _ in range(5):
        measured.append(disk_bytes(env.directory))
        if measured[-1] <= cache.capacity_bytes:
            return
        time.sleep(0.002)
    raise AssertionError(f"page files use {measured} bytes, capacity {cache.capacity_bytes}")


def check_settled(env: Env, cache: PageCache) -> None:
    """After writes settle: page files, policy and index describe the same pages."""
    settle(cache)
    files = page_files(env.directory)
    with cache._lock:
        resident = {bytes(p) for p in cache._policy.pages()}
    assert set(files) == resident
    assert cache.used_bytes == sum(files.values())
    assert {pid for pid, _, _ in cache._index.entries()} == resident
    check_disk(env, cache)


def test_lru_never_exceeds_capacity(env: Env) -> None:
    data = random_bytes(12 * P, 25)
    v = env.source.put("x", data)
    cache = env.open(capacity_bytes=4 * PAGE_FILE)
    for offset in range(0, len(data), K128):  # 3x the capacity, sequentially
        assert cache.read(v, offset, K128) == data[offset:offset + K128]
        check_disk(env, cache)
    check_settled(env, cache)
    assert [cache.state(v, i) for i in range(12)] == \
        [PageState.MISSING] * 8 + [PageState.READY] * 4
    assert env.metrics.get("cache_evicted_pages_total") == 8
    assert env.source.fetched_pages(v) == list(range(12))


def test_lru_capacity_with_random_reads(env: Env) -> None:
    data = random_bytes(12 * P + 99, 26)
    v = env.source.put("x", data)
    cache = env.open(capacity_bytes=3 * PAGE_FILE + 10)
    rng = random.Random(27)
    for _ in range(60):
        offset, size = rng.randrange(len(data)), rng.choice([1, K128, P])
        assert cache.read(v, offset, size) == data[offset:offset + size]
        check_disk(env, cache)
    check_settled(env, cache)


def test_lru_multi_page_read_larger_than_capacity(env: Env) -> None:
    """One read of 4 pages (one coalesced fetch) into a 2-page cache: the run's later pages
    evict its earlier ones while it is being stored. The index must not keep entries for the
    evicted pages (else a restart believes in pages that are gone and evicts real ones)."""
    data = random_bytes(4 * P, 28)
    v = env.source.put("x", data)
    cache = env.open(capacity_bytes=2 * PAGE_FILE)
    assert cache.read(v, 0, len(data)) == data
    assert env.source.call_count() == 1
    check_settled(env, cache)


def test_lru_restart_after_multi_page_read_counts_only_real_pages(env: Env) -> None:
    """The user-visible side of the same bug: restarted with a larger capacity, the cache
    loads the stale index entries as resident pages whose files are gone, so ``used_bytes``
    counts pages that are not on disk (and that space is never used)."""
    data = random_bytes(4 * P, 29)
    v = env.source.put("x", data)
    cache = env.open(capacity_bytes=2 * PAGE_FILE)
    cache.read(v, 0, len(data))
    settle(cache)
    assert [i for i in range(4) if cache.state(v, i) is PageState.READY] == [2, 3]
    env.close(cache)
    cache = env.open(capacity_bytes=8 * PAGE_FILE)
    assert [i for i in range(4) if cache.state(v, i) is PageState.READY] == [2, 3]
    assert cache.used_bytes == sum(page_files(env.directory).values()) == 2 * PAGE_FILE


def test_page_evicted_while_being_written_leaves_no_file(env: Env) -> None:
    """Two writer threads: page A is admitted, then, before its file is written, the
    admission of page B (another fetch, the other writer thread) evicts it. The eviction
    unlinks a file that does not exist yet; A's writer then writes the file and indexes it
    anyway. Result: a file the policy does not count, disk usage above capacity, and an
    index entry for a page that is not resident. Made deterministic by holding A's write
    until B is stored."""
    a = env.source.put("a", random_bytes(P, 31))
    b = env.source.put("b", random_bytes(P, 32))
    cache = env.open(capacity_bytes=PAGE_FILE, writer_threads=2)
    b_stored = threading.Event()
    real_write = cache._write_page

    def write_page(pid: bytes, header: bytes, page: memoryview) -> None:
        if pid == page_id(a, 0):
            b_stored.wait(1)  # (a fix that serializes stores makes this time out: fine)
        real_write(pid, header, page)
        if pid == page_id(b, 0):
            b_stored.set()

    cache._write_page = write_page
    assert cache.read(a, 0, 10) == env.source.objects[("a", a.etag)][:10]
    assert cache.read(b, 0, 10) == env.source.objects[("b", b.etag)][:10]
    settle(cache)
    assert cache.state(a, 0) is PageState.MISSING  # evicted by b
    assert cache.state(b, 0) is PageState.READY
    check_settled(env, cache)


def test_lru_capacity_with_concurrent_readahead_streams(env: Env) -> None:
    """Several sequential readers at once: many runs are stored concurrently by the writer
    threads; usage stays within capacity and files match the resident set."""
    objects = {k: random_bytes(10 * P, 30 + k) for k in range(4)}
    versions = {k: env.source.put(f"o{k}", d) for k, d in objects.items()}
    cache = env.open(capacity_bytes=5 * PAGE_FILE, max_window_pages=4, request_pages=2,
                     writer_threads=4)

    def reader(k: int) -> bool:
        stream = cache.new_stream()
        v, d = versions[k], objects[k]
        for offset in range(0, len(d), K128):
            if cache.read(v, offset, K128, stream) != d[offset:offset + K128]:
                return False
            check_disk(env, cache)
        return True

    for _ in range(3):
        assert in_threads(4, reader) == [True] * 4
        check_settled(env, cache)


def test_uniform_stops_admitting_at_capacity(env: Env) -> None:
    data = random_bytes(12 * P, 40)
    v = env.source.put("x", data)
    # unkept_pages=2: the in-memory buffer of refused pages must not hide the refetches.
    cache = env.open(capacity_bytes=4 * PAGE_FILE, policy="uniform", unkept_pages=2)
    assert cache.policy_name == "uniform"
    for epoch in range(3):
        for i in range(12):
            assert cache.read(v, i * P, P) == data[i * P:(i + 1) * P]
            check_disk(env, cache)
        settle(cache)
        assert [cache.state(v, i) for i in range(12)] == \
            [PageState.READY] * 4 + [PageState.MISSING] * 8, epoch
    check_settled(env, cache)
    # The first four pages were fetched once; the rest on every epoch.
    assert env.source.fetched_pages(v) == sorted(list(range(4)) + list(range(4, 12)) * 3)
    assert env.metrics.get("cache_evicted_pages_total") == 0
    assert env.metrics.get("cache_admissions_refused_total") == 24


# ---- disk trouble ----------------------------------------------------------------------------

def test_free_space_floor_keeps_nothing(env: Env) -> None:
    data = random_bytes(3 * P, 41)
    v = env.source.put("x", data)
    cache = env.open(free_floor_bytes=1 << 30, free_bytes=lambda _path: 100 * P)
    for _ in range(2):
        assert cache.read(v, 0, len(data)) == data
        settle(cache)
    assert page_files(env.directory) == {}
    assert cache.used_bytes == 0
    # Nothing kept on disk; the second pass is served from the small in-memory buffer of
    # refused pages (so a read-through page is not fetched once per 128 KiB piece).
    assert env.source.fetched_pages(v) == [0, 1, 2]


def test_free_space_floor_lowers_capacity(env: Env) -> None:
    data = random_bytes(8 * P, 42)
    v = env.source.put("x", data)
    cache = env.open(capacity_bytes=100 * PAGE_FILE, free_floor_bytes=10 * PAGE_FILE,
                     free_bytes=lambda _path: 13 * PAGE_FILE)
    for i in range(8):
        assert cache.read(v, i * P, P) == data[i * P:(i + 1) * P]
        settle(cache)
    assert 0 < cache.used_bytes <= 3 * PAGE_FILE
    assert cache.capacity_bytes == 100 * PAGE_FILE  # the configured capacity is untouched
    check_settled(env, cache)


def test_refused_page_buffer_is_bounded_in_bytes(env: Env) -> None:
    """Refused pages are kept in a small in-memory buffer of ``unkept_pages`` pages. Each is
    a memoryview of its whole fetched run, so the buffer must not keep whole runs alive
    through one page each: reading R-page runs that are all refused while re-reading page 0
    of recent objects (a hot header) pins one run per hot page, R times the bound."""
    runs, buffered = 4, 8
    objects = [env.source.put(f"o{k}", random_bytes(runs * P, 100 + k)) for k in range(12)]
    cache = env.open(capacity_bytes=0, request_pages=runs, unkept_pages=buffered)
    for k, v in enumerate(objects):
        assert cache.read(v, 0, runs * P) == env.source.objects[(v.key, v.etag)]
        settle(cache)
        for hot in objects[max(0, k + 1 - (buffered - runs)):k + 1]:
            cache.read(hot, 0, 1)
    assert env.source.call_count() == len(objects)  # the hot pages came from the buffer
    with cache._lock:
        results = [fut.result() for fut in cache._unkept.values()]
    assert len(results) <= buffered
    pinned = {id(getattr(r, "obj", r)): len(getattr(r, "obj", r)) for r in results}
    assert sum(pinned.values()) <= buffered * P, (
        f"{len(results)} buffered pages keep {sum(pinned.values()) / P:.0f} MiB alive "
        f"in {len(pinned)} fetched runs")


def test_unwritable_data_dir_reads_through(env: Env) -> None:
    data = random_bytes(3 * P, 43)
    v = env.source.put("x", data)
    cache = env.open()
    assert cache.read(v, 0, P) == data[:P]
    settle(cache)
    shutil.rmtree(env.directory / "data")
    (env.directory / "data").write_bytes(b"not a directory")
    for _ in range(2):
        assert cache.read(v, 0, len(data)) == data  # page 0 was READY, 1 and 2 are new
        settle(cache)
    assert env.metrics.get("cache_disk_errors_total") > 0
    assert cache.used_bytes == 0
    assert all(cache.state(v, i) is PageState.MISSING for i in range(3))


def test_failing_free_space_probe_is_counted(env: Env, caplog) -> None:
    """A cache disk whose statvfs fails is cache-disk trouble: reads still succeed, and like
    any other disk trouble it shows in ``cache_disk_errors_total`` and a warning, at most
    one a minute although free space is resampled every second."""
    def broken(_path: Path) -> int:
        raise OSError(5, "Input/output error")

    now = [1000.0]
    data = random_bytes(2 * P, 44)
    v = env.source.put("x", data)
    cache = env.open(free_bytes=broken, clock=lambda: now[0])
    for _ in range(5):                       # five resamples in five seconds
        now[0] += 1.0
        cache.drop(v)
        assert cache.read(v, 0, len(data)) == data
        settle(cache)
    assert env.metrics.get("cache_disk_errors_total") >= 5
    warnings = [r for r in caplog.records if "cannot check free space" in r.getMessage()]
    assert len(warnings) == 1
    now[0] += 61.0
    cache.drop(v)
    assert cache.read(v, 0, len(data)) == data
    settle(cache)                            # admission, and so the resample, is after the read
    warnings = [r for r in caplog.records if "cannot check free space" in r.getMessage()]
    assert len(warnings) == 2


# ---- orphans ---------------------------------------------------------------------------------

def test_reconcile_removes_orphans(env: Env) -> None:
    data = random_bytes(2 * P, 45)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, len(data))
    settle(cache)
    stray = env.directory / "data" / "ab"
    stray.mkdir(exist_ok=True)
    orphans = [stray / "junk", stray / ("ab" + "0" * 38), stray / ("ab" + "1" * 38 + ".tmp1"),
               stray / ("ab" + "zz" * 19)]
    for f in orphans:
        f.write_bytes(b"leftover")
    assert cache.reconcile() == len(orphans)
    assert not any(f.exists() for f in orphans)
    assert set(page_files(env.directory)) == {page_id(v, 0), page_id(v, 1)}
    assert env.metrics.get("cache_orphans_removed_total") == len(orphans)
    env.source.reset()
    assert cache.read(v, 0, len(data)) == data
    assert env.source.call_count() == 0
    assert cache.reconcile() == 0


def test_page_written_but_not_indexed_is_an_orphan_after_restart(env: Env) -> None:
    data = random_bytes(P, 46)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, P)
    settle(cache)
    cache._index.delete([page_id(v, 0)])  # as if the daemon died between file and index
    cache = env.reopen(cache)
    assert cache.state(v, 0) is PageState.MISSING
    assert cache.reconcile() == 1
    assert page_files(env.directory) == {}


def test_reconcile_leaves_pages_being_written_alone(env: Env,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up reconcile pass runs in the background while readers already fetch and
    store pages. A page's temp file, written but not yet renamed, belongs to a fetch: it is
    no crash leftover and must survive the pass (else the rename fails, the page is not
    kept and a disk error is reported for a healthy disk). Made deterministic by running the
    pass just before the writer's rename."""
    data = random_bytes(P, 50)
    v = env.source.put("x", data)
    cache = env.open()
    real_os = pagecache_module.os

    class OsWithReconcileBeforeRename:
        def __getattr__(self, name: str) -> object:
            return getattr(real_os, name)

        def rename(self, src: str, dst: str) -> None:
            cache.reconcile()
            real_os.rename(src, dst)

    monkeypatch.setattr(pagecache_module, "os", OsWithReconcileBeforeRename())
    assert cache.read(v, 0, P) == data
    settle(cache)
    monkeypatch.undo()
    assert env.metrics.get("cache_disk_errors_total") == 0
    assert cache.state(v, 0) is PageState.READY
    assert set(page_files(env.directory)) == {page_id(v, 0)}


def test_background_reconcile_at_start(env: Env) -> None:
    stray = env.directory / "data" / "cd"
    stray.mkdir(parents=True)
    (stray / "junk").write_bytes(b"x")
    env.open(background=True)
    deadline = time.monotonic() + 5
    while (stray / "junk").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (stray / "junk").exists()


# ---- readahead -------------------------------------------------------------------------------

def test_sequential_stream_reads_ahead_in_coalesced_fetches(env: Env) -> None:
    data = random_bytes(40 * P, 47)
    v = env.source.put("x", data)
    cache = env.open(max_window_pages=8, request_pages=4)
    stream = cache.new_stream()
    for offset in range(0, 4 * P, K128):  # the reader stays within pages 0-3
        assert cache.read(v, offset, K128, stream) == data[offset:offset + K128]
    settle(cache)
    fetched = env.source.fetched_pages(v)
    assert len(fetched) == len(set(fetched)), "a page was fetched twice"
    assert max(fetched) >= 8, f"no readahead beyond the reader: {fetched}"
    assert env.source.call_count() < len(fetched), "readahead was not coalesced"
    assert max(len(run) for _, run in env.source.calls) > 1
    assert all(len(run) <= 4 for _, run in env.source.calls)
    ahead = [i for i in range(4, 40) if cache.state(v, i) is PageState.READY]
    assert ahead and ahead == list(range(4, 4 + len(ahead)))
    assert len(ahead) <= 8  # never more than the window past the reader
    assert env.metrics.get("readahead_pages_total") >= len(ahead)
    # The pages read ahead are hits when the reader gets there.
    calls = env.source.call_count()
    for offset in range(4 * P, (4 + len(ahead)) * P, K128):
        cache.read(v, offset, K128)  # no stream: no more readahead
    assert env.source.call_count() == calls


def test_sequential_stream_over_a_whole_object(env: Env) -> None:
    data = random_bytes(24 * P + 5, 48)
    v = env.source.put("x", data)
    cache = env.open(max_window_pages=8, request_pages=4)
    stream = cache.new_stream()
    got = b"".join(cache.read(v, off, K128, stream) for off in range(0, len(data), K128))
    assert got == data
    settle(cache)
    assert env.source.fetched_pages(v) == list(range(25))
    assert env.source.call_count() <= 12  # 25 pages in runs of up to 4, not 25 requests


def test_random_reader_does_not_read_ahead(env: Env) -> None:
    data = random_bytes(40 * P, 49)
    v = env.source.put("x", data)
    cache = env.open(max_window_pages=16)
    stream = cache.new_stream()
    pages = [30, 5, 20, 10, 35, 15, 25, 0, 38]  # every jump is more than 2 pages
    for page in pages:
        offset = page * P + 4096
        assert cache.read(v, offset, K128, stream) == data[offset:offset + K128]
    settle(cache)
    assert env.source.fetched_pages(v) == sorted(pages)
    assert env.metrics.get("readahead_pages_total") == 0


# ---- open page files -------------------------------------------------------------------------

def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_open_page_files_close_only_idle_descriptors(tmp_path: Path) -> None:
    paths = {}
    for i in range(4):
        paths[bytes([i])] = str(tmp_path / f"p{i}")
        Path(paths[bytes([i])]).write_bytes(b"page %d" % i)
    files = OpenPageFiles(capacity=2)
    a = files.borrow(b"\0", paths[b"\0"])
    assert files.borrow(b"\0", paths[b"\0"]) is a       # one descriptor, two users
    files.give_back(a)
    files.retire([b"\0"])                                # removed while still in use
    assert fd_is_open(a.fd) and os.pread(a.fd, 6, 0) == b"page 0"
    files.give_back(a)                                   # the last user closes it
    assert not fd_is_open(a.fd) and len(files) == 0

    held = files.borrow(b"\1", paths[b"\1"])             # stays borrowed
    idle = [files.borrow(bytes([i]), paths[bytes([i])]) for i in (2, 3)]
    for f in idle:
        files.give_back(f)
    assert len(files) == 2                               # the bound closed an idle one
    assert fd_is_open(held.fd) and os.pread(held.fd, 6, 0) == b"page 1"
    assert sum(fd_is_open(f.fd) for f in idle) == 1
    with pytest.raises(FileNotFoundError):
        files.borrow(b"\x09", str(tmp_path / "missing"))
    files.give_back(held)
    files.close_all()
    assert len(files) == 0 and not fd_is_open(held.fd)


def test_evicted_and_dropped_pages_leave_no_open_descriptor(env: Env) -> None:
    """An open descriptor of a removed page file would pin its disk space."""
    data = random_bytes(6 * P, 46)
    v = env.source.put("x", data)
    cache = env.open(capacity_bytes=3 * PAGE_FILE)
    for _ in range(2):
        assert cache.read(v, 0, len(data)) == data
        settle(cache)
    assert cache.read(v, 5 * P, P) == data[5 * P:]
    before = len(os.listdir("/proc/self/fd"))
    env.source.put("y", random_bytes(4 * P, 47))
    w = env.source.put("y", random_bytes(4 * P, 47))
    cache.read(w, 0, 4 * P)                              # evicts every page of x
    settle(cache)
    cache.drop(w)
    ours = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(env.directory)) and target.endswith("(deleted)"):
            ours.append(target)
    assert ours == []
    assert len(os.listdir("/proc/self/fd")) <= before


def test_open_page_files_under_concurrent_borrow_and_retire(tmp_path: Path) -> None:
    """Readers, removals and the bound racing: every read gets an open descriptor of the
    right file, and nothing is closed twice or left open."""
    pids = [bytes([i]) for i in range(6)]
    for pid in pids:
        (tmp_path / pid.hex()).write_bytes(pid * 8)
    files = OpenPageFiles(capacity=3)
    opened: set[int] = set()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                pid = rng.choice(pids)
                if rng.random() < 0.1:
                    files.retire([pid])
                    continue
                entry = files.borrow(pid, str(tmp_path / pid.hex()))
                opened.add(entry.fd)
                assert os.pread(entry.fd, 8, 0) == pid * 8
                files.give_back(entry)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(files) <= 3
    files.close_all()
    still_open = [fd for fd in opened if fd_is_open(fd)
                  and os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))]
    assert still_open == []


# ---- reads that must not wait (the adapter holds llfuse's lock) ------------------------------

def test_read_if_ready_serves_ready_pages_and_refuses_the_rest_without_side_effects(
        env: Env) -> None:
    data = random_bytes(4 * P, 48)
    v = env.source.put("x", data)
    cache = env.open()
    assert cache.read_if_ready(v, 0, 4096) is None       # MISSING: nothing claimed
    assert cache.state(v, 0) is PageState.MISSING and env.source.call_count() == 0
    assert cache.read(v, 0, 2 * P) == data[:2 * P]
    settle(cache)
    env.source.reset()
    # READY, but their files are not open yet: opening may wait for the disk.
    assert cache.read_if_ready(v, P - 10, 20) is None
    assert cache.read(v, P - 10, 20) == data[P - 10:P + 10]              # opens them
    assert cache.read_if_ready(v, P - 10, 20) == data[P - 10:P + 10]     # two READY pages
    assert cache.read_if_ready(v, P, 3 * P) is None       # pages 2 and 3 are not READY
    assert env.source.call_count() == 0 and cache.state(v, 2) is PageState.MISSING
    assert cache.read_if_ready(v, 4 * P, 10) == b""       # past the end
    assert env.metrics.get("read_cache_hit_bytes") == 40


def test_read_if_ready_does_not_wait_for_the_disk(env: Env) -> None:
    """A page file whose bytes are not in the kernel's page cache would make the caller
    wait for the disk while holding llfuse's lock: refused, and ``read`` serves it."""
    data = random_bytes(P, 49)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, P)
    settle(cache)
    fd = os.open(page_path(env.directory, v, 0), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert cache.read_if_ready(v, 0, 4096) is None
    assert cache.read(v, 0, 4096) == data[:4096]          # from disk, no fetch
    assert env.source.call_count() == 1                   # the first read's only
    assert cache.read_if_ready(v, 0, 4096) == data[:4096]  # in memory again


def test_read_if_ready_finds_a_damaged_page_and_leaves_it_to_read(env: Env) -> None:
    data = random_bytes(2 * P, 50)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, 2 * P)
    settle(cache)
    cache.read(v, 0, 2 * P)  # a hit: the page files are open now
    path = page_path(env.directory, v, 1)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    env.source.reset()
    assert cache.read_if_ready(v, 0, 2 * P) is None
    assert cache.state(v, 1) is PageState.MISSING and env.source.call_count() == 0
    assert cache.read(v, 0, 2 * P) == data
    assert env.source.fetched_pages(v) == [1]


def test_sequential_hits_through_read_if_ready_still_read_ahead(env: Env) -> None:
    data = random_bytes(16 * P, 51)
    v = env.source.put("x", data)
    cache = env.open()
    stream = cache.new_stream()
    assert cache.read(v, 0, P, stream) == data[:P]
    settle(cache)
    served = P
    while served < len(data):
        piece = cache.read_if_ready(v, served, 128 * 1024, stream)
        if piece is None:
            piece = cache.read(v, served, 128 * 1024, stream)
        assert piece == data[served:served + len(piece)]
        served += len(piece)
    settle(cache)
    assert env.source.fetched_pages(v) == list(range(16))  # each page once
    assert env.source.call_count() < 16                   # ahead of the reader, coalesced


def test_the_hit_path_never_waits_behind_an_index_commit(env: Env, monkeypatch) -> None:
    """Storing pages commits their index entries, an LMDB write that can wait for the disk
    or another transaction; a hit, which the FUSE adapter serves holding llfuse's lock, must
    not wait for it (issue 13, item 17)."""
    data = random_bytes(3 * P, 60)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, P)
    settle(cache)
    assert cache.read(v, 0, 4096) == data[:4096]  # its file is open now
    entered, release = threading.Event(), threading.Event()
    original = cache._index.put

    def slow_put(entries):
        entered.set()
        assert release.wait(30)
        return original(entries)

    monkeypatch.setattr(cache._index, "put", slow_put)
    threading.Thread(target=lambda: cache.read(v, 2 * P, 10), daemon=True).start()
    assert entered.wait(10)  # a writer thread is inside the commit of page 2
    done = threading.Event()
    result: list[bytes | None] = []

    def hit() -> None:
        result.append(cache.read_if_ready(v, 100, 4096))
        done.set()

    threading.Thread(target=hit, daemon=True).start()
    try:
        assert done.wait(5), "a hit waited for an index commit"
        assert result[0] in (data[100:4196], None)  # None only if the kernel dropped it
    finally:
        release.set()
    settle(cache)
    assert cache.state(v, 2) is PageState.READY


def test_the_hit_path_never_opens_a_file(env: Env, monkeypatch) -> None:
    data = random_bytes(P, 61)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, P)
    settle(cache)
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or
                        real_open(path, *a, **k))
    assert cache.read_if_ready(v, 0, 4096) is None
    assert opened == []
    assert cache.read(v, 0, 4096) == data[:4096]
    assert len(opened) == 1


def test_pages_just_fetched_are_read_from_memory(env: Env) -> None:
    """A sequential reader reads what readahead fetched moments ago from memory: no
    page-file read, no checksum; ``objfs cache drop`` forgets them too."""
    data = random_bytes(8 * P, 62)
    v = env.source.put("x", data)
    cache = env.open(fresh_bytes=16 * P, max_window_pages=8)
    stream = cache.new_stream()
    got = b"".join(bytes(cache.read(v, off, K128, stream, zero_copy=True))
                   for off in range(0, len(data), K128))
    assert got == data
    settle(cache)
    reads = []
    real = cache._read_chunks
    cache._read_chunks = lambda *a, **k: reads.append(a) or real(*a, **k)
    assert cache.read(v, 3 * P + 5, 100) == data[3 * P + 5:3 * P + 105]
    assert cache.read_if_ready(v, 7 * P, 10) == data[7 * P:7 * P + 10]
    assert reads == [] and env.metrics.get("read_fresh_bytes") > 0
    assert cache.drop(v) == 8
    env.source.reset()
    assert cache.read(v, 0, 10) == data[:10]
    assert env.source.fetched_pages(v) == [0]  # not from memory after the drop


def test_zero_copy_reads_give_the_right_bytes(env: Env) -> None:
    data = random_bytes(3 * P, 63)
    v = env.source.put("x", data)
    cache = env.open()
    cache.read(v, 0, len(data))
    settle(cache)
    for off, size in ((0, K128), (P - 100, 300), (2 * P + 7, 4096), (0, 3 * P)):
        first = bytes(cache.read(v, off, size, zero_copy=True))  # consumed at once
        assert first == data[off:off + size]
        got = cache.read_if_ready(v, off, size, zero_copy=True)
        assert got is None or bytes(got) == data[off:off + size]


def test_a_sequential_reader_of_ready_pages_gets_their_files_opened_ahead(env: Env) -> None:
    data = random_bytes(12 * P, 64)
    v = env.source.put("x", data)
    cache = env.open(max_window_pages=8)
    cache.read(v, 0, len(data))
    settle(cache)
    cache._files.close_all()  # a remount: nothing open, nothing fresh
    stream = cache.new_stream()
    for off in range(0, 3 * P, K128):
        assert cache.read(v, off, K128, stream) == data[off:off + K128]
    cache._warmer.submit(lambda: None).result(10)  # the warmer has caught up
    assert len(cache._files) >= 8
    assert env.metrics.get("readahead_warmed_pages_total") > 0
    # Pages ahead are open now: the hit path serves them without opening anything.
    assert cache.read_if_ready(v, 6 * P, 4096) in (data[6 * P:6 * P + 4096], None)


def test_open_page_files_budget_follows_the_descriptor_limit(monkeypatch) -> None:
    """Half of the soft RLIMIT_NOFILE minus 1024 for the rest of the daemon, within bounds:
    a 1 GiB random working set (1,024 pages) stays open under the usual 1,048,576 limit."""
    from objfs.cache import pagecache

    def limit(soft):
        monkeypatch.setattr(pagecache.resource, "getrlimit", lambda _: (soft, soft))
        return pagecache.open_page_files_budget()

    assert limit(1024) == 256  # the floor: a low limit keeps what objfs always kept
    assert limit(20000) == (20000 - 1024) // 2
    assert limit(1048576) == 16384  # the ceiling: 16 GiB of pages
    assert limit(pagecache.resource.RLIM_INFINITY) == 16384


def test_the_daemon_raises_its_soft_descriptor_limit_to_the_hard_one() -> None:
    import resource

    from objfs.daemon import raise_open_files_limit

    was, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        assert raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (was, hard))
