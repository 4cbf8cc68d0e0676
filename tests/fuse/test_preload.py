"""Preload with real daemons: an ``objfs master`` process and 3 ``objfs mount --master``
processes on loopback (each its own mount point, cache dir and peer port), over one moto
origin behind the counting proxy (``tests.faultproxy``), which the members share: its "get"
bytes are what the origin served to the cluster. The master lists moto directly.

The daemons are shared by the cases of this module (mounting three takes a while); each case
preloads its own directory, and the case that kills a member runs last.

What the cases pin (issue 12, phase 2):
- a dataset of a few hundred files of mixed sizes: the job is done, its byte totals equal
  the dataset, every extent is READY on its owner, the origin served <= 1.02 x the dataset;
  afterwards every host reads the whole dataset with 0 origin bytes;
- a second preload of the same data: everything skipped, ~0 origin bytes;
- cancel: fetching stops within seconds, the job is cancelled;
- the master killed and restarted mid-job: the job resumes and completes;
- a member killed mid-job: the job is done, its extents reassigned;
- ``objfs preload MOUNTPOINT/PATH`` without a master warms that host's cache;
- unsigned API calls get 401; bad input gets 4xx JSON and a one-line CLI error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from objfs.cache.pages import ObjectVersion, page_id
from objfs.cache.ring import Ring, extent_range, extents
from objfs.master.client import MasterClient
from objfs.master.errors import MasterError
from tests.conftest import Mount, Mounter, force_unmount, free_port, mount_type, \
    process_alive, put_many, run_objfs
from tests.faultproxy import FaultProxy
from tests.mastersim import SECRET, MasterProcess

MiB = 1024 * 1024
KiB = 1024


@dataclasses.dataclass
class Member:
    id: str
    mount: Mount

    @property
    def path(self) -> Path:
        return self.mount.path


class World:
    def __init__(self, tmp: Path, endpoint: str) -> None:
        self.tmp = tmp
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.bucket = f"preload-{uuid.uuid4().hex[:10]}"
        self.s3.create_bucket(Bucket=self.bucket)
        self.proxy = FaultProxy(endpoint).start()
        self.master = MasterProcess(tmp, endpoint)
        self.mounter = Mounter(tmp, self.proxy.endpoint)
        self.members: list[Member] = []
        self.data: dict[str, dict[str, bytes]] = {}  # directory -> key -> bytes

    def upload(self, directory: str, items: dict[str, bytes]) -> None:
        put_many(self.s3, self.bucket, {f"{directory}/{k}": v for k, v in items.items()})
        self.data[directory] = {f"{directory}/{k}": v for k, v in items.items()}

    def start(self, n: int) -> None:
        self.master.start()
        for _ in range(n):
            member_id = f"127.0.0.1:{free_port()}"
            mount = self.mounter(f"s3://{self.bucket}", "--peer-listen", member_id,
                                 "--cluster-secret-file", str(self.master.secret_file),
                                 "--master", self.master.url)
            self.members.append(Member(member_id, mount))
        self.wait_members([m.id for m in self.members])

    def wait_members(self, ids: list[str], timeout: float = 60) -> None:
        """Until the master and every listed member agree on the member list ``ids``."""
        want = sorted(ids)

        def agreed() -> bool:
            groups = self.client().members()["groups"]
            if [g["members"] for g in groups] != [want]:
                return False
            return all(peers(m)["members_ids"] == want for m in self.members if m.id in ids)

        wait_for(agreed, f"members {want}", timeout)

    def client(self) -> MasterClient:
        return MasterClient(self.master.url, SECRET, timeout=60)

    def origin_bytes(self) -> int:
        return self.proxy.body_bytes["get"]

    def versions(self, directory: str) -> list[ObjectVersion]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{directory}/"):
            for obj in page.get("Contents", []):
                out.append(ObjectVersion(self.bucket, obj["Key"], obj["ETag"], obj["Size"]))
        return out

    def stop(self) -> None:
        try:
            self.mounter.cleanup()
        finally:
            self.master.stop()
            self.proxy.stop()


def peers(member: Member) -> dict:
    result = run_objfs("peers", str(member.path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    info["members_ids"] = sorted(m["id"] for m in info["members"])
    return info


def stats(member: Member) -> dict[str, float]:
    result = run_objfs("stats", str(member.path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["metrics"]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def settle(world: World, quiet_s: float = 0.5, timeout_s: float = 30.0) -> None:
    """Until the origin counters stop moving."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        now = sorted(world.proxy.body_bytes.items())
        if now == last:
            return
        last = now
        time.sleep(quiet_s)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        parts = []
        while chunk := f.read(MiB):
            parts.append(chunk)
    return b"".join(parts)


def assert_ready_on_owners(world: World, directory: str, members: list[Member]) -> None:
    """Every page of every extent of ``directory`` has its page file in its owner's cache
    (the owner function over ``members``)."""
    ring = Ring.of([m.id for m in members], members[0].id)
    by_id = {m.id: m for m in members}
    missing = []
    for version in world.versions(directory):
        for extent in extents(version, ring.extent_pages):
            owner = by_id[ring.owner(version, extent * ring.extent_pages)]
            for index in extent_range(version, extent, ring.extent_pages):
                name = page_id(version, index).hex()
                if not (owner.mount.cache_dir / "pages" / "data" / name[:2] / name).exists():
                    missing.append((version.key, extent, index, owner.id))
    assert not missing, missing[:10]


def job_until(world: World, job_id: str, condition: Callable[[dict], bool], what: str,
              timeout_s: float = 120.0) -> dict:
    client = world.client()
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status(job_id)
        if condition(status):
            return status
        assert status["state"] not in ("failed", "cancelled"), status
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {status}"
        time.sleep(0.2)


def mixed_dataset(seed: int) -> dict[str, bytes]:
    """~300 files: mostly small, some of a few MiB, a few large (~80 MiB in all)."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 200 * KiB) for _ in range(250)]
    sizes += [rng.randint(512 * KiB, 3 * MiB) for _ in range(42)]
    sizes += [rng.randint(4 * MiB, 9 * MiB) for _ in range(4)]
    sizes += [0, 8 * MiB, 8 * MiB + 1, MiB]
    items = {}
    for n, size in enumerate(sizes):
        sub = ("a", "b/c", "d")[n % 3]
        items[f"{sub}/f{n:03d}.bin"] = rng.randbytes(size)
    return items


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("preload"), s3_endpoint)
    try:
        w.upload("ds", mixed_dataset(1))
        rng = random.Random(2)
        for name in ("cancel", "restart", "kill"):
            w.upload(name, {f"part{i}.bin": rng.randbytes(12 * MiB) for i in range(4)})
        w.upload("local", {f"x{i}.bin": rng.randbytes(rng.randint(1, 700 * KiB))
                           for i in range(30)})
        w.start(3)
        yield w
    finally:
        w.stop()


# ---- the cases -----------------------------------------------------------------------------

def test_preload_fills_every_owner_and_then_reads_need_no_origin(world: World) -> None:
    dataset = world.data["ds"]
    total = sum(len(v) for v in dataset.values())
    before = world.origin_bytes()
    result = world.master.cli("preload", f"s3://{world.bucket}/ds/", "--wait", "--json",
                              timeout=600)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "done", status
    assert status["files"]["total"] == len(dataset)
    assert status["bytes"]["total"] == total
    assert status["bytes"]["done"] + status["bytes"]["skipped"] == total
    assert status["bytes"]["failed"] == 0 and status["extents"]["failed"] == 0
    assert set(status["hosts"]) == {m.id for m in world.members}
    settle(world)
    served = world.origin_bytes() - before
    assert served <= 1.02 * total, (served, total)
    assert_ready_on_owners(world, "ds", world.members)

    # Every host reads the whole dataset: nothing from the origin.
    before = world.origin_bytes()
    for member in world.members:
        for key, data in dataset.items():
            assert sha(read_file(member.path / key)) == sha(data), (member.id, key)
    settle(world)
    assert world.origin_bytes() == before
    counters = [stats(m) for m in world.members]
    assert all(c.get("fuse_read_errors_total", 0) == 0 for c in counters)
    assert sum(c.get("preload_fetched_bytes", 0) for c in counters) == status["bytes"]["done"]


def test_a_second_preload_of_the_same_data_skips_everything(world: World) -> None:
    total = sum(len(v) for v in world.data["ds"].values())
    client = world.client()
    before = world.origin_bytes()
    final = client.wait(client.submit(f"s3://{world.bucket}/ds/")["id"], interval=0.2,
                        timeout=300)
    assert final["state"] == "done", final
    assert final["bytes"]["skipped"] == total and final["bytes"]["done"] == 0
    assert final["files"]["skipped"] == final["files"]["total"]
    settle(world)
    assert world.origin_bytes() - before == 0


def test_cancel_stops_fetching(world: World) -> None:
    client = world.client()
    job = client.submit(f"s3://{world.bucket}/cancel/", bandwidth_limit=6 * MiB)
    job_until(world, job["id"], lambda s: s["bytes"]["done"] > 0, "the first bytes")
    result = world.master.cli("preload", "cancel", job["id"])
    assert result.returncode == 0 and "cancelled" in result.stdout, result.stderr
    time.sleep(3.0)  # runs already sent finish (one extent per member at most)
    before = world.origin_bytes()
    time.sleep(4.0)  # at 2 MiB/s per member, a fetch still going would show
    assert world.origin_bytes() == before
    status = client.status(job["id"])
    assert status["state"] == "cancelled"
    assert status["bytes"]["done"] < sum(len(v) for v in world.data["cancel"].values())
    for member in world.members:  # every member heard of it and released its pins
        wait_for(lambda m=member: stats(m).get("cache_pinned_bytes", 0) == 0,
                 f"{member.id} to release the cancelled job's pins", 15)


def test_the_master_killed_and_restarted_mid_job_resumes(world: World) -> None:
    client = world.client()
    total = sum(len(v) for v in world.data["restart"].values())
    job = client.submit(f"s3://{world.bucket}/restart/", bandwidth_limit=12 * MiB)
    job_until(world, job["id"], lambda s: 0 < s["bytes"]["done"], "the first bytes")
    world.master.kill()
    time.sleep(1.5)  # the members go on with what they hold and find the master gone
    assert all(peers(m)["master"]["state"] == "unreachable" for m in world.members)
    world.master.start()
    final = client.wait(job["id"], interval=0.3, timeout=300)
    assert final["state"] == "done", final
    assert final["bytes"]["done"] + final["bytes"]["skipped"] == total
    assert_ready_on_owners(world, "restart", world.members)


def test_local_preload_of_a_path_warms_that_host_only(world: World) -> None:
    member = world.members[1]
    data = world.data["local"]
    total = sum(len(v) for v in data.values())
    result = run_objfs("preload", str(member.path / "local"), "--interval", "0.2",
                       timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert " done: 30 files" in lines[-1], lines
    assert "\r" not in result.stdout
    settle(world)
    before, counters = world.origin_bytes(), stats(member)
    for key, value in data.items():
        assert read_file(member.path / key) == value
    after = stats(member)
    assert world.origin_bytes() == before
    assert after.get("read_peer_bytes", 0) == counters.get("read_peer_bytes", 0)
    assert after["read_cache_hit_bytes"] - counters["read_cache_hit_bytes"] == total
    # Errors are one line: a path that is not there, a path not on a mount.
    bad = run_objfs("preload", str(member.path / "local" / "nope"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "no such file" in bad.stderr


def test_unsigned_calls_get_401_and_bad_input_4xx(world: World) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", world.master.port, timeout=10)
    for method, path, body in (("GET", "/v1/preloads", None),
                               ("POST", "/v1/preloads", b'{"source": "s3://x/y"}'),
                               ("POST", "/v1/members/heartbeat", b"{}"),
                               ("DELETE", "/v1/preloads/x", None)):
        conn.request(method, path, body=body)
        response = conn.getresponse()
        payload = response.read()
        assert response.status == 401, (method, path, payload)
        assert json.loads(payload) == {"error": "unauthorized"}
    conn.close()
    client = world.client()
    for body, status in (({"source": f"s3://{world.bucket}/no/such/dir/"}, 404),
                         ({"source": "not-a-url"}, 400), ({"files": []}, 400)):
        with pytest.raises(MasterError) as info:
            client._call("POST", "/v1/preloads", body)
        assert info.value.status == status, (body, info.value)
    result = world.master.cli("preload", f"s3://{world.bucket}/no/such/dir/")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    # A daemon with --master but no --peer-listen: one line, nothing mounted.
    mnt = world.tmp / "lonely"
    mnt.mkdir()
    bad = run_objfs("mount", "--master", world.master.url, "--cache-dir",
                    str(world.tmp / "lonely-cache"), f"s3://{world.bucket}", str(mnt))
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--master needs --peer-listen" in bad.stderr and mount_type(mnt) is None


def test_a_member_killed_mid_job_has_its_extents_reassigned(world: World) -> None:
    """Runs last: it leaves two members."""
    client = world.client()
    total = sum(len(v) for v in world.data["kill"].values())
    victim = world.members[2]
    job = client.submit(f"s3://{world.bucket}/kill/", bandwidth_limit=12 * MiB)
    job_until(world, job["id"],
              lambda s: s["hosts"].get(victim.id, {}).get("extents_done", 0) > 0,
              "the victim to finish an extent")
    pid = victim.mount.pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid), "the killed daemon to be gone", 15)
    force_unmount(victim.path)
    final = client.wait(job["id"], interval=0.3, timeout=300)
    assert final["state"] == "done", final
    assert final["extents"]["reassigned"] > 0
    assert final["bytes"]["done"] + final["bytes"]["skipped"] == total
    survivors = [m for m in world.members if m is not victim]
    assert_ready_on_owners(world, "kill", survivors)
