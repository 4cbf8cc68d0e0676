"""The daemon's side of the master (``master.agent``) against a real master, without FUSE.

Each "host" is what a daemon runs for ``--master``: its own event-loop thread, a real
``PageCache`` over an in-memory counting origin (``FakeSource``: the tests know exactly which
pages left the origin), a ``MutableMembership``, an ``ExtentFetcher`` and a ``MasterAgent``
whose heartbeats the test sends (``beat``), so nothing depends on timing. The master is an
in-process ``MasterService`` over real HTTP with a fake origin lister of the same objects
(``tests.mastersim``). The same cases with real mounts are in tests/fuse/test_preload.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from objfs.cache.pagecache import PageCache, PageState
from objfs.cache.pages import PAGE_SIZE, ObjectVersion
from objfs.cache.preload import ExtentFetcher
from objfs.cache.ring import Ring, extent_range, extents
from objfs.cache.sources import SourceChain
from objfs.cluster import MutableMembership
from objfs.loop import EventLoopThread
from objfs.master.agent import MasterAgent, pin_holder
from objfs.master.protocol import Origin, normalize_endpoint
from objfs.metrics import Metrics
from objfs.store import ObjectInfo
from tests.conftest import free_port
from tests.mastersim import MasterHarness
from tests.unit.test_pagecache import PAGE_FILE, FakeSource, random_bytes

P = PAGE_SIZE
BUCKET = "data"
ENDPOINT = "http://origin.test:9000"


class Lister:
    """The master's view of the same objects (``master.origin.OriginLister``)."""

    def __init__(self, infos: dict[str, ObjectInfo]) -> None:
        self.infos = infos

    def first_key(self, bucket: str, prefix: str) -> str | None:
        return next((k for k in sorted(self.infos) if k.startswith(prefix)), None)

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        return self.infos.get(key)

    def head_many(self, bucket: str, keys) -> list[ObjectInfo | None]:
        return [self.infos.get(k) for k in keys]

    def list(self, bucket: str, prefix: str) -> Iterator[list[ObjectInfo]]:
        yield [i for k, i in sorted(self.infos.items()) if k.startswith(prefix)]


@dataclasses.dataclass
class Host:
    id: str
    loop: EventLoopThread
    cache: PageCache
    agent: MasterAgent
    metrics: Metrics


class World:
    def __init__(self, tmp: Path, objects: dict[str, bytes]) -> None:
        self.tmp = tmp
        self.source = FakeSource()
        self.versions: dict[str, ObjectVersion] = {}
        infos = {}
        for key, data in objects.items():
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            self.source.objects[(key, etag)] = data
            self.versions[key] = ObjectVersion(BUCKET, key, etag, len(data))
            infos[key] = ObjectInfo(key, len(data), etag, 0)
        (tmp / "master").mkdir()
        self.master = MasterHarness(tmp / "master", ENDPOINT, origin=Lister(infos))
        self.master.start()
        self.hosts: list[Host] = []

    def add_host(self, capacity_pages: int = 512) -> Host:
        i = len(self.hosts)
        host_id = f"127.0.0.1:{free_port()}"
        loop = EventLoopThread(f"host{i}-loop").start()
        metrics = Metrics()
        membership = MutableMembership(host_id)
        cache = PageCache(self.tmp / f"host{i}", SourceChain([self.source], metrics=metrics),
                          loop, metrics=metrics, capacity_bytes=capacity_pages * PAGE_FILE,
                          background=False, extent_pages=8,
                          owns=membership.ring().owns_page)
        membership.subscribe(lambda ring: cache.set_owner_function(ring.owns_page))
        agent = MasterAgent(self.master.client(), membership,
                            Origin(normalize_endpoint(ENDPOINT), BUCKET, ""),
                            ExtentFetcher(cache, metrics, concurrency=4), loop, metrics)
        host = Host(host_id, loop, cache, agent, metrics)
        self.hosts.append(host)
        return host

    def beat(self, hosts: list[Host] | None = None) -> None:
        for host in hosts if hosts is not None else self.hosts:
            host.agent.beat()

    def run(self, job_id: str, hosts: list[Host] | None = None,
            until: Callable[[dict], bool] | None = None, timeout: float = 60) -> dict:
        """Heartbeat until the job is final (or ``until(status)``); its status."""
        deadline = time.monotonic() + timeout
        client = self.master.client()
        while True:
            self.beat(hosts)
            status = client.status(job_id)
            if (until(status) if until else status["state"] in ("done", "failed",
                                                                 "cancelled")):
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.05)

    def close(self) -> None:
        for host in self.hosts:
            host.agent.stop(leave=False)
            host.loop.stop()
            host.cache.close()
        self.master.stop()


@pytest.fixture
def objects() -> dict[str, bytes]:
    sizes = {"train/a.bin": 20 * P + 123, "train/b.bin": 3 * P, "train/c.bin": 100_000,
             "train/d.bin": 9 * P, "val/e.bin": 2 * P}
    return {k: random_bytes(s, n) for n, (k, s) in enumerate(sizes.items())}


@pytest.fixture
def world(tmp_path: Path, objects) -> Iterator[World]:
    w = World(tmp_path, objects)
    try:
        yield w
    finally:
        w.close()


def train_bytes(world: World) -> int:
    return sum(v.size for k, v in world.versions.items() if k.startswith("train/"))


def test_members_preload_what_they_own_and_the_job_is_done(world: World) -> None:
    a, b = world.add_host(), world.add_host()
    world.beat()
    world.beat()  # both registered: each has the other in its member list
    assert a.agent.membership.ring().members == b.agent.membership.ring().members == \
        tuple(sorted([a.id, b.id]))
    job = world.master.client().submit(f"s3://{BUCKET}/train/")
    status = world.run(job["id"])
    assert status["state"] == "done", status
    assert status["bytes"]["done"] == train_bytes(world) and status["bytes"]["skipped"] == 0
    # Every extent is READY on its owner (the owner function of the member list), fetched
    # from the origin once.
    ring = Ring.of([a.id, b.id], a.id)
    for key, v in world.versions.items():
        if not key.startswith("train/"):
            continue
        for e in extents(v, 8):
            owner = a if ring.owner(v, e * 8) == a.id else b
            pages = extent_range(v, e, 8)
            assert set(owner.cache.states(v, pages)) == {PageState.READY}, (key, e)
    fetched = world.source.fetched_pages()
    assert len(fetched) == sum(v.page_count() for k, v in world.versions.items()
                               if k.startswith("train/"))
    # Pinned while the job ran; released once the members hear it is done.
    world.beat()
    assert a.cache.pin_holders() == [] and b.cache.pin_holders() == []
    assert a.cache.usage()["pinned_bytes"] == 0

    # A second preload of the same data: everything skipped, nothing from the origin.
    world.source.reset()
    again = world.run(world.master.client().submit(f"s3://{BUCKET}/train/")["id"])
    assert again["state"] == "done"
    assert again["bytes"]["skipped"] == train_bytes(world) and again["bytes"]["done"] == 0
    assert again["files"]["skipped"] == again["files"]["total"] == 4
    assert world.source.calls == []


def test_a_master_that_is_down_stops_nothing(world: World) -> None:
    a = world.add_host()
    world.beat()
    job = world.master.client().submit(f"s3://{BUCKET}/")
    world.run(job["id"], until=lambda s: not s["listing"] and s["extents"]["total"] > 0)
    world.beat()  # takes the work
    members = a.agent.membership.ring().members
    world.master.stop()
    deadline = time.monotonic() + 30
    while a.agent.describe()["extents_held"]:  # the extents run without the master
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not a.agent.beat()
    info = a.agent.describe()
    assert info["state"] == "unreachable" and info["results_pending"] > 0
    assert a.agent.membership.ring().members == members  # the last list is kept
    world.master.start()  # resumes from its state
    status = world.run(job["id"])
    assert status["state"] == "done", status
    assert status["bytes"]["done"] == sum(v.size for v in world.versions.values())
    assert a.agent.describe()["results_pending"] == 0


def test_cancel_stops_fetching_and_releases_the_pins(world: World) -> None:
    a = world.add_host()
    world.beat()
    job = world.master.client().submit(f"s3://{BUCKET}/", bandwidth_limit=2 * P)
    world.run(job["id"], until=lambda s: s["bytes"]["done"] >= 2 * P)
    assert a.cache.pin_holders() == [pin_holder(job["id"])]
    world.master.client().cancel(job["id"])
    world.beat()
    time.sleep(0.5)  # a run already sent may finish
    calls = len(world.source.calls)
    time.sleep(2.0)  # at 2 MiB/s, anything still running would fetch more
    assert len(world.source.calls) == calls
    assert a.cache.pin_holders() == [] and a.agent.describe()["extents_held"] == 0
    status = world.master.client().status(job["id"])
    assert status["state"] == "cancelled"
    assert status["bytes"]["done"] < sum(v.size for v in world.versions.values())


def test_a_cache_full_of_pinned_pages_fails_the_rest(world: World) -> None:
    a = world.add_host(capacity_pages=12)
    world.beat()
    job = world.master.client().submit(f"s3://{BUCKET}/train/a.bin")
    status = world.run(job["id"])
    assert status["state"] == "failed", status
    assert "not kept" in status["errors"][0]["error"]
    # The job never evicted its own pages: the cache is full of them.
    v = world.versions["train/a.bin"]
    assert a.cache.states(v, range(v.page_count())).count(PageState.READY) == 12


def test_each_member_keeps_to_its_share_of_the_bandwidth_limit(world: World) -> None:
    a, b = world.add_host(), world.add_host()
    world.beat()
    world.beat()
    limit = 8 * P  # the job's; 4 MiB/s for each of the two members
    t0 = time.monotonic()
    job = world.master.client().submit(f"s3://{BUCKET}/train/", bandwidth_limit=limit)
    status = world.run(job["id"])
    elapsed = time.monotonic() - t0
    assert status["state"] == "done"
    # A member learns that the job ended from the heartbeat after the one that finished it.
    world.beat()
    assert a.agent.describe()["jobs"] == {} and b.agent.describe()["jobs"] == {}
    # Each member may start with a second's worth in its bucket and owes the rest.
    shares = [h["bytes_done"] for h in status["hosts"].values()]
    floor = max(shares) / (limit / 2) - 1 - 8 * P / (limit / 2)
    assert elapsed >= floor, (elapsed, shares)
