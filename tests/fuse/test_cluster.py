"""The peer cache between real daemons: N ``objfs mount`` processes on loopback, each with its
own mount point, cache dir and peer port, over one moto origin. Each member reaches the origin
through a fault proxy of its own, so the tests know which member fetched what from the origin
(the sum over the proxies is what the origin served) and can fail one member's GETs.

What each test pins (issue 11, "Tests"):
- 4 members read the same 64 MiB file at once, cold: the origin serves <= 1.05 x the file and
  every copy is byte-exact;
- a member reads a file another member cached: 0 origin bytes; ``objfs peers``, the stats
  counters and the per-peer Prometheus series show it;
- a member SIGKILLed while serving: every reader finishes byte-exact, no EIO;
- an owner whose page file is corrupt: detected by the asker, read from the origin, and the
  owner drops the page;
- an owner whose origin GETs fail: the asker falls back, and both sides count it;
- requests without or with a wrong signature: 401 and no page data; another bucket: 403;
- eviction keeps the pages a member owns over copies;
- bad flags, a secret file readable by others, a missing one, a peer port in use: one line,
  non-zero exit, nothing mounted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from objfs.cache.format import HEADER_SIZE
from objfs.cache.pages import ObjectVersion, page_id
from objfs.cache.peer import PAGES_PATH, encode_query, version_query
from objfs.cache.ring import Ring
from objfs.cluster import sign
from tests.conftest import OBJFS, Mount, Mounter, force_unmount, free_port, mount_type, \
    process_alive, run_objfs
from tests.faultproxy import FaultProxy

MiB = 1024 * 1024
SECRET = b"fuse-cluster-test-secret-0123456789"


@dataclasses.dataclass
class Member:
    id: str
    proxy: FaultProxy
    mount: Mount | None = None

    @property
    def path(self) -> Path:
        assert self.mount is not None
        return self.mount.path

    @property
    def port(self) -> int:
        return int(self.id.rsplit(":", 1)[1])


class Cluster:
    """``plan(n)`` picks the members' ports (so tests can compute owners before uploading),
    ``start()`` mounts them all."""

    def __init__(self, tmp_path: Path, endpoint: str, mounter: Mounter) -> None:
        self.tmp = tmp_path
        self.endpoint = endpoint
        self.mounter = mounter
        self.members: list[Member] = []
        self.secret = tmp_path / "cluster.secret"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600)

    def plan(self, n: int) -> list[Member]:
        self.members = [Member(f"127.0.0.1:{free_port()}", FaultProxy(self.endpoint).start())
                        for _ in range(n)]
        return self.members

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.members]

    def ring(self) -> Ring:
        return Ring.of(self.ids, self.ids[0])

    def start(self, url: str, *extra: str,
              per_member: Callable[[int], list[str]] | None = None) -> list[Member]:
        for i, member in enumerate(self.members):
            member.mount = self.mounter(
                url, "--peer-listen", member.id, "--peers", ",".join(self.ids),
                "--cluster-secret-file", str(self.secret), *extra,
                *(per_member(i) if per_member else []), endpoint=member.proxy.endpoint)
        return self.members

    def origin_bytes(self) -> int:
        return sum(m.proxy.body_bytes["get"] for m in self.members)

    def stop(self) -> None:
        for member in self.members:
            member.proxy.stop()


@pytest.fixture
def cluster(tmp_path: Path, s3_endpoint: str, mounter: Mounter) -> Iterator[Cluster]:
    c = Cluster(tmp_path, s3_endpoint, mounter)
    try:
        yield c
    finally:
        mounter.cleanup()  # before the proxies go: a daemon may still read through one
        c.stop()


# ---- helpers -------------------------------------------------------------------------------------

def stats(member: Member) -> dict[str, float]:
    result = run_objfs("stats", str(member.path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["metrics"]


def peers_json(member: Member) -> dict:
    result = run_objfs("peers", str(member.path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        parts = []
        while chunk := f.read(MiB):
            parts.append(chunk)
    return b"".join(parts)


def read_range(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def settle(cluster: Cluster, quiet_s: float = 0.3, timeout_s: float = 30.0) -> None:
    """Wait until no proxy counter moves (background readahead, pages being stored)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        now = [(sorted(m.proxy.requests.items()), sorted(m.proxy.body_bytes.items()))
               for m in cluster.members]
        if now == last:
            return
        last = now
        time.sleep(quiet_s)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def key_where(cluster: Cluster, bucket: str, data: bytes, want: Callable[[ObjectVersion], bool],
              stem: str = "obj") -> ObjectVersion:
    """A key whose version (moto's ETag of a single PUT is the MD5) satisfies ``want``."""
    etag = md5_etag(data)
    for n in range(2000):
        version = ObjectVersion(bucket, f"{stem}-{n}.bin", etag, len(data))
        if want(version):
            return version
    raise AssertionError("no key with the wanted ownership")


def page_file(member: Member, version: ObjectVersion, index: int) -> Path:
    name = page_id(version, index).hex()
    return member.mount.cache_dir / "pages" / "data" / name[:2] / name


def check_version(member: Member, version: ObjectVersion) -> None:
    path = member.path / version.key
    assert os.getxattr(path, "user.objfs.etag").decode() == version.etag


# ---- the cases of the issue ----------------------------------------------------------------------

def test_four_members_read_the_same_64mib_file_at_once_cold(cluster, s3, bucket):
    data = os.urandom(64 * MiB)
    s3.put_object(Bucket=bucket, Key="model.bin", Body=data)
    cluster.plan(4)
    members = cluster.start(f"s3://{bucket}")
    results: list[object] = [None] * 4
    barrier = threading.Barrier(4)

    def reader(i: int) -> None:
        barrier.wait()
        try:
            results[i] = sha(read_file(members[i].path / "model.bin"))
        except BaseException as exc:  # handed to the assertion below
            results[i] = exc

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert results == [sha(data)] * 4, results
    settle(cluster)
    per_member = [m.proxy.body_bytes["get"] for m in members]
    counters = [stats(m) for m in members]
    fallbacks = [c.get("peer_fallbacks_total", 0) for c in counters]
    assert cluster.origin_bytes() <= 1.05 * len(data), (per_member, fallbacks)
    assert sum(c.get("read_peer_bytes", 0) for c in counters) >= 2 * len(data)
    assert all(c.get("fuse_read_errors_total", 0) == 0 for c in counters)


def test_a_member_reads_what_another_cached_with_no_origin_bytes(cluster, s3, bucket):
    data = os.urandom(24 * MiB)
    cluster.plan(3)
    a, b, c = cluster.members
    # One 8 MiB extent owned by each member (with a random key, B owned all three in 1 of 27
    # runs, and then had nothing to ask its peers).
    v = key_where(cluster, bucket, data, lambda v: sorted(
        cluster.ring().owner(v, 8 * e) for e in range(3)) == sorted([a.id, b.id, c.id]),
        stem="data/shard")
    s3.put_object(Bucket=bucket, Key=v.key, Body=data)
    metrics_port = free_port()
    cluster.start(f"s3://{bucket}", per_member=lambda i: [
        "--metrics-addr", f"127.0.0.1:{metrics_port}"] if i == 1 else [])
    assert sha(read_file(a.path / v.key)) == sha(data)
    settle(cluster)
    assert cluster.origin_bytes() == len(data)  # each page once, by its owner
    before = cluster.origin_bytes()
    assert sha(read_file(b.path / v.key)) == sha(data)
    settle(cluster)
    assert cluster.origin_bytes() == before  # 0 origin bytes for B's read
    sb = stats(b)
    # B's own extent is on its disk (it fetched it for A); the other two come from A and C.
    assert sb["read_peer_bytes"] == 16 * MiB, sb.get("read_peer_bytes")
    assert sb.get("read_origin_bytes", 0) <= len(data)
    assert sb.get("peer_fallbacks_total", 0) == 0

    # `objfs peers`: B sees A and C up, with bytes exchanged.
    info = peers_json(b)
    assert info["cluster"] is True and info["self"] == b.id
    states = {m["id"]: m for m in info["members"]}
    assert states[b.id]["state"] == "self"
    assert states[a.id]["state"] == states[c.id]["state"] == "up"
    assert states[a.id]["in_bytes"] + states[c.id]["in_bytes"] == sb["read_peer_bytes"]
    text = run_objfs("peers", str(b.path))
    assert text.returncode == 0 and a.id in text.stdout and "self" in text.stdout
    # Prometheus: the same counters per peer address.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        prom = r.read().decode()
    series = [line for line in prom.splitlines() if line.startswith("objfs_peer_in_bytes")]
    assert {f'peer="{a.id}"' in line or f'peer="{c.id}"' in line for line in series} == {True}
    total = sum(float(line.rsplit(" ", 1)[1]) for line in series)
    assert total == sb["read_peer_bytes"]
    # The `peer` column of `objfs stats` reads the same counter (rates of read_peer_bytes).
    assert sb["read_peer_bytes"] == sb["peer_in_bytes"]


def test_a_member_killed_while_serving_never_fails_a_reader(cluster, s3, bucket):
    data = os.urandom(32 * MiB)
    cluster.plan(3)
    a, b, c = cluster.members
    v = key_where(cluster, bucket, data, lambda v: [cluster.ring().owner(v, 8 * e)
                                                    for e in range(4)].count(c.id) >= 2,
                  stem="ckpt")
    s3.put_object(Bucket=bucket, Key=v.key, Body=data)
    c.proxy.delay_next("get", 1000, 0.4)  # C's origin fetches are slow: it is caught serving
    cluster.start(f"s3://{bucket}")
    victim_pid = c.mount.pid
    results: dict[str, object] = {}

    def reader(member: Member) -> None:
        try:
            results[member.id] = sha(read_file(member.path / v.key))
        except BaseException as exc:
            results[member.id] = exc

    threads = [threading.Thread(target=reader, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    # Kill C once it has requests from the others in hand.
    wait_for(lambda: c.proxy.requests["get"] >= 1, "C to fetch for a peer")
    os.kill(victim_pid, signal.SIGKILL)
    for t in threads:
        t.join(240)
    assert results == {a.id: sha(data), b.id: sha(data)}, results
    wait_for(lambda: not process_alive(victim_pid), "the killed daemon to be gone")
    failures = stats(a).get("peer_failures_total", 0) + stats(b).get("peer_failures_total", 0)
    assert failures >= 1  # the dead member was noticed, and nobody saw an error
    force_unmount(c.path)


def test_corrupt_page_at_the_owner_is_detected_and_read_from_the_origin(cluster, s3, bucket):
    data = os.urandom(16 * MiB)
    cluster.plan(2)
    a, b = cluster.members
    v = key_where(cluster, bucket, data, lambda v: cluster.ring().owner(v, 0) == b.id)
    s3.put_object(Bucket=bucket, Key=v.key, Body=data)
    cluster.start(f"s3://{bucket}")
    check_version(b, v)
    assert read_range(b.path / v.key, 0, 8 * MiB) == data[:8 * MiB]  # B caches its extent
    settle(cluster)
    bad = page_file(b, v, 3)
    wait_for(bad.exists, "B's page 3 on disk")
    with open(bad, "r+b") as f:
        f.seek(HEADER_SIZE + 4321)
        byte = f.read(1)
        f.seek(HEADER_SIZE + 4321)
        f.write(bytes([byte[0] ^ 0xFF]))
    log_before = len(a.proxy.log)  # (B's readahead already had A fetch extent 1)
    assert read_range(a.path / v.key, 0, 8 * MiB) == data[:8 * MiB]  # byte-exact
    settle(cluster)
    sa = stats(a)
    assert sa["peer_failures_total"] == 1 and sa["peer_fallbacks_total"] >= 1
    # The run holding page 3 came from the origin (A's own GET); other runs of the extent
    # may have been served by B before the bad page was seen.
    ranges = [tuple(int(x) for x in headers["Range"].removeprefix("bytes=").split("-"))
              for kind, _, headers in a.proxy.log[log_before:] if kind == "get"]
    assert any(first <= 3 * MiB + 4321 <= last for first, last in ranges), ranges
    member = {m["id"]: m for m in peers_json(a)["members"]}[b.id]
    assert "checksum mismatch" in member["last_error"]
    # B was told and dropped its bad copy.
    wait_for(lambda: not bad.exists(), "B to drop the corrupt page")
    assert stats(b).get("cache_corrupt_pages_total", 0) >= 1


def test_owner_origin_failure_falls_back_and_is_counted(cluster, s3, bucket):
    data = os.urandom(8 * MiB)
    cluster.plan(2)
    a, b = cluster.members
    v = key_where(cluster, bucket, data, lambda v: cluster.ring().owner(v, 0) == b.id)
    s3.put_object(Bucket=bucket, Key=v.key, Body=data)
    cluster.start(f"s3://{bucket}")
    b.proxy.fail_next("get", 1, status=403, code="AccessDenied")  # not retried
    assert read_file(a.path / v.key) == data
    settle(cluster)
    sa, sb = stats(a), stats(b)
    assert sb["peer_owner_fetch_failures_total"] == 1
    assert sa["peer_fallbacks_total"] >= 1 and sa["peer_failures_total"] >= 1
    # The failed run came from A's own GET; runs asked before the failure was known were
    # served by B. Every byte left the origin once (the failed GET carried no data).
    assert a.proxy.body_bytes["get"] >= MiB
    assert cluster.origin_bytes() == len(data)
    assert sa.get("fuse_read_errors_total", 0) == 0


def test_unsigned_and_wrongly_signed_requests_get_401_other_buckets_403(cluster, s3, bucket):
    data = os.urandom(2 * MiB)
    s3.put_object(Bucket=bucket, Key="private.bin", Body=data)
    cluster.plan(1)
    (a,) = cluster.start(f"s3://{bucket}")
    assert read_file(a.path / "private.bin") == data  # cached: the pages are there to steal
    settle(cluster)
    etag = os.getxattr(a.path / "private.bin", "user.objfs.etag").decode()
    v = ObjectVersion(bucket, "private.bin", etag, len(data))
    query = [*version_query(v), ("first", "0"), ("count", "2")]
    raw_path = PAGES_PATH + "?" + encode_query(query)

    def get(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=20)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    status, body = get(raw_path, sign(SECRET, "GET", raw_path))
    assert status == 200 and data[:4096] in body  # the control: a signed request works
    for headers in ({}, sign(b"not-the-cluster-secret!!", "GET", raw_path),
                    sign(SECRET, "GET", raw_path, now=time.time() - 3600)):
        status, body = get(raw_path, headers)
        assert status == 401 and json.loads(body) == {"error": "unauthorized"}
    other = ObjectVersion("another-bucket", "private.bin", etag, len(data))
    other_path = PAGES_PATH + "?" + encode_query([*version_query(other), ("first", "0"),
                                                  ("count", "1")])
    status, body = get(other_path, sign(SECRET, "GET", other_path))
    assert status == 403 and data[:4096] not in body
    sa = stats(a)
    assert sa["peer_auth_failures_total"] == 3 and sa["peer_forbidden_total"] == 1


def test_eviction_keeps_owned_pages_over_copies(cluster, s3, bucket):
    data = os.urandom(32 * MiB)  # 4 extents
    cluster.plan(2)
    a, b = cluster.members
    v = key_where(cluster, bucket, data, lambda v: [cluster.ring().owner(v, 8 * e)
                                                    for e in range(4)] == [a.id, a.id, b.id, b.id])
    s3.put_object(Bucket=bucket, Key=v.key, Body=data)
    # A holds 19 page files: its 16 own pages and 3 copies. Plain LRU after a sequential
    # read would keep pages 13-31 and lose most of A's own.
    cluster.start(f"s3://{bucket}", per_member=lambda i: [
        "--cache-size", "19460K", "--cache-free-floor", "0"] if i == 0 else [])
    check_version(a, v)
    assert sha(read_file(a.path / v.key)) == sha(data)
    settle(cluster)
    wait_for(lambda: all(page_file(a, v, i).exists() for i in range(16)),
             "A's own pages on disk")
    kept = [i for i in range(32) if page_file(a, v, i).exists()]
    assert kept[:16] == list(range(16)) and len(kept) <= 19, kept
    assert stats(a)["cache_used_bytes"] <= 19460 * 1024


# ---- bad input -----------------------------------------------------------------------------------

def mount_fails(args: list[str], mp: Path, expect: str) -> None:
    result = subprocess.run([OBJFS, *args], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("objfs: "), result.stderr
    assert expect in lines[0], lines[0]
    assert mount_type(mp) is None, "left something mounted"


@pytest.mark.parametrize(("flags", "expect"), [
    (["--peers", "127.0.0.1:1"], "--peers needs --peer-listen"),
    (["--peer-listen", "127.0.0.1:nope", "SECRET"], "--peer-listen: '127.0.0.1:nope' is not "
                                                    "HOST:PORT"),
    (["--peer-listen", "127.0.0.1:19999", "--peers", "127.0.0.1:1,bad", "SECRET"],
     "--peers: 'bad' is not HOST:PORT"),
    (["--peer-listen", "0.0.0.0:19999", "SECRET"], "add --peer-advertise"),
    (["--peer-listen", "127.0.0.1:19999"], "needs --cluster-secret-file"),
    (["--peer-listen", "127.0.0.1:19999", "--cluster-secret-file", "/nonexistent/secret"],
     "No such file or directory"),
    (["--peer-listen", "127.0.0.1:19999", "OPEN-SECRET"], "accessible by other users"),
    (["--peer-listen", "127.0.0.1:19999", "--peer-serve-limit", "lots", "SECRET"],
     "--peer-serve-limit"),
])
def test_bad_peer_flags_fail_with_one_line(tmp_path, s3_endpoint, bucket, flags, expect):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    open_secret = tmp_path / "open-secret"
    open_secret.write_bytes(SECRET)
    open_secret.chmod(0o644)
    args = []
    for flag in flags:
        if flag == "SECRET":
            args += ["--cluster-secret-file", str(secret)]
        elif flag == "OPEN-SECRET":
            args += ["--cluster-secret-file", str(open_secret)]
        else:
            args.append(flag)
    mp = tmp_path / "mnt"
    mp.mkdir()
    mount_fails(["mount", "--endpoint", s3_endpoint, "--cache-dir", str(tmp_path / "c"), *args,
                 f"s3://{bucket}", str(mp)], mp, expect)


def test_peer_port_in_use_fails_the_mount_with_one_line(tmp_path, s3_endpoint, bucket):
    import socket
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    mp = tmp_path / "mnt"
    mp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        mount_fails(["mount", "--endpoint", s3_endpoint, "--cache-dir", str(tmp_path / "c"),
                     "--peer-listen", f"127.0.0.1:{port}", "--cluster-secret-file", str(secret),
                     f"s3://{bucket}", str(mp)], mp, f"--peer-listen 127.0.0.1:{port}: ")
