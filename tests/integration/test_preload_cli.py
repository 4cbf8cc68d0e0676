"""`objfs master` and `objfs preload` as users run them: real processes, real HTTP, moto.

The master is an ``objfs master`` subprocess; the members are simulated
(``tests.mastersim.SimMember``) and driven by a background thread; the CLI runs as
subprocesses whose exit codes, stdout and stderr are checked. Waits poll with generous
deadlines and never assume a speed.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from objfs.master.errors import MasterError
from tests.conftest import free_port, put_many, run_objfs
from tests.mastersim import SECRET, MasterProcess, SimMember, write_secret

MiB = 1024 * 1024
A, B = "127.0.0.1:7101", "127.0.0.1:7102"


class Driver(threading.Thread):
    """Heartbeats and works the members until stopped (a cluster of simulated daemons)."""

    def __init__(self, members: list[SimMember], *, work: bool = True, pace: float = 0.02,
                 per_round: int | None = None) -> None:
        super().__init__(daemon=True)
        self.members = members
        self.working = work
        self.pace = pace
        self.per_round = per_round
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for member in self.members:
                try:
                    member.heartbeat(want_tasks=1000 if self.working else 0)
                    if self.working:
                        member.work(limit=self.per_round)
                        member.heartbeat(want_tasks=0)
                except MasterError:
                    pass  # the master is restarting
            self._halt.wait(self.pace)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@pytest.fixture
def master(tmp_path: Path, s3_endpoint: str) -> Iterator[MasterProcess]:
    m = MasterProcess(tmp_path, s3_endpoint).start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def data(s3, bucket) -> dict[str, bytes]:
    items = {f"data/f{i:02d}.bin": bytes([i]) * (i * 300_000 + 1) for i in range(12)}
    items["data/big.bin"] = b"b" * (20 * MiB)
    put_many(s3, bucket, items)
    return items


@pytest.fixture
def cluster(master: MasterProcess, bucket: str, data) -> Iterator[list[SimMember]]:
    members = [master.member(A, bucket), master.member(B, bucket)]
    for m in members:
        m.heartbeat(want_tasks=0)
    yield members


def one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("objfs: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_submit_prints_the_job_id_and_wait_follows_it_to_done(master, cluster, bucket,
                                                              data) -> None:
    result = master.cli("preload", f"s3://{bucket}/data/")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert len(job_id) == 16 and master.client().status(job_id)["source"].endswith("/data/")

    driver = Driver(cluster, per_round=1, pace=0.05)
    driver.start()
    try:
        result = master.cli("preload", f"s3://{bucket}/data/", "--wait", "--interval", "0.2")
    finally:
        driver.stop()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    total = sum(len(v) for v in data.values())
    assert lines[-1].startswith("preload ") and " done: 13 files" in lines[-1], lines
    assert "MiB/s" in lines[-1]
    assert any(("%" in line or "listing" in line) and "files" in line and "ETA" in line
               for line in lines[:-1]), lines  # plain progress lines, no bar, no \r
    assert "\r" not in result.stdout and "[#" not in result.stdout
    status = master.client().status(lines[-1].split()[1])
    assert status["bytes"]["total"] == total


def test_wait_json_prints_only_the_final_status(master, cluster, bucket) -> None:
    driver = Driver(cluster)
    driver.start()
    try:
        result = master.cli("preload", f"s3://{bucket}/data/f03.bin", "--wait", "--json")
    finally:
        driver.stop()
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "done" and status["files"]["total"] == 1
    assert status["bytes"]["done"] == 3 * 300_000 + 1


def test_status_list_and_cancel(master, cluster, bucket) -> None:
    job_id = master.cli("preload", f"s3://{bucket}/data/", "--bandwidth-limit",
                        "10M/s").stdout.strip()
    status = master.cli("preload", "status", job_id)
    assert status.returncode == 0
    assert status.stdout.split()[:3] == ["preload", job_id, "running"]
    assert "source   s3://" in status.stdout
    as_json = json.loads(master.cli("preload", "status", job_id, "--json").stdout)
    assert as_json["id"] == job_id and as_json["bandwidth_limit"] == 10 * MiB
    listing = master.cli("preload", "list")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split()[:2] == ["ID", "STATE"]
    assert job_id in listing.stdout
    assert [j["id"] for j in json.loads(master.cli("preload", "list", "--json").stdout)] \
        == [job_id]

    waiting = master.popen("preload", "status", job_id, "--wait", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        cancelled = master.cli("preload", "cancel", job_id)
        assert cancelled.returncode == 0 and cancelled.stdout.strip() == \
            f"preload {job_id} cancelled"
        out, err = waiting.communicate(timeout=60)
    finally:
        reap(waiting)
    assert waiting.returncode == 1
    assert err.strip() == f"objfs: preload {job_id} was cancelled"
    one_error_line(master.cli("preload", "cancel", job_id), "already cancelled")


def test_a_failed_job_exits_1_with_its_first_error(master, cluster, bucket) -> None:
    job_id = master.cli("preload", f"s3://{bucket}/data/f02.bin").stdout.strip()
    for _ in range(3):  # the owner fails it on every attempt
        for member in cluster:
            member.heartbeat()
            member.work(fail=lambda item: "403 AccessDenied: injected")
            member.heartbeat(want_tasks=0)
    result = master.cli("preload", "status", job_id, "--wait")
    line = one_error_line(result, f"preload {job_id} failed", "data/f02.bin",
                          "403 AccessDenied: injected")
    assert "first error" in line


def test_interrupt_leaves_the_job_running_or_cancels_it(master, cluster, bucket) -> None:
    driver = Driver(cluster, work=False)  # members alive, nobody fetches: the job waits
    driver.start()
    try:
        for extra, expected in (([], "running"), (["--cancel-on-interrupt"], "cancelled")):
            proc = master.popen("preload", f"s3://{bucket}/data/", "--wait", *extra,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                job_id = wait_for_job(master, expected_count=1 if not extra else 2)
                time.sleep(0.3)  # let it reach its wait loop
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
            finally:
                reap(proc)
            assert proc.returncode == 130, (out, err)
            assert "Traceback" not in err
            assert err.strip().splitlines()[-1].startswith("objfs: interrupted")
            assert master.client().status(job_id)["state"] == expected
    finally:
        driver.stop()


def wait_for_job(master: MasterProcess, expected_count: int) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = master.client().list()
        if len(jobs) >= expected_count:
            return jobs[0]["id"]
        time.sleep(0.05)
    raise AssertionError("the job never appeared")


def test_interrupt_on_a_terminal_asks_whether_to_cancel(master, cluster, bucket) -> None:
    driver = Driver(cluster, work=False)
    driver.start()
    pty_master, pty_slave = pty.openpty()
    proc = None
    try:
        proc = master.popen("preload", f"s3://{bucket}/data/", "--wait", stdin=pty_slave,
                            stdout=pty_slave, stderr=subprocess.PIPE)
        screen = read_until(pty_master, b"files")         # the progress bar is drawn
        assert b"\r" in screen and b"[" in screen
        proc.send_signal(signal.SIGINT)
        read_until(pty_master, b"? [y/N]")
        os.write(pty_master, b"y\n")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "cancelled" in err
        assert master.client().list()[0]["state"] == "cancelled"
    finally:
        driver.stop()
        reap(proc)
        os.close(pty_master)
        os.close(pty_slave)


def reap(proc: subprocess.Popen | None) -> None:
    """Never leave a CLI process behind when a test fails half-way."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


def read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} on the terminal; saw {seen[-300:]!r}")
        seen += os.read(fd, 4096)
    return seen


def test_user_errors_are_one_line(master, cluster, bucket, tmp_path) -> None:
    one_error_line(master.cli("preload", "s3://"), "invalid or missing bucket")
    one_error_line(master.cli("preload", f"s3://{bucket}/data/nope"), "does not exist")
    one_error_line(master.cli("preload", "s3://not-mounted-bucket/x"), "no live member mounts")
    one_error_line(master.cli("preload", "status", "0123456789abcdef"), "no preload job")
    one_error_line(master.cli("preload", "status"), "usage: objfs preload status ID")
    one_error_line(master.cli("preload", "/some/path"), "/some/path: no such file")
    one_error_line(master.cli("preload", str(tmp_path)), "is not on an objfs mount")
    one_error_line(master.cli("preload", f"s3://{bucket}/data/", "/some/path"),
                   "not an s3:// URL")
    one_error_line(master.cli("preload", "s3://x/y", "--bandwidth-limit", "fast"),
                   "--bandwidth-limit")
    one_error_line(run_objfs("preload", "list", "--cluster-secret-file",
                             str(master.secret_file)), "--master URL is required")
    one_error_line(run_objfs("preload", "list", "--master", f"http://127.0.0.1:{free_port()}",
                             "--cluster-secret-file", str(master.secret_file)),
                   "cannot reach the master")
    one_error_line(run_objfs("preload", "list", "--master", "ftp://x",
                             "--cluster-secret-file", str(master.secret_file)),
                   "is not a URL like http://HOST:PORT")
    wrong = write_secret(tmp_path, b"not-the-cluster-secret-0123456789", "wrong.secret")
    one_error_line(run_objfs("preload", "list", "--master", master.url,
                             "--cluster-secret-file", str(wrong)), "refused our signature")
    loose = tmp_path / "loose.secret"
    loose.write_bytes(SECRET)
    loose.chmod(0o644)
    one_error_line(run_objfs("preload", "list", "--master", master.url,
                             "--cluster-secret-file", str(loose)), "chmod 600")


def test_master_start_errors_are_one_line(master, tmp_path, s3_endpoint) -> None:
    base = ["master", "--cluster-secret-file", str(master.secret_file), "--endpoint",
            s3_endpoint]
    busy = run_objfs(*base, "--listen", f"127.0.0.1:{master.port}", "--state-dir",
                     str(tmp_path / "other"), timeout=30)
    one_error_line(busy, f"--listen 127.0.0.1:{master.port}")
    locked = run_objfs(*base, "--listen", f"127.0.0.1:{free_port()}", "--state-dir",
                       str(master.state_dir), timeout=30)
    one_error_line(locked, "in use by another objfs master")
    bad = run_objfs(*base, "--listen", "127.0.0.1:1", "--state-dir", str(tmp_path / "x"),
                    "--member-timeout", "1", "--heartbeat-interval", "2")
    one_error_line(bad, "--member-timeout")
    loose = tmp_path / "loose.secret"
    loose.write_bytes(SECRET)
    loose.chmod(0o640)
    one_error_line(run_objfs("master", "--listen", "127.0.0.1:1", "--state-dir",
                             str(tmp_path / "y"), "--cluster-secret-file", str(loose)),
                   "accessible by other users")


def test_a_killed_master_resumes_its_job_from_the_state_dir(master, cluster, bucket,
                                                           data) -> None:
    job_id = master.cli("preload", f"s3://{bucket}/data/").stdout.strip()
    deadline = time.monotonic() + 60
    while master.client().status(job_id)["listing"] and time.monotonic() < deadline:
        time.sleep(0.05)
    for member in cluster:
        member.heartbeat()
        member.work(limit=2)
        member.heartbeat(want_tasks=0)
    before = master.client().status(job_id)
    assert 0 < before["extents"]["final"] < before["extents"]["total"]
    master.kill()
    master.start()
    assert master.client().status(job_id)["extents"]["final"] == before["extents"]["final"]
    driver = Driver(cluster)
    driver.start()
    try:
        result = master.cli("preload", "status", job_id, "--wait")
    finally:
        driver.stop()
    assert result.returncode == 0, result.stderr
    status = master.client().status(job_id)
    assert status["bytes"]["done"] == status["bytes"]["total"] == sum(map(len, data.values()))
    assert "resumed from" in master.log.read_text()
    assert master.stop() == 0  # SIGTERM: a clean stop


def test_sign_prints_headers_a_plain_http_client_can_use(master, cluster, bucket) -> None:
    import http.client

    body = json.dumps({"source": f"s3://{bucket}/data/f01.bin"})
    signed = run_objfs("sign", "POST", "/v1/preloads", "--data", body,
                       "--cluster-secret-file", str(master.secret_file))
    assert signed.returncode == 0, signed.stderr
    headers = dict(line.split(": ", 1) for line in signed.stdout.splitlines())
    assert set(headers) == {"X-Objfs-Date", "X-Objfs-Signature"}
    conn = http.client.HTTPConnection("127.0.0.1", master.port, timeout=30)
    conn.request("POST", "/v1/preloads", body=body, headers=headers)
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 201 and answer["source"] == f"s3://{bucket}/data/f01.bin"
