"""A Hypothesis state machine over the page cache, checked against a model of expected bytes.

The machine drives a real ``PageCache`` (event-loop thread, writer threads, page files and
LMDB index in a temporary directory) with a small capacity (a few pages) over small objects
(a few pages each) served by the counting in-memory ``FakeSource`` of the unit tests. Rules
read (plain or through a sequential stream with readahead), replace objects at the origin
(a new ETag), restart the cache on the same directory, damage page files behind its back
(flip a byte, truncate, delete), drop versions and fail fetches. The model is just the bytes
of every version; the invariants, checked after the cache's writes settle, tie policy, index
and files together:

- no read returns bytes other than the model's (an injected fetch failure may raise
  ``OriginError``, never return wrong bytes);
- ``used_bytes <= capacity``;
- the page files on disk are exactly the pages the policy holds, except pages whose files the
  test itself deleted (found missing and refetched on their next read);
- the index lists exactly the resident pages, so a restart loads the same resident set;
- ``used_bytes`` is the size of those page files (header included).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from objfs.cache.format import HEADER_SIZE
from objfs.cache.pagecache import PageCache, PageState
from objfs.cache.pages import PAGE_SIZE, ObjectVersion, page_id
from objfs.cache.readahead import ReadStream
from objfs.cache.sources import SourceChain
from objfs.errors import OriginError
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from tests.unit.test_pagecache import FakeSource, page_files, settle

P = PAGE_SIZE
K128 = 128 * 1024
PAGE_FILE = HEADER_SIZE + PAGE_SIZE
KEYS = ["k0", "k1", "k2"]


def _pages_plus(pages: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Whole pages plus a part of one, with page and chunk edges drawn often."""
    within = st.one_of(st.sampled_from([0, 1, K128 - 1, K128, P // 2, P - 2, P - 1]),
                       st.integers(0, P - 1))
    return st.builds(lambda n, extra: n * P + extra, pages, within)


SIZES = _pages_plus(st.integers(0, 3))           # objects of up to 4 pages
OFFSETS = _pages_plus(st.integers(0, 4))         # up to past the end of the largest
READ_SIZES = st.one_of(st.sampled_from([0, 1, 2, K128, P, P + 1, 2 * P, 3 * P, 5 * P]),
                       st.integers(0, 3 * P))


class PageCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="objfs-model-"))
        self.loop = EventLoopThread("model-loop").start()
        self.source = FakeSource()
        self.metrics = Metrics()
        self.cache: PageCache | None = None
        self.capacity = 0
        self.policy = "lru"
        self.expected: dict[ObjectVersion, bytes] = {}  # the model: bytes of every version
        self.current: dict[str, ObjectVersion] = {}     # key -> its version at the origin
        self.streams: dict[str, ReadStream] = {}        # key -> a sequential reader
        self.deleted: set[bytes] = set()                # page files removed by the test
        self.damaged: set[bytes] = set()                # page files cut short by the test
        self.seed = 0

    # ---- helpers ---------------------------------------------------------------------------

    def _open(self) -> PageCache:
        # One writer thread keeps a failing example replayable: with two, the order in which
        # runs are stored varies between replays. Races between writer threads are covered
        # by deterministic unit tests (tests/unit/test_pagecache.py).
        return PageCache(self.directory, SourceChain([self.source], metrics=self.metrics),
                         self.loop, metrics=self.metrics, capacity_bytes=self.capacity,
                         policy=self.policy, request_pages=4, max_window_pages=4,
                         writer_threads=1, background=False)

    def _put(self, key: str, size: int) -> ObjectVersion:
        self.seed += 1
        data = random.Random(self.seed).randbytes(size)
        version = self.source.put(key, data)
        self.expected[version] = data
        self.current[key] = version
        self.streams.pop(key, None)
        return version

    def _resident(self) -> set[bytes]:
        assert self.cache is not None
        with self.cache._lock:
            return {bytes(p) for p in self.cache._policy.pages()}

    def _check_read(self, version: ObjectVersion, offset: int, size: int,
                    stream: ReadStream | None = None, may_fail: bool = False) -> None:
        assert self.cache is not None
        want = self.expected[version][offset:offset + size]
        try:
            got = self.cache.read(version, offset, size, stream)
        except OriginError:
            if may_fail:
                return
            raise
        assert got == want, (f"{version.key} {version.etag} [{offset}, +{size}): "
                             f"{len(got)} bytes, expected {len(want)}, "
                             f"{'equal length, different bytes' if len(got) == len(want) else ''}")

    def _page_of(self, pid: bytes) -> tuple[ObjectVersion, int]:
        for version in self.expected:
            for index in range(version.page_count()):
                if page_id(version, index) == pid:
                    return version, index
        raise AssertionError(f"page file {pid.hex()} of no known version")

    def _read_back(self, pid: bytes) -> None:
        """Read the whole page a damaged file belonged to: it must come back intact."""
        version, index = self._page_of(pid)
        self._check_read(version, index * P, P)

    def _pick_file(self, choice: int) -> tuple[bytes, Path] | None:
        settle(self.cache)
        files = sorted(page_files(self.directory))
        if not files:
            return None
        pid = files[choice % len(files)]
        name = pid.hex()
        return pid, self.directory / "data" / name[:2] / name

    # ---- rules -----------------------------------------------------------------------------

    @initialize(pages=st.integers(1, 3), policy=st.sampled_from(["lru", "lru", "uniform"]),
                sizes=st.lists(SIZES, min_size=len(KEYS), max_size=len(KEYS)))
    def start(self, pages: int, policy: str, sizes: list[int]) -> None:
        self.capacity = pages * PAGE_FILE
        self.policy = policy
        for key, size in zip(KEYS, sizes):
            self._put(key, size)
        self.cache = self._open()

    @rule(key=st.sampled_from(KEYS), offset=OFFSETS, size=READ_SIZES)
    def read(self, key: str, offset: int, size: int) -> None:
        self._check_read(self.current[key], offset, size)

    @rule(data=st.data(), offset=OFFSETS, size=READ_SIZES)
    def read_any_version(self, data: st.DataObject, offset: int, size: int) -> None:
        """Old versions stay readable at this origin (an open handle keeps its version)."""
        versions = sorted(self.expected, key=lambda v: (v.key, v.etag))
        version = data.draw(st.sampled_from(versions))
        self._check_read(version, offset, size)

    @rule(key=st.sampled_from(KEYS), chunks=st.integers(1, 24), jump=st.booleans(),
          start=st.integers(0, 3))
    def read_sequential(self, key: str, chunks: int, jump: bool, start: int) -> None:
        version = self.current[key]
        stream = self.streams.get(key)
        if stream is None or jump:
            stream = self.streams[key] = self.cache.new_stream()
            offset = start * P
        else:
            offset = stream.next_offset
        for _ in range(chunks):
            if offset >= version.size:
                break
            self._check_read(version, offset, K128, stream)
            offset += K128

    @rule(key=st.sampled_from(KEYS), offset=OFFSETS, size=READ_SIZES)
    def read_with_failing_origin(self, key: str, offset: int, size: int) -> None:
        self.source.fail_next(OriginError("injected", status=503))
        self._check_read(self.current[key], offset, size, may_fail=True)
        settle(self.cache)
        with self.source._lock:  # keep nothing pending for later rules
            self.source._failures.clear()
        # Whatever failed is MISSING again; what was read is still served correctly.
        self._check_read(self.current[key], offset, size)

    @rule(key=st.sampled_from(KEYS), size=SIZES)
    def replace_at_origin(self, key: str, size: int) -> None:
        old = self.current[key]
        new = self._put(key, size)
        assert new.etag != old.etag
        assert all(self.cache.state(new, i) is PageState.MISSING
                   for i in range(new.page_count()))

    @rule()
    def restart(self) -> None:
        settle(self.cache)
        self.cache.close()
        self.cache = None
        self.cache = self._open()

    @rule(choice=st.integers(0, 1000), position=st.integers(0, PAGE_FILE - 1),
          read_back=st.booleans())
    def corrupt_page_file(self, choice: int, position: int, read_back: bool) -> None:
        picked = self._pick_file(choice)
        if picked is None:
            return
        pid, path = picked
        with open(path, "r+b") as f:
            size = f.seek(0, 2)
            if size == 0:  # truncated to nothing earlier
                return
            f.seek(position % size)
            byte = f.read(1)
            f.seek(position % size)
            f.write(bytes([byte[0] ^ 0x10]))
        if read_back:
            self._read_back(pid)

    @rule(choice=st.integers(0, 1000),
          keep=st.one_of(st.sampled_from([HEADER_SIZE + n * K128 for n in range(8)]),
                         st.integers(0, PAGE_FILE - 1)),
          read_back=st.booleans())
    def truncate_page_file(self, choice: int, keep: int, read_back: bool) -> None:
        """A torn write or a file cut short by a crash: shorter than its header says (cut at
        a chunk boundary, the bytes that remain all verify)."""
        picked = self._pick_file(choice)
        if picked is None:
            return
        pid, path = picked
        size = path.stat().st_size
        if keep < size:
            os.truncate(path, keep)
            self.damaged.add(pid)
        if read_back:
            self._read_back(pid)

    @rule(choice=st.integers(0, 1000), read_back=st.booleans())
    def delete_page_file(self, choice: int, read_back: bool) -> None:
        picked = self._pick_file(choice)
        if picked is None:
            return
        pid, path = picked
        path.unlink()
        self.deleted.add(pid)
        if read_back:
            self._read_back(pid)

    @rule(data=st.data())
    def drop_version(self, data: st.DataObject) -> None:
        settle(self.cache)
        versions = sorted(self.expected, key=lambda v: (v.key, v.etag))
        version = data.draw(st.sampled_from(versions))
        self.cache.drop(version)
        for i in range(version.page_count()):
            assert self.cache.state(version, i) is PageState.MISSING
        files = page_files(self.directory)
        assert not any(page_id(version, i) in files for i in range(version.page_count()))

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def consistent_after_settling(self) -> None:
        if self.cache is None:
            return
        settle(self.cache)
        cache = self.cache
        assert cache.used_bytes <= self.capacity
        resident = self._resident()
        files = page_files(self.directory)
        self.deleted -= set(files)  # refetched and stored again
        orphans = set(files) - resident
        assert not orphans, f"{len(orphans)} page files the cache does not account for"
        missing = resident - set(files)
        assert missing <= self.deleted, f"{len(missing - self.deleted)} resident pages lost"
        with cache._lock:
            sizes = {bytes(p): s for p, s in cache._policy.sizes().items()}
        self.damaged &= resident
        assert all(files[pid] == sizes[pid] for pid in files if pid not in self.damaged)
        assert cache.used_bytes == sum(sizes.values())
        indexed = {pid for pid, _, _ in cache._index.entries()}
        assert indexed == resident, (f"index has {len(indexed - resident)} pages not resident, "
                                     f"misses {len(resident - indexed)} resident")

    def teardown(self) -> None:
        try:
            if self.cache is not None:
                settle(self.cache)
                self.cache.close()
        finally:
            self.loop.stop()
            shutil.rmtree(self.directory, ignore_errors=True)


# Shrinking is off by default: each step drives threads, files and LMDB, so minimising a
# failure can take minutes (longer than the suite's per-test timeout) while the unshrunk
# steps, at most a dozen, are printed anyway. OBJFS_MODEL_SHRINK=1 turns it on to minimise.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("OBJFS_MODEL_SHRINK") == "1":
    _PHASES.append(Phase.shrink)

PageCacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=20, deadline=None, phases=_PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_pagecache_model = PageCacheMachine.TestCase
