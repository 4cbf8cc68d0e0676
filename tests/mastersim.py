"""A master run in the test process, and simulated members that talk to it over real HTTP.

``MasterHarness`` runs ``objfs.master.server.MasterService`` on a free loopback port with a
fake monotonic clock for member liveness, so a test drops a member by advancing the clock,
never by waiting. ``SimMember`` is a daemon as the master sees it: it heartbeats (signed,
through ``MasterClient``), holds the work it is given, "fetches" extents by marking them Ready
in a set (or fails them on demand), and reports results; ``restart`` loses what it held, as a
restarted daemon does. Nothing inside the master is mocked.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from objfs.master.client import MasterClient
from objfs.master.coordinator import Coordinator
from objfs.master.planner import extent_bytes
from objfs.master.protocol import (HeartbeatReply, JobInfo, MemberReport, Origin, TaskRef,
                                   TaskResult, WorkItem, normalize_endpoint)
from objfs.master.server import MasterConfig, MasterService
from tests.conftest import OBJFS, free_port, run_objfs, wait_port

SECRET = b"test-cluster-secret-0123456789abcdef"


def write_secret(directory: Path, secret: bytes = SECRET, name: str = "cluster.secret") -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return path


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class MasterHarness:
    def __init__(self, directory: Path, endpoint: str, *, member_timeout: float = 10.0,
                 heartbeat_interval: float = 1.0, max_attempts: int = 3,
                 origin: object = None) -> None:
        self.directory = directory
        self.origin = origin  # an OriginLister instead of the real one (listing endpoint)
        self.endpoint = endpoint
        self.secret_file = write_secret(directory)
        self.clock = FakeClock()
        self.port = free_port()
        self.config = MasterConfig.create(
            listen=f"127.0.0.1:{self.port}", state_dir=str(directory / "state"),
            secret_file=str(self.secret_file), endpoint=endpoint,
            heartbeat_interval=heartbeat_interval, member_timeout=member_timeout,
            max_attempts=max_attempts)
        self.service: MasterService | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MasterHarness":
        clock = self.clock
        fake = self.origin
        self.service = MasterService(
            self.config, coordinator_factory=lambda state, origin, settings: Coordinator(
                state, fake or origin, settings=settings, clock=clock)).start()
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def coordinator(self) -> Coordinator:
        assert self.service is not None and self.service.coordinator is not None
        return self.service.coordinator

    def client(self, secret: bytes | None = None) -> MasterClient:
        return MasterClient(self.url, SECRET if secret is None else secret, timeout=30)

    def member(self, member_id: str, bucket: str, prefix: str = "", *,
               extent_pages: int = 8, capacity: int = 10 << 30,
               endpoint: str | None = None) -> "SimMember":
        origin = Origin(normalize_endpoint(endpoint or self.endpoint), bucket, prefix)
        return SimMember(self.client(), member_id, origin, extent_pages=extent_pages,
                         capacity=capacity)

    def expire(self, *alive: "SimMember") -> None:
        """Let the member timeout pass on the fake clock while only ``alive`` heartbeat, and
        sweep: every other member is dropped. (Two steps of 0.6 timeouts, so the master's own
        background sweep, whenever it runs, never drops a member that is alive.)"""
        for _ in range(2):
            self.clock.advance(0.6 * self.config.member_timeout_s)
            for member in alive:
                member.heartbeat(want_tasks=0)
        self.coordinator.sweep()


class SimMember:
    def __init__(self, client: MasterClient, member_id: str, origin: Origin, *,
                 extent_pages: int = 8, capacity: int = 10 << 30) -> None:
        self.client = client
        self.id = member_id
        self.origin = origin
        self.extent_pages = extent_pages
        self.capacity = capacity
        self.incarnation = uuid.uuid4().hex
        self.held: dict[TaskRef, WorkItem] = {}
        self.results: list[TaskResult] = []      # to report in the next heartbeat
        self.members: tuple[str, ...] = ()
        self.jobs: dict[str, JobInfo] = {}
        self.ready: set[tuple[str, str, int]] = set()   # (key, etag, extent) "in the cache"
        self.done: list[WorkItem] = []           # every extent this member completed
        self.last_reply: HeartbeatReply | None = None

    def report(self, want_tasks: int, want_bytes: int) -> MemberReport:
        return MemberReport(member=self.id, incarnation=self.incarnation, origin=self.origin,
                            extent_pages=self.extent_pages, capacity_bytes=self.capacity,
                            used_bytes=0, free_bytes=self.capacity, held=tuple(self.held),
                            results=tuple(self.results), jobs=(), want_tasks=want_tasks,
                            want_bytes=want_bytes)

    def heartbeat(self, want_tasks: int = 1000, want_bytes: int = 1 << 40) -> HeartbeatReply:
        reply = self.client.heartbeat(self.report(want_tasks, want_bytes))
        self.results.clear()
        for ref in reply.revoked:
            self.held.pop(ref, None)
        self.jobs.update(reply.jobs)
        for job_id, info in reply.jobs.items():
            if info.state != "running":
                for ref in [r for r in self.held if r.job == job_id]:
                    del self.held[ref]
        for item in reply.work:
            self.held[item.ref] = item
        self.members = reply.members
        self.last_reply = reply
        return reply

    def work(self, limit: int | None = None,
             fail: Callable[[WorkItem], str | None] | None = None) -> int:
        """Complete up to ``limit`` held extents: Ready ones are skipped, others "fetched"
        (or failed when ``fail`` returns an error)."""
        count = 0
        for ref, item in list(self.held.items())[:limit]:
            nbytes = extent_bytes(item.size, item.extent, item.extent_pages)
            error = fail(item) if fail is not None else None
            key = (item.key, item.etag, item.extent)
            if error is not None:
                result = TaskResult(ref.job, ref.task, "failed", 0, 0, error)
            elif key in self.ready:
                result = TaskResult(ref.job, ref.task, "done", 0, nbytes)
            else:
                self.ready.add(key)
                result = TaskResult(ref.job, ref.task, "done", nbytes, 0)
                self.done.append(item)
            del self.held[ref]
            self.results.append(result)
            count += 1
        return count

    def restart(self) -> None:
        """A daemon restart: new incarnation, held work and unsent results lost."""
        self.incarnation = uuid.uuid4().hex
        self.held.clear()
        self.results.clear()


def drive(members: Iterable[SimMember], done: Callable[[], bool], rounds: int = 200,
          **work_kwargs: object) -> int:
    """Heartbeat and work every member in turn until ``done()``; returns the rounds used."""
    members = list(members)
    for round_no in range(rounds):
        for member in members:
            member.heartbeat()
            member.work(**work_kwargs)  # type: ignore[arg-type]
        for member in members:
            member.heartbeat(want_tasks=0)  # deliver the results
        if done():
            return round_no + 1
    raise AssertionError(f"not done after {rounds} rounds")


class MasterProcess:
    def __init__(self, tmp: Path, endpoint: str) -> None:
        self.tmp = tmp
        self.endpoint = endpoint
        self.secret_file = write_secret(tmp)
        self.state_dir = tmp / "master-state"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "master.log"
        self.proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        return ["master", "--listen", f"127.0.0.1:{self.port}", "--state-dir",
                str(self.state_dir), "--cluster-secret-file", str(self.secret_file),
                "--endpoint", self.endpoint, "--heartbeat-interval", "0.5",
                "--member-timeout", "3"]

    def start(self) -> "MasterProcess":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([OBJFS, *self.args()], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def client(self) -> MasterClient:
        return MasterClient(self.url, SECRET)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_objfs(*args, "--master", self.url, "--cluster-secret-file",
                         str(self.secret_file), timeout=timeout)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([OBJFS, *args, "--master", self.url, "--cluster-secret-file",
                                 str(self.secret_file)], text=True, **kwargs)

    def member(self, member_id: str, bucket: str) -> SimMember:
        return SimMember(self.client(), member_id,
                         Origin(normalize_endpoint(self.endpoint), bucket, ""))
