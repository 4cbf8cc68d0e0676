"""A Hypothesis state machine over the master's coordinator: members come, go, restart, fail
extents; jobs are submitted and cancelled; the master itself restarts on the same state.

The coordinator is driven directly (fake origin and clock from the unit tests, a real LMDB
state store in a temp dir, planning run synchronously). After every step its own
``check_invariants`` must hold (every unfinished extent in exactly one work index under its
assignee, counters equal to what the extents say). At the end the surviving members work
until every job is final, and the model checks the outcome: a job that was not cancelled is
done, its bytes are the bytes of the objects under its prefix, each extent counted exactly
once (fetched or skipped), and every extent the members report holding was theirs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from objfs.master.coordinator import Coordinator, Settings
from objfs.master.errors import Conflict
from objfs.master.planner import extent_bytes
from objfs.master.protocol import MemberReport, PreloadRequest, TaskRef, TaskResult, WorkItem
from objfs.master.state import StateStore
from tests.unit.test_master import ORIGIN, Clock, FakeOrigin, Sync

MiB = 1024 * 1024
MEMBERS = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"]
OBJECTS = {"a/1": 3 * MiB, "a/2": 17 * MiB, "a/3": 0, "a/4": 1, "b/1": 9 * MiB,
           "b/2": 8 * MiB, "b/3": 5}
PREFIXES = ["a/", "b/", ""]
TIMEOUT = 10.0


class MasterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="objfs-master-model-"))
        self.origin = FakeOrigin(OBJECTS, page_size=2)
        self.clock = Clock()
        self.settings = Settings(heartbeat_interval_s=1, member_timeout_s=TIMEOUT,
                                 max_attempts=2, max_tasks_per_reply=5)
        self.state = StateStore(self.dir / "state")
        self.coordinator = self._open()
        self.alive: set[str] = set()                        # members that heartbeat
        self.registered: set[str] = set()                   # members the master knows
        self.held: dict[str, dict[TaskRef, WorkItem]] = {m: {} for m in MEMBERS}
        self.results: dict[str, list[TaskResult]] = {m: [] for m in MEMBERS}
        self.jobs: dict[str, str] = {}                      # job id -> prefix
        self.cancelled: set[str] = set()

    def _open(self) -> Coordinator:
        coordinator = Coordinator(self.state, self.origin, settings=self.settings,
                                  clock=self.clock, planner=Sync())  # type: ignore[arg-type]
        coordinator.resume()
        return coordinator

    def beat(self, member: str, want: int = 5) -> None:
        report = MemberReport(member, "i", ORIGIN, 8, 1 << 40, 0, 1 << 40,
                              tuple(self.held[member]), tuple(self.results[member]), (), want,
                              1 << 40)
        reply = self.coordinator.heartbeat(report)
        self.registered.add(member)
        assert set(reply.members) == self.registered
        self.results[member] = []
        for ref in reply.revoked:
            self.held[member].pop(ref, None)
        for job_id, info in reply.jobs.items():
            if info.state != "running":
                for ref in [r for r in self.held[member] if r.job == job_id]:
                    del self.held[member][ref]
        for item in reply.work:
            assert item.ref not in self.held[member]
            self.held[member][item.ref] = item

    # ---- rules -----------------------------------------------------------------------------

    @rule(member=st.sampled_from(MEMBERS), want=st.integers(0, 5))
    def heartbeat(self, member: str, want: int) -> None:
        self.alive.add(member)
        self.beat(member, want)

    @rule(member=st.sampled_from(MEMBERS), count=st.integers(1, 4), fail=st.booleans())
    def work(self, member: str, count: int, fail: bool) -> None:
        for ref, item in list(self.held[member].items())[:count]:
            nbytes = extent_bytes(item.size, item.extent, item.extent_pages)
            result = TaskResult(ref.job, ref.task, "failed", 0, 0, "injected") if fail \
                else TaskResult(ref.job, ref.task, "done", nbytes, 0)
            del self.held[member][ref]
            self.results[member].append(result)

    @rule(member=st.sampled_from(MEMBERS))
    def restart_member(self, member: str) -> None:
        self.held[member].clear()
        self.results[member].clear()

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def member_goes_silent(self, data: st.DataObject) -> None:
        gone = data.draw(st.sampled_from(sorted(self.alive)))
        self.alive.discard(gone)
        for _ in range(2):
            self.clock.now += 0.6 * TIMEOUT
            for member in sorted(self.alive):
                self.beat(member, want=0)
        self.coordinator.sweep()
        self.registered.discard(gone)
        self.held[gone].clear()
        self.results[gone].clear()

    @rule(prefix=st.sampled_from(PREFIXES))
    def submit(self, prefix: str) -> None:
        try:
            status = self.coordinator.submit(PreloadRequest("data", path=prefix))
        except Conflict:
            assert not self.alive  # nobody mounts anything
            return
        self.jobs[status["id"]] = prefix

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        try:
            self.coordinator.cancel(job_id)
            self.cancelled.add(job_id)
        except Conflict:
            assert self.coordinator.status(job_id)["state"] in ("done", "failed",
                                                                 "cancelled")

    @rule()
    def restart_master(self) -> None:
        self.coordinator.close()
        self.coordinator = self._open()

    @invariant()
    def consistent(self) -> None:
        self.coordinator.check_invariants()

    def teardown(self) -> None:
        try:
            self._settle_and_check()
        finally:
            self.coordinator.close()
            self.state.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _settle_and_check(self) -> None:
        if not self.alive:
            self.alive.add(MEMBERS[0])
        for _ in range(200):
            for member in sorted(self.alive):
                self.beat(member)
                self.work(member, 1000, fail=False)
                self.beat(member, want=0)
            states = {j: self.coordinator.status(j)["state"] for j in self.jobs}
            if all(s in ("done", "failed", "cancelled") for s in states.values()):
                break
        else:
            raise AssertionError(f"jobs did not finish: {states}")
        self.coordinator.check_invariants()
        for job_id, prefix in self.jobs.items():
            status = self.coordinator.status(job_id)
            if job_id in self.cancelled:
                assert status["state"] == "cancelled"
                continue
            size = sum(s for k, s in OBJECTS.items() if k.startswith(prefix))
            b = status["bytes"]
            assert b["total"] == size
            assert b["done"] + b["skipped"] + b["failed"] == size
            if status["state"] == "done":
                assert b["failed"] == 0 and status["files"]["failed"] == 0
            else:
                assert status["state"] == "failed" and status["extents"]["failed"] > 0


MasterMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestMaster = MasterMachine.TestCase
