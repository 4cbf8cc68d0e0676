"""Unit tests of what the page cache does for a cluster, over in-memory sources:

- fetch runs are cut at extent boundaries (one owner per run) only when asked to;
- fetch slots are a priority gate: a demand read does not queue behind readahead or preload,
  and a reader that catches up with a queued readahead run promotes it;
- replica-aware eviction: pages this host does not own go first; a membership change
  reclassifies the resident pages;
- the owner side (``claim_for_peer``) never asks a cache source (an owner never forwards),
  and ``fetch_pages`` (preload) fetches what is not READY.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from objfs.cache.limits import Priority
from objfs.cache.pagecache import PageCache, PageState
from objfs.cache.pages import PAGE_SIZE, ObjectVersion, page_id
from objfs.cache.sources import SourceChain, SourceMiss
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from tests.unit.test_pagecache import PAGE_FILE, FakeSource, random_bytes, settle

P = PAGE_SIZE


@pytest.fixture
def loop():
    thread = EventLoopThread("test-loop").start()
    try:
        yield thread
    finally:
        thread.stop()


class HeldSource(FakeSource):
    """A FakeSource whose fetches wait until the test releases them (by key)."""

    def __init__(self) -> None:
        super().__init__()
        self.release: dict[str, threading.Event] = {}
        self.started: list[tuple[str, int]] = []  # (key, first page) in start order
        self._start_lock = threading.Lock()

    def hold(self, key: str) -> threading.Event:
        return self.release.setdefault(key, threading.Event())

    async def fetch(self, version: ObjectVersion, pages: range) -> bytearray:
        with self._start_lock:
            self.started.append((version.key, pages.start))
        event = self.release.get(version.key)
        while event is not None and not event.is_set():
            await asyncio.sleep(0.002)
        return await super().fetch(version, pages)


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def open_cache(tmp_path: Path, loop, sources: list, **kwargs) -> PageCache:
    metrics = kwargs.pop("metrics", Metrics())
    kwargs.setdefault("capacity_bytes", 256 * PAGE_FILE)
    return PageCache(tmp_path / "cache", SourceChain(sources, metrics=metrics), loop,
                     metrics=metrics, background=False, **kwargs)


# ---- extents -------------------------------------------------------------------------------------

def test_runs_are_cut_at_extents_only_in_a_cluster(tmp_path: Path, loop) -> None:
    source = FakeSource()
    data = random_bytes(30 * P, 1)
    v = source.put("x", data)
    cache = open_cache(tmp_path, loop, [source], request_pages=8, extent_pages=8)
    try:
        assert cache.read(v, 5 * P, 20 * P) == data[5 * P:25 * P]
        settle(cache)
        assert [run for _, run in source.calls] == [range(5, 8), range(8, 16), range(16, 24),
                                                    range(24, 25)]
    finally:
        cache.close()
    source.reset()
    plain = open_cache(tmp_path / "plain", loop, [source], request_pages=8)
    try:
        assert plain.read(v, 5 * P, 20 * P) == data[5 * P:25 * P]
        settle(plain)
        assert [run for _, run in source.calls] == [range(5, 13), range(13, 21), range(21, 25)]
    finally:
        plain.close()


# ---- priorities ----------------------------------------------------------------------------------

def test_demand_read_does_not_queue_behind_readahead(tmp_path: Path, loop) -> None:
    source = HeldSource()
    ahead = source.put("ahead", random_bytes(20 * P, 2))
    wanted_data = random_bytes(2 * P, 3)
    wanted = source.put("wanted", wanted_data)
    source.hold("ahead")
    cache = open_cache(tmp_path, loop, [source], request_pages=1, parallelism=4)
    try:
        cache.fetch_pages(ahead, range(20), priority=Priority.READAHEAD)  # 20 one-page runs
        wait_until(lambda: len(source.started) == 3, "3 readahead runs (one slot left)")
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(cache.read(wanted, 0, P)))
        reader.start()
        reader.join(10)
        assert result == [wanted_data[:P]]  # served while all readahead is still held
        assert source.started[3] == ("wanted", 0)
        # Every slot busy now: a demand read waits, but goes before 17 queued readahead runs.
        source.hold("wanted")
        second = threading.Thread(target=lambda: result.append(cache.read(wanted, P, P)))
        second.start()
        wait_until(lambda: len(source.started) == 5, "the second demand read to start")
        assert source.started[4] == ("wanted", 1)
        source.hold("ahead").set()
        source.hold("wanted").set()
        second.join(10)
        assert result[1] == wanted_data[P:]
        settle(cache)
        assert len(source.started) == 22
    finally:
        for event in source.release.values():
            event.set()
        cache.close()


def test_a_reader_waiting_on_a_queued_readahead_run_promotes_it(tmp_path: Path, loop) -> None:
    source = HeldSource()
    blocker = source.put("blocker", random_bytes(P, 4))
    data = random_bytes(12 * P, 5)
    v = source.put("stream", data)
    source.hold("blocker")
    cache = open_cache(tmp_path, loop, [source], request_pages=1, parallelism=1)
    try:
        threading.Thread(target=lambda: cache.read(blocker, 0, 1), daemon=True).start()
        wait_until(lambda: len(source.started) == 1, "the blocking read")
        cache.fetch_pages(v, range(10), priority=Priority.READAHEAD)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(cache.read(v, 7 * P, 10)))
        reader.start()
        # The reader joined page 7's queued readahead run: once the slot frees, that run
        # goes first, ahead of pages 0-6 that were queued before it.
        wait_until(lambda: cache._tickets.get(page_id(v, 7)) is not None and
                   cache._tickets[page_id(v, 7)].priority is Priority.DEMAND, "promotion")
        source.hold("blocker").set()
        reader.join(10)
        assert got == [data[7 * P:7 * P + 10]]
        assert source.started[1] == ("stream", 7)
        settle(cache)
    finally:
        for event in source.release.values():
            event.set()
        cache.close()


def test_fetch_pages_preloads_what_is_not_ready(tmp_path: Path, loop) -> None:
    source = FakeSource()
    data = random_bytes(10 * P, 6)
    v = source.put("p", data)
    cache = open_cache(tmp_path, loop, [source])
    try:
        assert cache.read(v, 0, 2 * P) == data[:2 * P]
        settle(cache)
        source.reset()
        futures = cache.fetch_pages(v, range(0, 12))  # clipped to the object
        assert len(futures) == 8
        for fut in futures:
            fut.result(10)
        settle(cache)
        assert source.fetched_pages(v) == list(range(2, 10))
        assert all(cache.state(v, i) is PageState.READY for i in range(10))
        assert cache.fetch_pages(v, range(10)) == []
    finally:
        cache.close()


# ---- replica-aware eviction ----------------------------------------------------------------------

def owned_if_even(pid: bytes) -> bool:
    return int.from_bytes(pid[-4:], "big") % 2 == 0


def test_eviction_keeps_owned_pages_over_copies(tmp_path: Path, loop) -> None:
    source = FakeSource()
    data = random_bytes(16 * P, 7)
    v = source.put("e", data)
    cache = open_cache(tmp_path, loop, [source], capacity_bytes=8 * PAGE_FILE,
                       owns=owned_if_even, request_pages=1)
    try:
        for i in range(16):  # a sequential scan of twice the capacity
            assert cache.read(v, i * P, P) == data[i * P:(i + 1) * P]
            settle(cache)
        resident = [i for i in range(16) if cache.state(v, i) is PageState.READY]
        # Plain LRU would keep 8-15. Copies went first; the copy just read (15) pushed out
        # the least recent owned page only because no copy was left to go.
        assert resident == [2, 4, 6, 8, 10, 12, 14, 15]
    finally:
        cache.close()


def test_restart_and_membership_change_keep_the_classes(tmp_path: Path, loop) -> None:
    source = FakeSource()
    data = random_bytes(8 * P, 8)
    v = source.put("r", data)
    metrics = Metrics()
    cache = open_cache(tmp_path, loop, [source], owns=owned_if_even, metrics=metrics)
    cache.read(v, 0, 8 * P)
    settle(cache)
    assert metrics.get("cache_pages_copies") == 4
    cache.close()
    cache = open_cache(tmp_path, loop, [source], owns=owned_if_even, metrics=Metrics())
    try:
        assert cache._policy.copies == 4  # classified again on load
        cache.set_owner_function(lambda pid: True)  # e.g. the other members left
        assert cache.reclassify() == 4
        assert cache._policy.copies == 0
    finally:
        cache.close()


# ---- the owner side ------------------------------------------------------------------------------

class AlwaysPeer:
    """A cache source that applies to everything and records being asked."""

    name = "peer"

    def __init__(self) -> None:
        self.asked = 0

    def applies(self, version: ObjectVersion, pages: range) -> bool:
        return True

    async def fetch(self, version, pages, priority=Priority.DEMAND):
        self.asked += 1
        raise SourceMiss("never has anything")


def test_claim_for_peer_fetches_from_the_origin_only_and_hands_out_files(tmp_path: Path,
                                                                         loop) -> None:
    source, peer = FakeSource(), AlwaysPeer()
    data = random_bytes(4 * P + 10, 9)
    v = source.put("o", data)
    cache = open_cache(tmp_path, loop, [peer, source])
    try:
        assert cache.read(v, 0, P) == data[:P]  # a local read asks the peer first ...
        settle(cache)
        assert peer.asked == 1
        served, fetches = cache.claim_for_peer(v, range(0, 5))
        assert fetches == 1 and peer.asked == 1  # ... the owner side never does
        assert served[0].file is not None and served[0].future is None
        assert all(p.file is None and p.future is not None for p in served[1:])
        pages = [p.future.result(10) for p in served[1:]]
        assert b"".join(bytes(p) for p in pages) == data[P:]
        for page in served:
            cache.give_back(page)
        settle(cache)
        assert all(cache.state(v, i) is PageState.READY for i in range(5))
    finally:
        cache.close()


def test_claim_for_peer_treats_a_short_page_file_as_missing(tmp_path: Path, loop) -> None:
    source = FakeSource()
    data = random_bytes(2 * P, 10)
    v = source.put("s", data)
    cache = open_cache(tmp_path, loop, [source])
    try:
        cache.read(v, 0, 2 * P)
        settle(cache)
        name = page_id(v, 1).hex()
        path = tmp_path / "cache" / "data" / name[:2] / name
        with open(path, "r+b") as f:
            f.truncate(1000)
        source.reset()
        served, fetches = cache.claim_for_peer(v, range(2))
        assert served[0].file is not None and served[1].future is not None and fetches == 1
        assert bytes(served[1].future.result(10)) == data[P:]
        for page in served:
            cache.give_back(page)
        settle(cache)
        assert source.fetched_pages(v) == [1]
    finally:
        cache.close()
