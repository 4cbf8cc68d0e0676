"""The peer cache between real page caches over real HTTP on loopback, without FUSE.

Each "host" is what a daemon runs for ``--peer-listen``: its own event-loop thread (uvloop),
a ``PageCache`` in its own directory, and a ``PeerService`` (tracker, ``PeerSource`` in front
of the origin, ``PeerServer`` on a loopback port). The origin is the counting in-memory
``FakeSource`` of the unit tests, shared by all hosts, so every test can say exactly which
pages left the origin and how often. The cluster tests with real mounts are in
tests/fuse/test_cluster.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from objfs.cache.format import HEADER_SIZE, decode_header
from objfs.cache.limits import TokenBucket
from objfs.cache.pagecache import PageCache, PageState
from objfs.cache.pages import PAGE_SIZE, ObjectVersion, page_id
from objfs.cache.peer import PAGES_PATH, PeerService, PeerSettings, encode_query, \
    version_query
from objfs.cache.ring import Ring
from objfs.cache.sources import SourceChain
from objfs.cluster import MutableMembership, sign
from objfs.errors import OriginError
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from tests.conftest import free_port
from tests.unit.test_pagecache import FakeSource, in_threads, page_path, random_bytes, settle

P = PAGE_SIZE
SECRET = b"integration-test-secret-0123456789"
BUCKET = "bkt"


class Clock:
    """A settable monotonic clock for backoffs (the tests never sleep through one)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Host:
    id: str
    loop: EventLoopThread
    cache: PageCache
    peers: PeerService
    metrics: Metrics
    directory: Path

    def read(self, version: ObjectVersion, offset: int = 0, size: int | None = None) -> bytes:
        return self.cache.read(version, offset, version.size if size is None else size)

    def m(self, name: str) -> float:
        return self.metrics.get(name)

    def labeled(self, name: str, peer: str) -> float:
        return self.metrics.labeled().get(name, {}).get((("peer", peer),), 0)

    def describe(self) -> dict:
        return self.loop.run(_call(self.peers.describe))


async def _no_sleep(seconds: float) -> None:
    return None


async def _call(fn):
    return fn()


class Cluster:
    def __init__(self, tmp: Path, origin: FakeSource, clock: Clock) -> None:
        self.tmp = tmp
        self.origin = origin
        self.clock = clock
        self.hosts: list[Host] = []
        self.ids: list[str] = []

    def start(self, n: int, *, capacity_pages: int = 256, settings: PeerSettings | None = None,
              serve_limit: int | None = None, prefix: str = "", **cache_kwargs) -> list[Host]:
        self.ids = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        for i, host_id in enumerate(self.ids):
            loop = EventLoopThread(f"host{i}-loop").start()
            metrics = Metrics()
            membership = MutableMembership(host_id, initial=self.ids)
            # The test clock never moves by itself and the wait is skipped: the first
            # request's debt is still there for the next one.
            limit = TokenBucket(serve_limit, clock=self.clock, sleep=_no_sleep) \
                if serve_limit else None
            peers = PeerService(membership, SECRET, metrics, bucket=BUCKET, prefix=prefix,
                                listen=("127.0.0.1", int(host_id.rsplit(":", 1)[1])),
                                settings=settings or PeerSettings(), serve_limit=limit,
                                clock=self.clock)
            ring = membership.ring()
            directory = self.tmp / f"host{i}"
            cache = PageCache(directory, SourceChain([peers.source, self.origin],
                                                     metrics=metrics),
                              loop, metrics=metrics, capacity_bytes=capacity_pages * (
                                  HEADER_SIZE + P), background=False,
                              extent_pages=ring.extent_pages, owns=ring.owns_page,
                              **cache_kwargs)
            membership.subscribe(lambda r, c=cache: c.set_owner_function(r.owns_page))
            loop.run(peers.start(cache), timeout=10)
            self.hosts.append(Host(host_id, loop, cache, peers, metrics, directory))
        return self.hosts

    def ring(self, host: Host | None = None) -> Ring:
        return (host or self.hosts[0]).peers.membership.ring()

    def owner(self, version: ObjectVersion, index: int) -> Host:
        owner_id = self.ring().owner(version, index)
        return next(h for h in self.hosts if h.id == owner_id)

    def stop_server(self, host: Host) -> None:
        host.loop.run(host.peers.stop(), timeout=10)

    def close(self) -> None:
        for host in self.hosts:
            try:
                settle(host.cache)
            except AssertionError:
                pass
            try:
                host.loop.run(host.peers.stop(), timeout=10)
            except Exception:
                pass
            host.cache.close()
            host.loop.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def origin() -> FakeSource:
    return FakeSource()


@pytest.fixture
def cluster(tmp_path: Path, origin: FakeSource, clock: Clock) -> Iterator[Cluster]:
    c = Cluster(tmp_path, origin, clock)
    try:
        yield c
    finally:
        c.close()


def settle_all(cluster: Cluster) -> None:
    for host in cluster.hosts:
        settle(host.cache)


def member(host: Host, other: Host) -> dict:
    """What ``host`` says about ``other`` (``objfs peers``)."""
    return {m["id"]: m for m in host.describe()["members"]}[other.id]


def pages_owned(cluster: Cluster, version: ObjectVersion, host: Host) -> list[int]:
    ring = cluster.ring()
    return [i for i in range(version.page_count()) if ring.owner(version, i) == host.id]


def find_version(origin: FakeSource, cluster: Cluster, data: bytes, want) -> ObjectVersion:
    """Put ``data`` under the first key whose ownership satisfies ``want(version)``."""
    for n in range(500):
        version = origin.put(f"obj-{n}", data, bucket=BUCKET)
        if want(version):
            return version
    raise AssertionError("no key with the wanted ownership")


# ---- the basic exchange -------------------------------------------------------------------------

def test_pages_owned_elsewhere_come_from_their_owner_who_keeps_them(cluster, origin):
    a, b = cluster.start(2)
    data = random_bytes(40 * P + 123, 1)  # 6 extents
    v = find_version(origin, cluster, data, lambda v: 0 < len(pages_owned(cluster, v, a)) < 41)
    assert a.read(v) == data
    settle_all(cluster)
    # Every page left the origin once: A's own extents to A, B's extents to B (for A).
    assert origin.fetched_pages(v) == list(range(41))
    b_pages = pages_owned(cluster, v, b)
    assert all(b.cache.state(v, i) is PageState.READY for i in b_pages)
    assert all(a.cache.state(v, i) is PageState.READY for i in range(41))
    assert a.m("read_peer_bytes") == a.m("peer_in_bytes") == sum(
        v.page_length(i) for i in b_pages)
    assert a.m("peer_requests_total") == len({i // 8 for i in b_pages}) == \
        b.m("peer_served_requests_total") == b.m("peer_owner_fetches_total")
    assert b.m("peer_out_bytes") == sum(HEADER_SIZE + v.page_length(i) for i in b_pages)
    assert a.m("peer_fallbacks_total") == 0 and a.m("peer_failures_total") == 0
    assert a.labeled("peer_in_bytes", b.id) == a.m("peer_in_bytes")
    assert b.labeled("peer_out_bytes", a.id) == b.m("peer_out_bytes")

    # B reads the same file: its own pages are READY, A's pages come from A: no origin.
    origin.reset()
    assert b.read(v) == data
    settle_all(cluster)
    assert origin.fetched_pages(v) == []
    # Served from READY page files: zero-copy.
    assert a.m("peer_out_sendfile_bytes") == a.m("peer_out_bytes") > 0


def test_runs_never_cross_an_extent_and_self_owned_runs_skip_the_peer(cluster, origin):
    a, b = cluster.start(2)
    data = random_bytes(64 * P, 2)
    v = origin.put("big", data, bucket=BUCKET)
    assert a.read(v) == data
    settle_all(cluster)
    for _version, run in origin.calls:
        assert run.start // 8 == (run.stop - 1) // 8, run
    a_runs = {i // 8 for i in pages_owned(cluster, v, a)}
    # A asked B once per extent B owns, never for its own.
    assert a.m("peer_requests_total") == 8 - len(a_runs)


def test_four_hosts_reading_at_once_fetch_every_page_from_the_origin_once(cluster, origin):
    origin.latency_s = 0.05  # so that the hosts really overlap
    hosts = cluster.start(4)
    data = random_bytes(48 * P + 5, 3)
    v = origin.put("shared", data, bucket=BUCKET)

    def reader(i: int) -> bytes:
        host = hosts[i % 4]
        stream = host.cache.new_stream()
        return b"".join(host.cache.read(v, off, 128 * 1024, stream)
                        for off in range(0, len(data), 128 * 1024))

    results = in_threads(8, reader)
    assert all(r == data for r in results), [type(r) for r in results if r != data]
    settle_all(cluster)
    assert origin.fetched_pages(v) == list(range(49))  # each page exactly once
    assert sum(h.m("peer_fallbacks_total") for h in hosts) == 0


def test_single_flight_at_the_owner_across_askers(cluster, origin):
    origin.latency_s = 0.2
    hosts = cluster.start(3)
    data = random_bytes(8 * P, 4)
    v = origin.put("one-extent", data, bucket=BUCKET)
    owner = cluster.owner(v, 0)
    askers = [h for h in hosts if h is not owner]
    results = in_threads(6, lambda i: askers[i % 2].read(v))
    assert all(r == data for r in results)
    settle_all(cluster)
    assert origin.call_count() == 1
    assert owner.m("peer_owner_fetches_total") == 1  # one origin fetch, however many asked


# ---- failures are misses ------------------------------------------------------------------------

@pytest.mark.parametrize(("offset", "error"), [
    (HEADER_SIZE + 1000, "page 3: checksum mismatch in chunk 0"),  # data: the chunk's sum
    (100, "page 3: header checksum mismatch"),  # the header (B has it verified in memory)
])
def test_corrupt_page_at_the_owner_is_detected_read_from_the_origin_and_reported(
        cluster, origin, offset, error):
    a, b = cluster.start(2)
    data = random_bytes(16 * P, 5)
    v = find_version(origin, cluster, data, lambda v: cluster.ring().owner(v, 0) == b.id)
    assert b.read(v, 0, 8 * P) == data[:8 * P]  # B caches its extent 0
    assert b.read(v, 3 * P, 10) == data[3 * P:3 * P + 10]  # (and B's header cache has page 3)
    settle_all(cluster)
    path = page_path(b.directory, v, 3)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(raw)
    origin.reset()
    assert a.read(v, 0, 8 * P) == data[:8 * P]  # byte-exact, from the origin
    settle_all(cluster)
    assert origin.fetched_pages(v) == list(range(8))
    assert a.m("peer_failures_total") == 1 and a.m("peer_fallbacks_total") == 1
    assert a.m("read_peer_bytes") == 0
    assert member(a, b)["last_error"] == error
    # The owner was told, re-verified its copy and dropped it (the report is asynchronous).
    deadline = time.monotonic() + 10
    while b.cache.state(v, 3) is PageState.READY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.cache.state(v, 3) is PageState.MISSING
    assert b.cache.state(v, 2) is PageState.READY


def test_owner_origin_failure_is_a_counted_fallback(cluster, origin):
    a, b = cluster.start(2)
    data = random_bytes(8 * P, 6)
    v = find_version(origin, cluster, data, lambda v: cluster.ring().owner(v, 0) == b.id)
    origin.fail_next(OriginError("injected origin failure at the owner"))
    assert a.read(v) == data  # the owner's GET fails, A's own GET does not
    settle_all(cluster)
    assert b.m("peer_owner_fetch_failures_total") == 1
    assert a.m("peer_fallbacks_total") == 1 and a.m("peer_failures_total") == 1
    assert "502" in member(a, b)["last_error"]
    assert origin.fetched_pages(v) == sorted(list(range(8)) * 2)  # owner (failed), then A


def test_dead_peer_backs_off_and_is_asked_again_after_the_backoff(cluster, origin, clock,
                                                                  caplog):
    a, b = cluster.start(2)
    data = random_bytes(32 * P, 7)
    v = find_version(origin, cluster, data,
                     lambda v: sum(cluster.ring().owner(v, 8 * e) == b.id for e in range(4)) >= 2)
    b_extents = [e for e in range(4) if cluster.ring().owner(v, 8 * e) == b.id]
    cluster.stop_server(b)
    with caplog.at_level("WARNING", logger="objfs.cache.peer"):
        for e in b_extents:
            assert a.read(v, 8 * e * P, 8 * P) == data[8 * e * P:8 * (e + 1) * P]
    settle_all(cluster)
    warnings = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per episode
    # The first run asked B and failed; the next went to the origin without asking.
    assert a.m("peer_requests_total") == 1
    assert a.m("peer_fallbacks_total") == len(b_extents)
    state = member(a, b)
    assert state["state"] == "backing off" and 0 < state["retry_in_s"] <= 1
    # B comes back; once the backoff is over, A asks it again.
    cluster.hosts[1].loop.run(b.peers.start(b.cache), timeout=10)
    a.cache.drop(v)
    clock.now += 1.5
    assert a.read(v, 8 * b_extents[0] * P, P) == data[8 * b_extents[0] * P:][:P]
    settle_all(cluster)
    assert a.m("peer_requests_total") == 2 and a.m("read_peer_bytes") > 0
    assert member(a, b)["state"] == "up"


def test_backoff_doubles_on_failed_retries_up_to_the_cap(cluster, origin, clock):
    a, b = cluster.start(2)
    data = random_bytes(8 * P, 8)
    v = find_version(origin, cluster, data, lambda v: cluster.ring().owner(v, 0) == b.id)
    cluster.stop_server(b)
    waits = []
    for _ in range(7):
        a.cache.drop(v)
        assert a.read(v, 0, P) == data[:P]
        settle_all(cluster)
        seen = member(a, b)
        waits.append(seen["retry_in_s"])
        clock.now += seen["retry_in_s"] + 0.01
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert a.m("peer_requests_total") == 7


def test_busy_owner_answers_503_and_the_asker_waits_without_calling_it_broken(
        cluster, origin, clock, caplog):
    a, b = cluster.start(2, serve_limit=P)  # 1 MiB/s served: an 8 MiB run puts it in debt
    data = random_bytes(24 * P, 9)
    v = find_version(origin, cluster, data,
                     lambda v: [cluster.ring().owner(v, 8 * e) for e in range(3)].count(b.id)
                     >= 2)
    extents = [e for e in range(3) if cluster.ring().owner(v, 8 * e) == b.id]
    with caplog.at_level("WARNING", logger="objfs.cache.peer"):
        for e in extents[:2]:
            assert a.read(v, 8 * e * P, 8 * P) == data[8 * e * P:8 * (e + 1) * P]
    settle_all(cluster)
    # The first run was served (driving the bucket ~7 s into debt), the second got 503.
    assert b.m("peer_served_requests_total") == 1
    assert b.m("peer_served_busy_total") == 1 and a.m("peer_busy_total") == 1
    assert a.m("peer_failures_total") == 0 and a.m("peer_fallbacks_total") == 1
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    state = member(a, b)
    assert state["state"] == "busy" and state["retry_in_s"] >= 1


def test_keys_with_awkward_characters_go_through_signing_and_parsing(cluster, origin):
    a, b = cluster.start(2)
    data = random_bytes(8 * P, 10)
    for key in ("a b+c&d=e%20f/ü/#?.bin", "dir/x;y,z'\"<>.bin"):
        v = origin.put(key, data, bucket=BUCKET)
        assert a.read(v) == data and b.read(v) == data
    settle_all(cluster)
    assert a.m("peer_failures_total") == b.m("peer_failures_total") == 0
    assert a.m("read_peer_bytes") + b.m("read_peer_bytes") > 0


def test_owner_never_forwards_even_when_its_ring_says_someone_else_owns_it(cluster, origin):
    a, b, c = cluster.start(3)
    data = random_bytes(8 * P, 11)
    v = find_version(origin, cluster, data, lambda v: cluster.ring().owner(v, 0) == c.id)
    # B's view: C owns extent 0 (true). A asks B anyway (as if A's member list differed):
    # B must fetch from the origin itself, not ask C.
    raw = raw_request(b, PAGES_PATH, [*version_query(v), ("first", "0"), ("count", "8")])
    assert raw.status == 200
    pages = split_body(raw.body, v, range(8))
    assert b"".join(pages) == data
    assert c.m("peer_served_requests_total") == 0 and b.m("peer_requests_total") == 0
    assert b.m("peer_owner_fetches_total") == 1


# ---- the wire: authentication, authorization, malformed requests --------------------------------

@dataclasses.dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_request(host: Host, path: str, query: list[tuple[str, str]], *, method: str = "GET",
                secret: bytes | None = SECRET, headers: dict[str, str] | None = None,
                now: float | None = None) -> Raw:
    raw_path = path + ("?" + encode_query(query) if query else "")
    hdrs = dict(headers or {})
    if secret is not None:
        hdrs.update(sign(secret, method, raw_path, now=now))
    host_name, port = host.id.rsplit(":", 1)
    conn = http.client.HTTPConnection(host_name, int(port), timeout=20)
    try:
        conn.request(method, raw_path, headers=hdrs)
        resp = conn.getresponse()
        return Raw(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


def split_body(body: bytes, version: ObjectVersion, run: range) -> list[bytes]:
    out, pos = [], 0
    for index in run:
        header = decode_header(body[pos:pos + HEADER_SIZE])
        assert (header.bucket, header.key, header.etag, header.index) == (
            version.bucket, version.key, version.etag, index)
        pos += HEADER_SIZE
        out.append(body[pos:pos + header.length])
        pos += header.length
    assert pos == len(body)
    return out


def test_wire_format_of_a_ready_run_is_its_page_files(cluster, origin):
    a, b = cluster.start(2)
    data = random_bytes(3 * P + 100, 12)
    v = origin.put("w", data, bucket=BUCKET)
    assert a.read(v) == data
    settle_all(cluster)
    raw = raw_request(a, PAGES_PATH, [*version_query(v), ("first", "1"), ("count", "3")])
    assert raw.status == 200 and raw.headers["Content-Type"] == "application/octet-stream"
    assert int(raw.headers["Content-Length"]) == len(raw.body) == 3 * HEADER_SIZE + 2 * P + 100
    assert raw.body == b"".join(page_path(a.directory, v, i).read_bytes() for i in (1, 2, 3))
    assert b"".join(split_body(raw.body, v, range(1, 4))) == data[P:]


def test_unsigned_wrongly_signed_and_stale_requests_get_401_and_no_data(cluster, origin):
    a, b = cluster.start(2)
    data = random_bytes(2 * P, 13)
    v = origin.put("secret-data", data, bucket=BUCKET)
    assert a.read(v) == data
    settle_all(cluster)
    query = [*version_query(v), ("first", "0"), ("count", "2")]
    cases = {
        "unsigned": raw_request(a, PAGES_PATH, query, secret=None),
        "wrong secret": raw_request(a, PAGES_PATH, query, secret=b"another-secret-of-16+"),
        "stale": raw_request(a, PAGES_PATH, query, now=time.time() - 3600),
        "signature of another path": raw_request(
            a, PAGES_PATH, query, secret=None,
            headers=sign(SECRET, "GET", PAGES_PATH + "?" + encode_query(query[:-1]))),
        "info unsigned": raw_request(a, "/v1/peer/info", [], secret=None),
    }
    for name, raw in cases.items():
        assert raw.status == 401, name
        assert json.loads(raw.body) == {"error": "unauthorized"}, name
        assert data[:64] not in raw.body and len(raw.body) < 100, name
    assert a.m("peer_auth_failures_total") == len(cases)
    assert a.m("peer_served_requests_total") == 0


def test_other_bucket_or_prefix_is_403_and_malformed_is_400(cluster, origin):
    a, _ = cluster.start(2, prefix="data/")
    v = origin.put("data/x", random_bytes(P, 14), bucket=BUCKET)
    pages = [("first", "0"), ("count", "1")]
    other_bucket = ObjectVersion("other-bucket", "data/x", v.etag, v.size)
    outside = ObjectVersion(BUCKET, "elsewhere/x", v.etag, v.size)
    for version in (other_bucket, outside):
        raw = raw_request(a, PAGES_PATH, [*version_query(version), *pages])
        assert raw.status == 403, version
        assert json.loads(raw.body)["error"] == "not under this member's bucket/prefix"
    for query in ([*version_query(v)], [*version_query(v), ("first", "0"), ("count", "0")],
                  [*version_query(v), ("first", "1"), ("count", "1")],
                  [*version_query(v), ("first", "x"), ("count", "1")],
                  [*version_query(v), *pages, ("priority", "urgent")],
                  [("bucket", BUCKET), ("key", "data/x"), *pages]):
        assert raw_request(a, PAGES_PATH, query).status == 400, query
    assert a.m("peer_forbidden_total") == 2
    assert origin.call_count() == 0
    info = json.loads(raw_request(a, "/v1/peer/info", []).body)
    assert info == {"id": a.id, "bucket": BUCKET, "prefix": "data/",
                    "members": sorted(cluster.ids), "extent_pages": 8}


def test_version_gone_at_the_origin_is_412_and_not_held_against_the_peer(cluster, origin):
    a, b = cluster.start(2)
    data = random_bytes(8 * P, 15)
    v = find_version(origin, cluster, data, lambda v: cluster.ring().owner(v, 0) == b.id)
    del origin.objects[(v.key, v.etag)]
    raw = raw_request(b, PAGES_PATH, [*version_query(v), ("first", "0"), ("count", "1")])
    assert raw.status == 412
    with pytest.raises(Exception) as info:
        a.read(v, 0, P)
    assert "gone" in str(info.value)
    assert a.m("peer_failures_total") == 0  # the origin's answer, not the peer's fault


# ---- a peer that dies or lies mid-body ----------------------------------------------------------

class LyingPeer:
    """A raw TCP server at a member's address that answers every request with a valid
    status line and Content-Length, then ``body`` and a hang-up."""

    def __init__(self, port: int, body_for) -> None:
        import socket
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.body_for = body_for
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    request += chunk
                method, path = (w.decode() for w in request.split(b" ")[:2])
                self.requests.append((method, urllib.parse.urlsplit(path).path))
                status, length, body = self.body_for(urllib.parse.urlsplit(path))
                try:
                    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {length}\r\n"
                                 f"Content-Type: application/octet-stream\r\n\r\n".encode()
                                 + body)
                except OSError:  # the asker gave up first (it saw enough to know)
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("how", ["hang up mid-page", "hang up mid-header", "garbage header",
                                 "another page's header", "short content-length",
                                 "http 500"])
def test_a_peer_that_dies_or_lies_mid_body_is_a_miss(cluster, origin, how):
    a, b = cluster.start(2)
    data = random_bytes(8 * P, 16)
    v = find_version(origin, cluster, data, lambda v: cluster.ring().owner(v, 0) == b.id)
    cluster.stop_server(b)
    good = b"".join(page_path_bytes(v, i, data) for i in range(8))
    total = len(good)

    def body_for(url):
        if how == "hang up mid-page":
            return "200 OK", total, good[:3 * (HEADER_SIZE + P) + 5000]
        if how == "hang up mid-header":
            return "200 OK", total, good[:HEADER_SIZE // 2]
        if how == "garbage header":
            return "200 OK", total, os.urandom(total)
        if how == "another page's header":
            swapped = page_path_bytes(v, 1, data)[:HEADER_SIZE] + good[HEADER_SIZE:]
            return "200 OK", total, swapped
        if how == "short content-length":
            return "200 OK", total - 1, good[:-1]
        return "500 Internal Server Error", 2, b"{}"

    liar = LyingPeer(int(b.id.rsplit(":", 1)[1]), body_for)
    try:
        assert a.read(v) == data
    finally:
        liar.close()
    settle_all(cluster)
    assert liar.requests.count(("GET", PAGES_PATH)) == 1  # (and maybe a bad-page report)
    assert a.m("peer_failures_total") == 1 and a.m("peer_fallbacks_total") == 1
    assert a.m("read_peer_bytes") == 0
    assert origin.fetched_pages(v) == list(range(8))
    assert all(a.cache.state(v, i) is PageState.READY for i in range(8))
    assert hashlib.sha256(a.read(v)).digest() == hashlib.sha256(data).digest()


def page_path_bytes(version: ObjectVersion, index: int, data: bytes) -> bytes:
    from objfs.cache.format import encode_header
    page = data[index * P:(index + 1) * P]
    return encode_header(version.bucket, version.key, version.etag, index, page) + page


# ---- zero-copy and the fallback path ------------------------------------------------------------

def test_fallback_sender_without_zero_copy_sends_the_same_bytes(cluster, origin):
    a, b = cluster.start(2, settings=PeerSettings(zero_copy=False))
    data = random_bytes(16 * P + 3, 17)
    v = origin.put("nz", data, bucket=BUCKET)
    assert a.read(v) == data and b.read(v) == data
    settle_all(cluster)
    assert a.m("peer_out_bytes") + b.m("peer_out_bytes") > 0
    assert a.m("peer_out_sendfile_bytes") == b.m("peer_out_sendfile_bytes") == 0


def test_membership_change_reclassifies_cached_pages(cluster, origin):
    a, b = cluster.start(2)
    data = random_bytes(64 * P, 18)
    v = origin.put("m", data, bucket=BUCKET)
    assert a.read(v) == data
    settle_all(cluster)
    owned_before = set(pages_owned(cluster, v, a))
    assert a.cache._policy.copies == 64 - len(owned_before)
    # B leaves: A owns everything now.
    a.peers.membership.update([a.id])
    moved = a.cache.reclassify()
    assert moved == 64 - len(owned_before)
    assert a.cache._policy.copies == 0
    assert pid_set(a.cache) == {page_id(v, i) for i in range(64)}


def pid_set(cache: PageCache) -> set[bytes]:
    with cache._lock:
        return {bytes(p) for p in cache._policy.pages()}
