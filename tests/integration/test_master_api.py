"""The master over real HTTP, with simulated members, against moto on loopback.

Members are ``tests.mastersim.SimMember``s: they heartbeat, take work and report results as a
daemon would, step by step under the test's control; member timeouts run on a fake clock
(``MasterHarness.expire``), so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from objfs.cache.pages import ObjectVersion, version_digest
from objfs.cache.ring import Ring, extents
from objfs.cluster import sign
from objfs.master.errors import BadRequest, Conflict, NotFound, Unauthorized
from objfs.master.planner import extent_bytes
from tests.conftest import put_many
from tests.mastersim import SECRET, MasterHarness, SimMember, drive

MiB = 1024 * 1024
A, B, C, D = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"


@pytest.fixture
def harness(tmp_path: Path, s3_endpoint: str) -> Iterator[MasterHarness]:
    h = MasterHarness(tmp_path, s3_endpoint).start()
    try:
        yield h
        h.coordinator.check_invariants()
    finally:
        h.stop()


def dataset(seed: int = 0) -> dict[str, bytes]:
    """Mixed sizes: empty, small, one page, several extents, a directory marker."""
    sizes = [0, 1, 100_000, MiB, 3 * MiB + 5, 9 * MiB, 17 * MiB + 1] + [4096 * i for i in
                                                                           range(1, 21)]
    data = {f"data/f{i:02d}.bin": hashlib.sha256(f"{seed}-{i}".encode()).digest() * (s // 32)
            + b"x" * (s % 32) for i, s in enumerate(sizes)}
    data["data/sub/deep.bin"] = b"y" * (2 * MiB)
    data["data/marker/"] = b""
    data["other/outside.bin"] = b"z" * 1000
    return data


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def planned(client, job_id: str) -> dict[str, Any]:
    return wait_for(lambda: (lambda s: s if s["state"] != "queued" and not s["listing"]
                             else None)(client.status(job_id)), what=f"planning of {job_id}")


def files_of(data: dict[str, bytes], prefix: str = "data/") -> dict[str, bytes]:
    return {k: v for k, v in data.items() if k.startswith(prefix) and not k.endswith("/")}


def expected_extents(s3, bucket: str, keys: list[str], members: list[str],
                     extent_pages: int = 8) -> dict[tuple[str, int], str]:
    """(key, extent) -> owner, from the objects' real ETags and the ring over ``members``."""
    ring = Ring.of(members, members[0], extent_pages)
    owners = {}
    for key in keys:
        head = s3.head_object(Bucket=bucket, Key=key)
        version = ObjectVersion(bucket, key, head["ETag"], head["ContentLength"])
        for e in extents(version, extent_pages):
            owners[(key, e)] = ring.owner_of_extent(version_digest(version), e)
    return owners


def joined(*members: SimMember) -> None:
    for m in members:
        m.heartbeat(want_tasks=0)


# ---- planning and completion -----------------------------------------------------------------

def test_directory_preload_gives_every_extent_to_its_owner(harness, s3, bucket) -> None:
    data = dataset()
    put_many(s3, bucket, data)
    members = [harness.member(m, bucket) for m in (A, B, C)]
    joined(*members)
    assert members[0].heartbeat(want_tasks=0).members == (A, B, C)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data")
    assert job["state"] in ("queued", "running") and job["group"].endswith(f"/{bucket}/")
    status = planned(client, job["id"])
    files = files_of(data)
    assert status["files"]["total"] == len(files)
    assert status["bytes"]["total"] == sum(len(v) for v in files.values())

    drive(members, lambda: client.status(job["id"])["state"] == "done")
    status = client.status(job["id"])
    owners = expected_extents(s3, bucket, sorted(files), [A, B, C])
    assert status["extents"]["total"] == len(owners)
    done = collections.Counter()
    for m in members:
        for item in m.done:
            done[(item.key, item.extent)] += 1
            assert owners[(item.key, item.extent)] == m.id, (item.key, item.extent)
    assert set(done) == set(owners) and set(done.values()) == {1}
    assert status["bytes"] == {"total": status["bytes"]["total"],
                               "done": status["bytes"]["total"], "skipped": 0, "failed": 0}
    empty = sum(1 for v in files.values() if not v)
    assert status["files"] == {"total": len(files), "done": len(files) - empty,
                               "skipped": empty, "failed": 0}
    assert status["ended_at"] is not None and status["eta_s"] is None
    per_host = {h: v["bytes_done"] for h, v in status["hosts"].items()}
    assert sum(per_host.values()) == status["bytes"]["total"]
    assert set(per_host) <= {A, B, C} and all(v["state"] == "up"
                                              for v in status["hosts"].values())
    # Every extent's bytes add up, per host too.
    for m in members:
        assert per_host.get(m.id, 0) == sum(extent_bytes(i.size, i.extent, i.extent_pages)
                                            for i in m.done)


def test_second_preload_of_the_same_data_is_all_skipped(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    members = [harness.member(m, bucket) for m in (A, B)]
    joined(*members)
    client = harness.client()
    first = client.submit(f"s3://{bucket}/data/")
    drive(members, lambda: client.status(first["id"])["state"] == "done")
    second = client.submit(f"s3://{bucket}/data/")
    drive(members, lambda: client.status(second["id"])["state"] == "done")
    status = client.status(second["id"])
    assert status["bytes"]["done"] == 0
    assert status["bytes"]["skipped"] == status["bytes"]["total"] > 0
    assert status["files"]["skipped"] == status["files"]["total"]
    listed = client.list()
    assert [j["id"] for j in listed] == [second["id"], first["id"]]  # newest first


def test_a_file_and_a_file_list(harness, s3, bucket) -> None:
    data = dataset()
    put_many(s3, bucket, data)
    member = harness.member(A, bucket)
    joined(member)
    client = harness.client()
    one = client.submit(f"s3://{bucket}/data/f06.bin")
    assert planned(client, one["id"])["files"]["total"] == 1
    drive([member], lambda: client.status(one["id"])["state"] == "done")
    assert client.status(one["id"])["bytes"]["done"] == len(data["data/f06.bin"])

    keys = ["data/f03.bin", "data/f04.bin", "data/sub/deep.bin"]
    job = client.submit(files=[f"s3://{bucket}/{k}" for k in keys])
    status = planned(client, job["id"])
    assert status["files"]["total"] == 3
    assert status["bytes"]["total"] == sum(len(data[k]) for k in keys)
    drive([member], lambda: client.status(job["id"])["state"] == "done")

    with pytest.raises(NotFound, match="nope.bin does not exist"):
        client.submit(files=[f"s3://{bucket}/data/f03.bin", f"s3://{bucket}/data/nope.bin"])


def test_a_name_that_is_a_file_and_a_directory_is_the_directory(harness, s3, bucket) -> None:
    put_many(s3, bucket, {"x": b"file", "x/inside.bin": b"a" * 10})
    joined(harness.member(A, bucket))
    client = harness.client()
    status = planned(client, client.submit(f"s3://{bucket}/x")["id"])
    assert status["files"]["total"] == 1 and status["bytes"]["total"] == 10


# ---- membership ------------------------------------------------------------------------------

def test_a_member_that_stops_heartbeating_has_its_extents_reassigned(harness, s3,
                                                                        bucket) -> None:
    data = dataset()
    put_many(s3, bucket, data)
    a, b, c = (harness.member(m, bucket) for m in (A, B, C))
    joined(a, b, c)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/")
    planned(client, job["id"])
    for m in (a, b, c):
        m.heartbeat()
    assert c.held, "C owns some extents"
    c.work(limit=1)
    c.heartbeat(want_tasks=0)          # one result delivered, the rest held and lost
    lost = {(i.key, i.extent) for i in c.held.values()} | {(i.key, i.extent) for i in c.done}
    before = client.status(job["id"])
    assert before["hosts"][C]["extents_done"] == 1
    total = before["bytes"]["total"]

    harness.expire(a, b)  # C is silent past the member timeout
    assert a.heartbeat(want_tasks=0).members == (A, B)
    drive([a, b], lambda: client.status(job["id"])["state"] == "done")
    status = client.status(job["id"])
    assert status["extents"]["reassigned"] >= len(lost) > 0
    assert status["hosts"][C]["state"] == "gone"
    # What C had fetched went with it: fetched again by the new owners, counted once.
    assert status["hosts"][C]["extents_assigned"] == status["hosts"][C]["extents_done"] == 0
    assert status["hosts"][C]["bytes_done"] == 0
    assert status["bytes"]["done"] == total
    owners = expected_extents(s3, bucket, sorted(files_of(data)), [A, B])
    redone = {(i.key, i.extent): m.id for m in (a, b) for i in m.done}
    for extent in lost:
        assert redone[extent] == owners[extent]
    assert status["bytes"]["done"] + status["bytes"]["skipped"] == status["bytes"]["total"]
    assert client.members()["groups"][0]["members"] == [A, B]


def test_a_restarted_member_gets_back_the_work_it_lost(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    a, b = harness.member(A, bucket), harness.member(B, bucket)
    joined(a, b)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/")
    planned(client, job["id"])
    a.heartbeat()
    held = set(a.held)
    assert held
    a.restart()
    a.heartbeat(want_tasks=0)                 # says it holds nothing: its leases go back
    reply = a.heartbeat()
    assert {w.ref for w in reply.work} == held
    drive([a, b], lambda: client.status(job["id"])["state"] == "done")
    assert client.status(job["id"])["extents"]["reassigned"] == 0


def test_a_member_joining_mid_job_takes_the_pending_extents_it_now_owns(harness, s3,
                                                                          bucket) -> None:
    data = dataset()
    put_many(s3, bucket, data)
    a, b = harness.member(A, bucket), harness.member(B, bucket)
    joined(a, b)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/")
    planned(client, job["id"])
    c = harness.member(C, bucket)
    joined(c)
    drive([a, b, c], lambda: client.status(job["id"])["state"] == "done")
    owners = expected_extents(s3, bucket, sorted(files_of(data)), [A, B, C])
    assert c.done and all(owners[(i.key, i.extent)] == C for i in c.done)
    assert all(owners[(i.key, i.extent)] == m.id for m in (a, b) for i in m.done)


def test_a_member_leaving_hands_its_work_over_at_once(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    a, b = harness.member(A, bucket), harness.member(B, bucket)
    joined(a, b)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/")
    planned(client, job["id"])
    b.heartbeat()
    assert client.leave(B) is True and client.leave(B) is False
    drive([a], lambda: client.status(job["id"])["state"] == "done")
    assert client.status(job["id"])["hosts"][B]["state"] == "gone"


def test_mixed_extent_sizes_in_a_group_are_refused(harness, bucket) -> None:
    harness.member(A, bucket, extent_pages=8).heartbeat()
    with pytest.raises(Conflict, match="different extent sizes.*same objfs version"):
        harness.member(B, bucket, extent_pages=4).heartbeat()
    # Another group (another prefix) may use another size.
    harness.member(C, bucket, "data/", extent_pages=4).heartbeat()


def test_several_groups_need_a_choice(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    joined(harness.member(A, bucket), harness.member(B, bucket, "data/"))
    client = harness.client()
    with pytest.raises(Conflict, match="several member groups") as err:
        client.submit(f"s3://{bucket}/data/")
    assert err.value.code == "ambiguous_group"
    group = client.members()["groups"][1]["id"]
    assert group.endswith(f"/{bucket}/data/")
    job = client.submit(f"s3://{bucket}/data/", group=group)
    assert planned(client, job["id"])["group"] == group
    # Only the group mounting the whole bucket covers other/.
    assert client.submit(f"s3://{bucket}/other/")["group"].endswith(f"/{bucket}/")


# ---- the master restarting ------------------------------------------------------------------

def test_a_restarted_master_resumes_its_jobs(harness, s3, bucket) -> None:
    data = dataset()
    put_many(s3, bucket, data)
    a, b = harness.member(A, bucket), harness.member(B, bucket)
    joined(a, b)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/")
    planned(client, job["id"])
    a.heartbeat()
    b.heartbeat()
    a.work(limit=2)
    a.heartbeat(want_tasks=0)
    b.work(limit=1)               # its result is not delivered before the restart
    before = client.status(job["id"])

    harness.restart()
    resumed = client.status(job["id"])
    assert resumed["state"] == "running"
    assert resumed["bytes"]["done"] == before["bytes"]["done"] > 0
    assert resumed["extents"]["final"] == before["extents"]["final"]
    drive([a, b], lambda: client.status(job["id"])["state"] == "done")
    status = client.status(job["id"])
    assert status["bytes"]["done"] == status["bytes"]["total"]
    assert status["extents"]["reassigned"] == 0
    done = collections.Counter((i.key, i.extent) for m in (a, b) for i in m.done)
    assert set(done.values()) == {1}  # nothing fetched twice across the restart


def test_members_are_remembered_across_a_master_restart(harness, bucket) -> None:
    joined(harness.member(A, bucket), harness.member(B, bucket))
    harness.restart()
    assert [m["id"] for m in harness.client().members()["members"]] == [A, B]
    harness.expire()  # neither heartbeats after the restart: both dropped
    assert harness.client().members()["members"] == []


# ---- cancel, failures, limits -----------------------------------------------------------------

def test_cancel_stops_the_members_and_is_final(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    a, b = harness.member(A, bucket), harness.member(B, bucket)
    joined(a, b)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/")
    planned(client, job["id"])
    a.heartbeat()
    assert a.held
    a.work(limit=1)
    status = client.cancel(job["id"])
    assert status["state"] == "cancelled" and status["ended_at"] is not None
    reply = a.heartbeat()  # reports one result (ignored) and holds the rest
    assert reply.jobs[job["id"]].state == "cancelled"
    assert not reply.work and not a.held
    assert not b.heartbeat().work
    with pytest.raises(Conflict, match="already cancelled"):
        client.cancel(job["id"])
    assert client.status(job["id"])["state"] == "cancelled"


def test_a_failing_extent_is_retried_then_fails_the_job(harness, s3, bucket) -> None:
    data = dataset()
    put_many(s3, bucket, data)
    a = harness.member(A, bucket)
    joined(a)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/")
    planned(client, job["id"])
    flaky = {"data/f04.bin": 1, "data/f05.bin": 99}  # fails once / always

    def fail(item):
        if flaky.get(item.key, 0) > 0 and item.extent == 0:
            flaky[item.key] -= 1
            return "503 SlowDown: injected"
        return None

    drive([a], lambda: client.status(job["id"])["state"] in ("done", "failed"), fail=fail)
    status = client.status(job["id"])
    assert status["state"] == "failed"
    assert status["files"]["failed"] == 1 and status["extents"]["failed"] == 1
    assert status["extents"]["retried"] == 1 + 2  # f04 once, f05 twice before giving up
    assert status["errors"][0]["key"] == "data/f05.bin"
    assert "injected" in status["errors"][0]["error"]
    assert status["bytes"]["failed"] == extent_bytes(len(data["data/f05.bin"]), 0, 8)
    assert sum(status["bytes"][k] for k in ("done", "skipped", "failed")) == \
        status["bytes"]["total"]


def test_the_bandwidth_limit_is_shared_by_the_members(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    a, b = harness.member(A, bucket), harness.member(B, bucket)
    joined(a, b)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/", bandwidth_limit=100 * MiB)
    assert job["bandwidth_limit"] == 100 * MiB
    planned(client, job["id"])
    assert a.heartbeat().jobs[job["id"]].limit_bytes_per_s == 50 * MiB


# ---- bad input and auth ----------------------------------------------------------------------

def raw(harness: MasterHarness, method: str, path: str, body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data.decode()


def signed(harness, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    body = b"" if payload is None else (payload if isinstance(payload, bytes)
                                        else json.dumps(payload).encode())
    return raw(harness, method, path, body, sign(SECRET, method, path, body))


def test_bad_input_gets_a_clear_4xx(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    client = harness.client()
    with pytest.raises(Conflict, match=f"no live member mounts s3://{bucket}/data"):
        client.submit(f"s3://{bucket}/data/")
    joined(harness.member(A, bucket, "data/"))
    cases = [
        ({"source": "http://x/y"}, 400, "not an s3:// URL"),
        ({"source": "s3://"}, 400, "bucket"),
        ({"source": f"s3://{bucket}/a//b"}, 400, "invalid path"),
        ({"source": f"s3://{bucket}/../x"}, 400, "'..'"),
        ({"source": 5}, 400, "source must be a string"),
        ({}, 400, "either source"),
        ({"source": "s3://b/x", "files": ["s3://b/y"]}, 400, "either source"),
        ({"files": []}, 400, "non-empty list"),
        ({"files": ["s3://b1/x", "s3://b2/y"]}, 400, "one bucket"),
        ({"files": [f"s3://{bucket}/dir/"]}, 400, "is not a file"),
        ({"source": "s3://b/x", "bogus": 1}, 400, "unknown field"),
        ({"source": "s3://b/x", "bandwidth_limit": -1}, 400, "bandwidth_limit"),
        ({"source": f"s3://{bucket}/other/"}, 409, "no live member mounts"),
        ({"source": "s3://no-such-bucket-here/data/"}, 409, "no live member mounts"),
        ({"source": f"s3://{bucket}/data/nope"}, 404, "does not exist"),
        ({"source": f"s3://{bucket}/data/f01.bin", "group": "x"}, 409, "group 'x'"),
    ]
    for payload, status, message in cases:
        code, answer = signed(harness, "POST", "/v1/preloads", payload)
        assert code == status, (payload, answer)
        assert set(answer) == {"error", "code"} and message in answer["error"], answer
        assert "\n" not in answer["error"]
    code, answer = signed(harness, "POST", "/v1/preloads", b"{not json")
    assert code == 400 and "not JSON" in answer["error"]
    for method, path in (("GET", "/v1/preloads/0123456789abcdef"),
                         ("DELETE", "/v1/preloads/nope"), ("GET", "/v1/nothing-here")):
        code, answer = signed(harness, method, path)
        assert code == 404 and answer["code"] == "not_found", (path, answer)
    with pytest.raises(NotFound, match="no preload job"):
        client.status("0123456789abcdef")
    with pytest.raises(BadRequest):
        client.submit("s3:/bad")


def test_a_bucket_missing_at_the_origin_is_404(harness) -> None:
    joined(harness.member(A, "ghost-bucket"))
    with pytest.raises(NotFound, match="bucket 'ghost-bucket' does not exist"):
        harness.client().submit("s3://ghost-bucket/data/")


def test_unsigned_or_badly_signed_calls_get_401_and_nothing_else(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    member = harness.member(A, bucket)
    joined(member)
    job = harness.client().submit(f"s3://{bucket}/data/")
    body = json.dumps(member.report(10, 1 << 30).to_json()).encode()
    stale = sign(SECRET, "GET", "/v1/preloads", now=time.time() - 3600)
    wrong = sign(b"another-secret-0123456789abcdef", "GET", "/v1/preloads")
    other_path = sign(SECRET, "GET", "/v1/members")
    for method, path, payload, headers in [
            ("GET", "/v1/preloads", b"", {}),
            ("GET", f"/v1/preloads/{job['id']}", b"", {}),
            ("DELETE", f"/v1/preloads/{job['id']}", b"", {}),
            ("POST", "/v1/preloads", b'{"source": "s3://x/y"}', {}),
            ("POST", "/v1/members/heartbeat", body, {}),
            ("GET", "/v1/preloads", b"", stale),
            ("GET", "/v1/preloads", b"", wrong),
            ("GET", "/v1/preloads", b"", other_path),
            ("POST", "/v1/members/heartbeat", body, sign(SECRET, "POST",
                                                          "/v1/members/heartbeat", b"{}")),
            ("GET", "/v1/no-such-path", b"", {})]:
        code, answer = raw(harness, method, path, payload, headers)
        assert code == 401 and answer == {"error": "unauthorized"}, (method, path, answer)
    with pytest.raises(Unauthorized, match="refused our signature"):
        harness.client(secret=b"another-secret-0123456789abcdef").list()
    assert harness.client().status(job["id"])["state"] != "cancelled"
    code, text = raw(harness, "GET", "/metrics")
    assert code == 200
    refused = {s.name: s.value for f in text_string_to_metric_families(text)
               for s in f.samples}["objfs_master_auth_refused_total"]
    assert refused == 11


def test_metrics_count_members_jobs_and_bytes(harness, s3, bucket) -> None:
    put_many(s3, bucket, dataset())
    a, b = harness.member(A, bucket), harness.member(B, bucket)
    joined(a, b)
    client = harness.client()
    job = client.submit(f"s3://{bucket}/data/")
    drive([a, b], lambda: client.status(job["id"])["state"] == "done")
    total = client.status(job["id"])["bytes"]["total"]
    code, text = raw(harness, "GET", "/metrics")
    assert code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    group = client.members()["groups"][0]["id"]
    assert samples[("objfs_master_members", (("group", group),))] == 2
    assert samples[("objfs_master_jobs", (("state", "done"),))] == 1
    assert samples[("objfs_master_jobs", (("state", "running"),))] == 0
    assert samples[("objfs_master_preload_bytes_total", (("result", "fetched"),))] == total
    assert samples[("objfs_master_jobs_submitted_total", ())] == 1
