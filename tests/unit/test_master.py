"""Unit tests of the master's parts: planner rules, the job/extent state machines, the wire
protocol's validation, and the coordinator driven directly (fake origin, fake clock, a real
LMDB state store in a temp dir) with its invariants checked after every step."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from objfs.cache.pages import ObjectVersion, version_digest
from objfs.cache.ring import Ring
from objfs.master.coordinator import Coordinator, Settings
from objfs.master.errors import BadRequest, Conflict, NotFound, OriginFailed
from objfs.master.jobs import (JOB_TRANSITIONS, TASK_TRANSITIONS, IllegalTransition, Job,
                               JobState, TaskState, check_job_transition,
                               check_task_transition)
from objfs.master.planner import (check_extent_pages, choose_group, extent_bytes,
                                  plan_object)
from objfs.master.protocol import (HeartbeatReply, MemberReport, Origin, PreloadRequest,
                                   TaskRef, TaskResult, parse_source)
from objfs.master.state import StateStore
from objfs.store import ObjectInfo

MiB = 1024 * 1024
A, B, C = "10.0.0.1:9567", "10.0.0.2:9567", "10.0.0.3:9567"
ORIGIN = Origin("http://s3.local:9000", "data", "")


def info(key: str, size: int) -> ObjectInfo:
    return ObjectInfo(key, size, '"' + hashlib.md5(key.encode()).hexdigest() + '"', 0)


# ---- planner --------------------------------------------------------------------------------

def test_plan_object_cuts_extents_and_names_the_ring_owner() -> None:
    obj = info("train/shard-0001.tar", 20 * MiB + 3)
    ring = Ring.of([A, B, C], A, 8)
    planned = plan_object("data", obj, ring, 8)
    assert [p.extent for p in planned] == [0, 1, 2]
    assert [p.nbytes for p in planned] == [8 * MiB, 8 * MiB, 4 * MiB + 3]
    version = ObjectVersion("data", obj.key, obj.etag, obj.size)
    assert [p.owner for p in planned] == [ring.owner(version, e * 8) for e in range(3)]
    assert planned[0].digest == version_digest(version)
    assert plan_object("data", info("empty", 0), ring, 8) == []
    assert all(p.owner is None for p in plan_object("data", obj, None, 8))
    assert extent_bytes(5, 0, 8) == 5 and extent_bytes(5, 1, 8) == 0


def test_choose_group() -> None:
    whole = Origin("http://s3", "data", "")
    sub = Origin("http://s3", "data", "imagenet/")
    other = Origin("http://s3", "logs", "")
    groups = {whole: [A], sub: [B], other: [], }
    assert choose_group(groups, "data", ["models/"], None) == whole
    with pytest.raises(Conflict, match="several member groups"):
        choose_group(groups, "data", ["imagenet/train/"], None)
    assert choose_group(groups, "data", ["imagenet/train/"], sub.group_id) == sub
    with pytest.raises(Conflict, match="no live member mounts s3://logs/x"):
        choose_group(groups, "logs", ["x"], None)  # its group has no live member
    with pytest.raises(Conflict, match="group 'nope'"):
        choose_group(groups, "data", ["x"], "nope")
    with pytest.raises(Conflict, match="these files of data"):
        choose_group({sub: [B]}, "data", ["imagenet/a", "other/b"], None)
    assert sub.group_id == "http://s3/data/imagenet/"
    assert Origin("", "data", "p/").group_id == "s3://data/p/"


def test_mixed_extent_sizes_are_named() -> None:
    assert check_extent_pages({A: 8, B: 8}) == 8
    with pytest.raises(Conflict, match=f"4 pages on {C}; 8 pages on {A}, {B}"):
        check_extent_pages({A: 8, B: 8, C: 4})


# ---- state machines -------------------------------------------------------------------------

def test_job_transitions_follow_the_table() -> None:
    for old in JobState:
        for new in JobState:
            if new in JOB_TRANSITIONS[old]:
                check_job_transition(old, new)
            else:
                with pytest.raises(IllegalTransition):
                    check_job_transition(old, new)
    assert {s for s in JobState if s.final} == {JobState.DONE, JobState.FAILED,
                                                JobState.CANCELLED}
    assert all(not JOB_TRANSITIONS[s] for s in JobState if s.final)


def test_task_transitions_follow_the_table() -> None:
    for old in TaskState:
        for new in TaskState:
            if new in TASK_TRANSITIONS[old]:
                check_task_transition(old, new)
            else:
                with pytest.raises(IllegalTransition):
                    check_task_transition(old, new)


def test_job_record_round_trips() -> None:
    job = Job(id="0" * 16, source="s3://b/p/", bucket="b", kind="dir", prefix="p/", keys=[],
              group="g", extent_pages=8, created_at=1.0, bandwidth_limit=5)
    job.host(A).bytes_done = 7
    job.transition(JobState.RUNNING, 2.0)
    job.add_error({"key": "k"})
    again = Job.from_json(job.to_json())
    assert again == job and again.state is JobState.RUNNING and again.hosts[A].bytes_done == 7
    with pytest.raises(IllegalTransition, match="a running job cannot become queued"):
        job.transition(JobState.QUEUED, 3.0)


# ---- protocol -------------------------------------------------------------------------------

def test_member_report_round_trips_and_is_validated() -> None:
    report = MemberReport(A, "inc", ORIGIN, 8, 10, 2, 8, (TaskRef("j" * 16, 3),),
                          (TaskResult("j" * 16, 2, "failed", 5, 0, "boom"),), ("k" * 16,),
                          100, 1 << 30)
    assert MemberReport.from_json(report.to_json()) == report
    good = report.to_json()
    for change, message in [({"member": "nohost"}, "HOST:PORT"),
                            ({"extent_pages": 0}, "extent_pages"),
                            ({"protocol": 2}, "protocol"),
                            ({"held": "x"}, "held must be a list"),
                            ({"results": [{"job": "j", "task": 1, "state": "meh"}]},
                             "'done' or 'failed'"),
                            ({"want_tasks": -1}, "non-negative"),
                            ({"origin": {"bucket": "b", "prefix": "p"}}, "end with '/'"),
                            ({"origin": {"bucket": "b", "endpoint": "ftp://x"}}, "endpoint")]:
        with pytest.raises(BadRequest, match=message):
            MemberReport.from_json({**good, **change})


def test_heartbeat_reply_round_trips() -> None:
    from objfs.master.protocol import JobInfo, WorkItem

    reply = HeartbeatReply((A, B), 8, 2.0, 15.0,
                           (WorkItem("j" * 16, 1, "k", '"e"', 10, 0, 8),),
                           {"j" * 16: JobInfo("running", 5)}, (TaskRef("j" * 16, 0),))
    assert HeartbeatReply.from_json(reply.to_json()) == reply


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://b1", ("b1", "")), ("s3://b1/", ("b1", "")), ("s3://b1/a/b", ("b1", "a/b")),
    ("s3://b1/a/b/", ("b1", "a/b/")), ("s3://b1/a b/é", ("b1", "a b/é")),
])
def test_parse_source(url: str, expected: tuple[str, str]) -> None:
    assert parse_source(url) == expected


def test_preload_request_dedupes_files() -> None:
    request = PreloadRequest.from_json({"files": ["s3://b1/x", "s3://b1/y", "s3://b1/x"]})
    assert request.keys == ("x", "y") and request.source == "s3://b1/x and 1 more files"
    assert PreloadRequest.from_json(request.to_json()) == request


# ---- the coordinator, driven directly -------------------------------------------------------

class FakeOrigin:
    """Objects in memory; listings come in pages of ``page_size``; a listing can be held
    after its first page (``hold``) or fail (``fail``)."""

    def __init__(self, objects: dict[str, int], page_size: int = 3) -> None:
        self.objects = {"data": {k: info(k, s) for k, s in objects.items()}}
        self.page_size = page_size
        self.hold: threading.Event | None = None
        self.waiting = threading.Event()  # set when a held listing waits
        self.fail: Exception | None = None
        self.lists = 0

    def first_key(self, bucket: str, prefix: str) -> str | None:
        if bucket not in self.objects:
            raise NotFound(f"bucket {bucket!r} does not exist")
        return next((k for k in sorted(self.objects[bucket]) if k.startswith(prefix)), None)

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        return self.objects.get(bucket, {}).get(key)

    def head_many(self, bucket: str, keys: Sequence[str]) -> list[ObjectInfo | None]:
        return [self.head(bucket, k) for k in keys]

    def list(self, bucket: str, prefix: str) -> Iterator[list[ObjectInfo]]:
        self.lists += 1
        found = [o for k, o in sorted(self.objects[bucket].items()) if k.startswith(prefix)]
        for i in range(0, len(found), self.page_size):
            if i and self.hold is not None:
                self.waiting.set()
                self.hold.wait(30)
            if self.fail is not None:
                raise self.fail
            yield found[i:i + self.page_size]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sync:
    """An executor that runs planning at once in the caller (deterministic tests)."""

    def __init__(self) -> None:
        self.deferred: list = []
        self.defer = False

    def submit(self, fn, *args):  # type: ignore[no-untyped-def]
        if self.defer:
            self.deferred.append((fn, args))
        else:
            fn(*args)

    def run_deferred(self) -> None:
        while self.deferred:
            fn, args = self.deferred.pop(0)
            fn(*args)


def make(tmp_path: Path, origin: FakeOrigin, wall_clock=time.time,
         **settings) -> tuple[Coordinator, Clock, Sync]:
    clock, planner = Clock(), Sync()
    coordinator = Coordinator(StateStore(tmp_path / "state"), origin,
                              settings=Settings(heartbeat_interval_s=1, member_timeout_s=10,
                                                **settings),
                              clock=clock, planner=planner,  # type: ignore[arg-type]
                              wall_clock=wall_clock)
    coordinator.resume()
    return coordinator, clock, planner


def beat(coordinator: Coordinator, member: str, held=(), results=(), want: int = 1000,
         want_bytes: int = 1 << 40, extent_pages: int = 8) -> HeartbeatReply:
    reply = coordinator.heartbeat(MemberReport(member, "i", ORIGIN, extent_pages, 10 << 30,
                                               0, 10 << 30, tuple(held), tuple(results), (),
                                               want, want_bytes))
    coordinator.check_invariants()
    return reply


def finish_all(coordinator: Coordinator, members: list[str]) -> None:
    held: dict[str, list] = {m: [] for m in members}
    for _ in range(50):
        for m in members:
            results = [TaskResult(w.job, w.task, "done", extent_bytes(w.size, w.extent, 8))
                       for w in held[m]]
            held[m] = list(beat(coordinator, m, results=results).work)
        if not any(held.values()):
            return
    raise AssertionError("did not finish")


DATASET = {"a/one": 3 * MiB, "a/two": 20 * MiB, "a/three": 1, "a/empty": 0, "a/dir/": 0,
           "a/four": 9 * MiB, "a/five": 5, "b/other": 7}


def test_a_job_completes_with_exact_accounting(tmp_path: Path) -> None:
    coordinator, _, _ = make(tmp_path, FakeOrigin(DATASET))
    beat(coordinator, A, want=0)
    beat(coordinator, B, want=0)
    job = coordinator.submit(PreloadRequest("data", path="a"))
    coordinator.check_invariants()
    finish_all(coordinator, [A, B])
    status = coordinator.status(job["id"])
    size = sum(s for k, s in DATASET.items() if k.startswith("a/"))
    assert status["state"] == "done" and status["bytes"]["done"] == size
    assert status["files"] == {"total": 6, "done": 5, "skipped": 1, "failed": 0}
    assert status["extents"]["total"] == 1 + 3 + 1 + 2 + 1
    coordinator.close()


def test_an_interrupted_listing_is_resumed_without_planning_a_key_twice(tmp_path) -> None:
    origin = FakeOrigin(DATASET, page_size=2)
    coordinator, _, planner = make(tmp_path, origin)
    beat(coordinator, A, want=0)
    planner.defer = True
    job = coordinator.submit(PreloadRequest("data", path="a/"))
    assert job["state"] == "queued"
    origin.hold = threading.Event()
    thread = threading.Thread(target=planner.run_deferred)
    thread.start()
    assert origin.waiting.wait(30)  # the first page is planned, the listing waits
    first = coordinator.status(job["id"])
    assert first["listing"] is True and first["files"]["total"] == 1  # a/dir/ is no file
    coordinator.close()     # the "master stops": planning ends after this page
    origin.hold.set()
    thread.join(10)
    state = coordinator._state  # the same LMDB, as a restarted master opens it

    restarted = Coordinator(state, origin, settings=coordinator.settings, clock=Clock(),
                            planner=Sync())  # type: ignore[arg-type]
    origin.hold = None
    restarted.resume()      # relists from the start, skips the planned keys
    restarted.check_invariants()
    status = restarted.status(job["id"])
    assert status["state"] == "running" and not status["listing"]
    assert status["files"]["total"] == 6 and origin.lists == 2
    finish_all(restarted, [A])
    assert restarted.status(job["id"])["state"] == "done"


def test_extents_of_a_group_without_members_wait_for_one(tmp_path) -> None:
    coordinator, clock, _ = make(tmp_path, FakeOrigin(DATASET))
    beat(coordinator, A, want=0)
    job = coordinator.submit(PreloadRequest("data", path="a/"))
    clock.now += 11
    coordinator.sweep()      # A is gone: everything it had waits, owned by nobody
    coordinator.check_invariants()
    status = coordinator.status(job["id"])
    assert status["hosts"][A]["state"] == "gone" and status["hosts"][A]["extents_assigned"] == 0
    assert "no live member" in status["warnings"][0]
    reply = beat(coordinator, B)  # B joins and takes it all
    assert len(reply.work) == status["extents"]["total"]
    finish_all(coordinator, [B])
    assert coordinator.status(job["id"])["state"] == "done"


def test_a_job_of_empty_files_is_done_at_once(tmp_path) -> None:
    coordinator, _, _ = make(tmp_path, FakeOrigin({"e/1": 0, "e/2": 0}))
    beat(coordinator, A, want=0)
    status = coordinator.status(coordinator.submit(PreloadRequest("data", path="e/"))["id"])
    assert status["state"] == "done" and status["files"]["skipped"] == 2


def test_a_failed_listing_fails_the_job(tmp_path) -> None:
    origin = FakeOrigin(DATASET, page_size=1)
    coordinator, _, planner = make(tmp_path, origin)
    beat(coordinator, A, want=0)
    origin.fail = OriginFailed("origin http://x: 500 InternalError: boom")
    job = coordinator.submit(PreloadRequest("data", path="a/"))
    status = coordinator.status(job["id"])
    assert status["state"] == "failed" and "listing s3://data/a/ failed" in status["message"]
    coordinator.check_invariants()


def test_leases_respect_what_the_member_wants(tmp_path) -> None:
    coordinator, _, _ = make(tmp_path, FakeOrigin({f"k/{i}": MiB for i in range(30)}),
                             max_tasks_per_reply=10)
    beat(coordinator, A, want=0)
    coordinator.submit(PreloadRequest("data", path="k/"))
    first = beat(coordinator, A, want=3).work
    assert len(first) == 3
    reply = beat(coordinator, A, want=100)  # it held nothing: the 3 come back, 10 at most
    assert len(reply.work) == 10 and {w.ref for w in first} <= {w.ref for w in reply.work}
    held = [w.ref for w in reply.work]
    assert len(beat(coordinator, A, held=held, want=100, want_bytes=2 * MiB).work) == 2
    assert len(beat(coordinator, A, held=held, want=0).work) == 0


def test_stale_and_repeated_results_change_nothing(tmp_path) -> None:
    coordinator, _, _ = make(tmp_path, FakeOrigin({"k/1": 9 * MiB}))
    beat(coordinator, A, want=0)
    beat(coordinator, B, want=0)
    job = coordinator.submit(PreloadRequest("data", path="k/"))
    works = {m: beat(coordinator, m).work for m in (A, B)}
    owner = A if works[A] else B
    other = B if owner == A else A
    item = works[owner][0]
    done = TaskResult(item.job, item.task, "done", 8 * MiB)
    beat(coordinator, other, results=[done])             # not its extent: ignored
    assert coordinator.status(job["id"])["extents"]["final"] == 0
    beat(coordinator, owner, results=[done], held=[w.ref for w in works[owner][1:]])
    beat(coordinator, owner, results=[done], held=[w.ref for w in works[owner][1:]])
    status = coordinator.status(job["id"])
    assert status["extents"]["final"] == 1 and status["bytes"]["done"] == 8 * MiB
    assert coordinator.metrics.get("results_ignored_total") == 2


def test_old_final_jobs_are_forgotten(tmp_path) -> None:
    coordinator, _, _ = make(tmp_path, FakeOrigin({"e/1": 0}), keep_jobs=2)
    beat(coordinator, A, want=0)
    ids = [coordinator.submit(PreloadRequest("data", path="e/"))["id"] for _ in range(4)]
    coordinator.sweep()
    assert [j["id"] for j in coordinator.list_jobs()] == ids[:1:-1]
    with pytest.raises(NotFound):
        coordinator.status(ids[0])


def test_jobs_submitted_within_one_millisecond_keep_their_order(tmp_path) -> None:
    coordinator, _, _ = make(tmp_path, FakeOrigin({"e/1": 0}), keep_jobs=3,
                             wall_clock=lambda: 1_800_000_000.0)  # a clock that stands still
    beat(coordinator, A, want=0)
    ids = [coordinator.submit(PreloadRequest("data", path="e/"))["id"] for _ in range(20)]
    assert ids == sorted(ids) and len(set(ids)) == 20
    coordinator.sweep()
    assert [j["id"] for j in coordinator.list_jobs()] == ids[:-4:-1]  # the 3 newest


def test_a_member_changing_its_mount_is_a_new_member(tmp_path) -> None:
    coordinator, _, _ = make(tmp_path, FakeOrigin(DATASET))
    beat(coordinator, A, want=0)
    job = coordinator.submit(PreloadRequest("data", path="a/"))
    beat(coordinator, B, want=0)
    assert len(beat(coordinator, B, extent_pages=8).work) > 0
    reply = coordinator.heartbeat(MemberReport(B, "i2", Origin("http://s3.local:9000", "data",
                                                               "b/"), 8))
    assert reply.members == (B,)  # alone in its new group; its old work went back to A
    coordinator.check_invariants()
    finish_all(coordinator, [A])
    assert coordinator.status(job["id"])["state"] == "done"


def test_extents_done_by_a_dropped_member_are_fetched_again_by_their_new_owner(tmp_path):
    coordinator, clock, _ = make(tmp_path, FakeOrigin({"k/one": 3 * MiB, "k/big": 40 * MiB}))
    beat(coordinator, A, want=0)
    beat(coordinator, B, want=0)
    job = coordinator.submit(PreloadRequest("data", path="k/"))
    work = beat(coordinator, A).work
    assert work
    results = [TaskResult(w.job, w.task, "done", extent_bytes(w.size, w.extent, 8))
               for w in work]
    beat(coordinator, A, results=results)
    before = coordinator.status(job["id"])
    assert before["hosts"][A]["extents_done"] == len(work) > 0
    clock.now += 6
    beat(coordinator, B, want=0)
    clock.now += 6
    coordinator.sweep()            # A is dropped: its finished extents are B's to fetch now
    coordinator.check_invariants()
    after = coordinator.status(job["id"])
    assert after["extents"]["final"] == 0 and after["bytes"]["done"] == 0
    assert after["files"]["done"] == 0 and after["hosts"][A]["extents_done"] == 0
    assert after["extents"]["reassigned"] == len(work)
    again = {(w.key, w.extent) for w in beat(coordinator, B).work}
    assert {(w.key, w.extent) for w in work} <= again
    finish_all(coordinator, [B])
    status = coordinator.status(job["id"])
    assert status["state"] == "done" and status["bytes"]["done"] == 43 * MiB
    assert status["files"] == {"total": 2, "done": 2, "skipped": 0, "failed": 0}
