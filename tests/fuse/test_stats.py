"""Real mounts: `objfs stats`, the control endpoint (refresh, cache drop) and /metrics.

Byte counts are checked against what the fault proxy saw on the wire, never against the
daemon's own idea of what it did. The kernel keeps a file's pages across opens while the
file is unchanged, so every "warm" read first drops them (``POSIX_FADV_DONTNEED``) and the
tests assert that the read really reached the daemon.
"""

from __future__ import annotations

import http.client
import json
import mmap
import os
import random
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (force_unmount, free_port, mount_type, process_alive, put_many,
                            run_objfs)

MiB = 1024 * 1024


# ---- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def mnt() -> Iterator[Path]:
    """A mount point outside pytest's tmp dir: at its end, every pytest session unmounts the
    objfs mounts whose path says "pytest" (conftest.no_leftover_mounts), including those of
    a concurrent session."""
    root = Path(tempfile.mkdtemp(prefix="objfs-stats-"))
    try:
        yield root / "mnt"
    finally:
        for child in root.iterdir():
            force_unmount(child)
            if os.path.ismount(child):
                subprocess.run(["umount", "-l", str(child)], capture_output=True)
            os.rmdir(child)
        os.rmdir(root)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def metrics_now(mount) -> dict[str, float]:
    """GET /stats straight from the socket (cheaper than a CLI run, for polling)."""
    conn = _UnixConnection(str(mount.cache_dir / "control.sock"))
    try:
        conn.request("GET", "/stats")
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())["metrics"]
    finally:
        conn.close()


def cli_stats(mount) -> dict[str, Any]:
    """What ``objfs stats MOUNTPOINT --json`` prints."""
    result = run_objfs("stats", str(mount.path), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def drop_kernel_cache(path: Path) -> None:
    """Forget the kernel's cached pages of one file, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        parts = []
        while piece := f.read(MiB):
            parts.append(piece)
        return b"".join(parts)


def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def settle(mount, proxy, pages_ready: int | None = None) -> dict[str, float]:
    """Wait until no page is in flight (fetched and stored, counters final) and the proxy has
    nothing in flight; with ``pages_ready``, also until that many pages are on disk."""
    seen: dict[str, float] = {}

    def quiet() -> bool:
        seen.update(metrics_now(mount))
        return (seen.get("cache_pages_inflight", 0) == 0 and proxy.inflight["get"] == 0
                and (pages_ready is None or seen.get("cache_pages_ready") == pages_ready))

    wait_for(quiet, what=f"a quiet page cache ({pages_ready} pages ready)")
    return seen


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode not in (0, 2), (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("objfs: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def pages(size: int) -> int:
    return (size + MiB - 1) // MiB


# ---- 1. the JSON snapshot against the origin's own count -------------------------------------

def test_cold_then_warm_read_bytes_match_the_origin_count(s3, bucket, mounter, proxy, mnt):
    size = 9 * MiB + 4321  # a short last page
    data = random.Random(1).randbytes(size)
    s3.put_object(Bucket=bucket, Key="data/model.bin", Body=data)
    mount = mounter(f"s3://{bucket}", endpoint=proxy.endpoint, path=mnt)
    path = mount.path / "data" / "model.bin"
    assert proxy.body_bytes["get"] == 0   # mounting lists, it does not read

    before = cli_stats(mount)
    assert before["mount"]["mountpoint"] == str(mount.path)
    assert before["mount"]["pid"] == mount.pid
    m0 = before["metrics"]
    assert m0.get("read_origin_bytes", 0) == 0 and m0.get("fuse_read_bytes", 0) == 0

    assert read_file(path) == data                                    # cold
    settle(mount, proxy, pages_ready=pages(size))
    m1 = cli_stats(mount)["metrics"]
    assert proxy.body_bytes["get"] == size
    assert m1["read_origin_bytes"] == proxy.body_bytes["get"]
    # The kernel may ask for a 128 KiB piece twice (a sync read and its own readahead racing
    # for a page still being filled: seen on a loaded machine), never for less.
    assert size <= m1["fuse_read_bytes"] <= size + 2 * 128 * 1024
    assert m1.get("read_fetched_bytes", 0) + m1.get("read_cache_bytes", 0) == m1["fuse_read_bytes"]
    assert m1["fuse_read_total"] > 0 and m1.get("fuse_read_errors_total", 0) == 0
    assert m1["cache_used_bytes"] >= size and m1["cache_pages_inflight"] == 0

    drop_kernel_cache(path)
    assert read_file(path) == data                                    # warm
    settle(mount, proxy)
    m2 = cli_stats(mount)["metrics"]
    warm = m2["fuse_read_bytes"] - m1["fuse_read_bytes"]
    assert size <= warm <= size + 2 * 128 * 1024, "the read never left the kernel"
    assert m2.get("read_cache_bytes", 0) - m1.get("read_cache_bytes", 0) == warm
    assert m2["read_fetched_bytes"] == m1["read_fetched_bytes"]
    assert m2["read_origin_bytes"] == m1["read_origin_bytes"] == proxy.body_bytes["get"] == size
    assert m2["read_fetched_bytes"] + m2["read_cache_bytes"] == m2["fuse_read_bytes"]
    assert m2["fuse_read_total"] > m1["fuse_read_total"]


# ---- 2. rows of rates during a read -----------------------------------------------------------

_ROW_COLUMNS = ["ops/s", "rd MB/s", "cache", "fetch", "origin", "peer", "hit%", "infl", "ra",
                "used GiB", "wr MB/s", "parts", "buf MB", "lat ms", "err/s"]


def _parse_rows(lines: list[str]) -> list[dict[str, float | None]]:
    rows = []
    for line in lines:
        cells = line.split()
        assert len(cells) == len(_ROW_COLUMNS), line
        row: dict[str, float | None] = {}
        for name, cell in zip(_ROW_COLUMNS, cells):
            row[name] = None if cell == "-" else float(cell)
            assert row[name] is None or row[name] >= 0, f"negative {name}: {line}"
        rows.append(row)
    return rows


def test_stats_prints_three_rows_of_plausible_rates_during_a_read(s3, bucket, mounter, mnt):
    data = random.Random(2).randbytes(16 * MiB)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=data)
    mount = mounter(f"s3://{bucket}", path=mnt)
    path = mount.path / "big.bin"
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:  # O_DIRECT: every read reaches the daemon, however often repeated
        buf = mmap.mmap(-1, MiB)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while not stop.is_set():
                for off in range(0, len(data), MiB):
                    n = os.preadv(fd, [buf], off)
                    assert buf[:n] == data[off:off + n], off
                    if stop.is_set():
                        break
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            os.close(fd)
            buf.close()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        result = run_objfs("stats", str(mount.path), "--count", "3", "--interval", "0.5")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 5, result.stdout                   # title, column names, 3 rows
    assert lines[0].startswith(f"objfs stats {mount.path}") and f"s3://{bucket}" in lines[0]
    assert lines[1].split() == "ops/s rd MB/s cache fetch origin peer hit% infl ra used GiB " \
        "wr MB/s parts buf MB lat ms err/s".split()
    rows = _parse_rows(lines[2:])
    assert elapsed >= 1.4, elapsed                          # 3 intervals of 0.5 s
    assert any(r["rd MB/s"] > 0 for r in rows), result.stdout
    assert any(r["ops/s"] > 0 for r in rows), result.stdout
    for row in rows:
        assert row["hit%"] is None or row["hit%"] <= 100, row
        # cache + fetch are the bytes of the reads, by where they came from: the sum is the read
        # rate, up to one 128 KiB request counted across a row boundary (0.25 MB/s at 0.5 s)
        assert abs(row["cache"] + row["fetch"] - row["rd MB/s"]) <= 0.5, row
        assert row["origin"] <= 16 / 0.5 * 1.5, row         # never more than the file, twice
        assert row["used GiB"] <= 0.05 and row["err/s"] == 0, row
        assert row["rd MB/s"] == 0 or row["lat ms"] is not None, row


# ---- 3. Prometheus ----------------------------------------------------------------------------

def test_metrics_addr_serves_prometheus_text_labelled_by_mount(s3, bucket, mounter, mnt):
    secret_name = "job-42/shard-00017.tar"
    s3.put_object(Bucket=bucket, Key=secret_name, Body=b"x" * 5000)
    port = free_port()
    mount = mounter(f"s3://{bucket}", "--metrics-addr", f"127.0.0.1:{port}", path=mnt)
    assert (mount.path / secret_name).read_bytes() == b"x" * 5000
    # The JSON first: the page is stored in the background after the read returns, and a
    # counter may first appear between two scrapes; metrics never disappear afterwards.
    snapshot = metrics_now(mount)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()

    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a metric family appears twice"
    samples = {}
    for family in families:
        assert family.type in ("counter", "gauge"), (family.name, family.type)  # TYPE matched
        assert family.name.startswith("objfs_"), family.name
        for sample in family.samples:
            assert sample.labels == {"mount": str(mount.path)}, sample
            samples[sample.name] = (family.type, sample.value)
    assert "job-42" not in text and "shard-00017" not in text       # no per-path labels
    assert samples["objfs_fuse_read_total"][0] == "counter"
    assert samples["objfs_fuse_read_total"][1] >= 1
    assert samples["objfs_fuse_read_bytes_total"] == ("counter", 5000)
    assert samples["objfs_read_origin_bytes_total"] == ("counter", 5000)
    assert samples["objfs_fuse_lookup_total"][0] == "counter"
    assert samples["objfs_fuse_read_seconds_total"][1] > 0
    for gauge in ("cache_used_bytes", "cache_capacity_bytes", "cache_pages_inflight",
                  "tree_objects"):
        assert samples[f"objfs_{gauge}"][0] == "gauge", gauge
    assert samples["objfs_tree_objects"][1] >= 1
    # The same numbers as the JSON: every metric of /stats is exposed.
    for name in snapshot:
        assert f"objfs_{name}" in samples or f"objfs_{name}_total" in samples, name

    # Commands never listen on TCP.
    for method, route in (("POST", "/refresh"), ("POST", "/cache/drop?path=job-42"),
                          ("GET", "/stats")):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                raise AssertionError(f"{method} {route} answered {response.status} on TCP")
        except urllib.error.HTTPError as exc:
            assert exc.code in (404, 405), (route, exc.code)


# ---- 4. usage errors ---------------------------------------------------------------------------

def test_stats_on_something_that_is_not_an_objfs_mount(tmp_path, s3, bucket, mounter, mnt):
    assert_one_line_error(run_objfs("stats", "/tmp"), "not on an objfs mount")
    assert_one_line_error(run_objfs("stats", "/nonexistent"), "/nonexistent")
    plain = tmp_path / "plain-dir"
    plain.mkdir()
    assert_one_line_error(run_objfs("stats", str(plain), "--json"), "not on an objfs mount")

    s3.put_object(Bucket=bucket, Key="sub/dir/f", Body=b"f")
    mount = mounter(f"s3://{bucket}", path=mnt)
    for bad in (["--count", "0"], ["--interval", "0"]):
        result = run_objfs("stats", *bad, str(mount.path))
        assert result.returncode == 2, (bad, result.stderr)
        assert "usage:" in result.stderr and "Traceback" not in result.stderr
    # A path inside a mount finds the mount.
    result = run_objfs("stats", str(mount.path / "sub" / "dir"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mount"]["mountpoint"] == str(mount.path)
    # A killed daemon leaves a dead mount: one line saying how to clear it.
    pid = mount.pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid), what="the daemon to die")
    assert_one_line_error(run_objfs("stats", str(mount.path)), "objfs umount")


def test_stats_on_a_mount_point_with_a_non_ascii_name(s3, bucket, tmp_path, mnt):
    # /proc/self/mountinfo escapes only space, tab, newline and backslash (as \ooo); other
    # bytes are the path's own UTF-8.
    s3.put_object(Bucket=bucket, Key="f.txt", Body=b"hello")
    path = mnt.parent / "mnt-données"
    path.mkdir()
    result = run_objfs("mount", "--endpoint", s3.meta.endpoint_url, "--cache-dir",
                       str(tmp_path / "cache"), f"s3://{bucket}", str(path))
    assert result.returncode == 0, result.stderr
    pid = int(os.getxattr(path, "user.objfs.pid"))
    try:
        assert (path / "f.txt").read_bytes() == b"hello"
        result = run_objfs("stats", str(path), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["mount"]["mountpoint"] == str(path)
        result = run_objfs("umount", str(path))
        assert result.returncode == 0, result.stderr
    finally:
        if mount_type(path) is not None or os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        wait_for(lambda: not process_alive(pid), what="the daemon to exit")


# ---- 5. refresh --------------------------------------------------------------------------------

def test_refresh_shows_origin_changes_before_the_ttl(s3, bucket, mounter, mnt):
    put_many(s3, bucket, {"a.txt": b"a", "gone.txt": b"gone", "d/b.txt": b"b"})
    mount = mounter(f"s3://{bucket}", "--ttl", "3600", path=mnt)
    mp = mount.path
    assert sorted(os.listdir(mp)) == ["a.txt", "d", "gone.txt"]
    put_many(s3, bucket, {"new.txt": b"new", "newdir/x.txt": b"x", "newdir/sub/y.txt": b"yy",
                          "fresh/deep/z.txt": b"zzz", "d/c.txt": b"c"})
    assert sorted(os.listdir(mp)) == ["a.txt", "d", "gone.txt"]       # the TTL is an hour
    assert not (mp / "newdir").exists()

    result = run_objfs("refresh", str(mp), "newdir")              # a subtree not known yet
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refreshed /newdir"), result.stdout
    assert "2 objects listed" in result.stdout, result.stdout
    assert sorted(os.listdir(mp / "newdir")) == ["sub", "x.txt"]
    assert (mp / "newdir" / "sub" / "y.txt").read_bytes() == b"yy"
    # Only that subtree was relisted; nothing outside it was added or removed.
    assert sorted(os.listdir(mp)) == ["a.txt", "d", "gone.txt", "newdir"]

    result = run_objfs("refresh", str(mp), "fresh/deep")          # two levels, both unknown
    assert result.returncode == 0, result.stderr
    assert (mp / "fresh" / "deep" / "z.txt").read_bytes() == b"zzz"

    result = run_objfs("refresh", str(mp), str(mp / "d" / "b.txt"))  # a file: its directory
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(mp / "d")) == ["b.txt", "c.txt"]
    assert "new.txt" not in os.listdir(mp)

    s3.delete_object(Bucket=bucket, Key="gone.txt")
    result = run_objfs("refresh", str(mp))                        # the whole mount
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refreshed /:"), result.stdout
    assert "1 added" in result.stdout and "1 removed" in result.stdout, result.stdout
    assert sorted(os.listdir(mp)) == ["a.txt", "d", "fresh", "new.txt", "newdir"]
    assert (mp / "new.txt").read_bytes() == b"new"
    wait_for(lambda: not (mp / "gone.txt").exists(), timeout_s=5, what="gone.txt to go")

    m = metrics_now(mount)
    assert m["tree_refreshes_total"] >= 4

    result = run_objfs("refresh", str(mp), "/etc")
    assert_one_line_error(result, "not under the mount")


# ---- 6. cache drop ------------------------------------------------------------------------------

def test_cache_drop_makes_the_next_read_fetch_from_the_origin(s3, bucket, mounter, proxy, mnt):
    files = {
        "x/one.bin": random.Random(3).randbytes(4 * MiB),
        "x/y/two.bin": random.Random(4).randbytes(3 * MiB - 5),
        "x/y/empty": b"",
        "other.bin": random.Random(5).randbytes(2 * MiB),
        "..hidden.bin": random.Random(6).randbytes(MiB),   # a name, not the parent dir
    }
    put_many(s3, bucket, files)
    mount = mounter(f"s3://{bucket}", endpoint=proxy.endpoint, path=mnt)
    mp = mount.path
    total_pages = sum(pages(len(b)) for b in files.values())       # 10

    def read_all_cold_in_kernel() -> None:
        for rel, body in files.items():
            drop_kernel_cache(mp / rel)
            assert read_file(mp / rel) == body

    read_all_cold_in_kernel()
    settle(mount, proxy, pages_ready=total_pages)
    assert proxy.body_bytes["get"] == sum(len(b) for b in files.values())

    # One file.
    proxy.reset()
    result = run_objfs("cache", "drop", str(mp), "x/one.bin")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dropped 4 cached pages of 1 files"
    assert metrics_now(mount)["cache_pages_ready"] == total_pages - 4
    before = metrics_now(mount)
    read_all_cold_in_kernel()
    m = settle(mount, proxy, pages_ready=total_pages)
    assert proxy.body_bytes["get"] == 4 * MiB
    assert m["read_origin_bytes"] - before["read_origin_bytes"] == 4 * MiB
    delta = {k: m.get(k, 0) - before.get(k, 0) for k in m}
    assert delta["fuse_read_bytes"] == sum(len(b) for b in files.values())
    # Readahead may land a page on disk before the reader asks for it: then it is a cache hit.
    assert delta["read_cache_bytes"] + delta["read_fetched_bytes"] == delta["fuse_read_bytes"]
    assert delta["read_cache_bytes"] >= 6 * MiB - 5

    # A directory: every file under it, at any depth; an absolute path works too.
    proxy.reset()
    result = run_objfs("cache", "drop", str(mp), str(mp / "x"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dropped 7 cached pages of 3 files"
    assert metrics_now(mount)["cache_pages_dropped_total"] == 11
    read_all_cold_in_kernel()
    settle(mount, proxy, pages_ready=total_pages)
    assert proxy.body_bytes["get"] == 7 * MiB - 5

    # The whole mount.
    result = run_objfs("cache", "drop", str(mp), str(mp))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dropped {total_pages} cached pages of 5 files"
    assert metrics_now(mount)["cache_used_bytes"] == 0

    # Paths that are not in the mount.
    assert_one_line_error(run_objfs("cache", "drop", str(mp), "/etc/passwd"),
                          "not under the mount")
    assert_one_line_error(run_objfs("cache", "drop", str(mp), "../outside"), "leaves the mount")
    assert_one_line_error(run_objfs("cache", "drop", str(mp), "x/no-such-file"))

    # A file whose name starts with two dots is still under the mount.
    drop_kernel_cache(mp / "..hidden.bin")
    assert read_file(mp / "..hidden.bin") == files["..hidden.bin"]
    settle(mount, proxy, pages_ready=1)
    result = run_objfs("cache", "drop", str(mp), "..hidden.bin")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dropped 1 cached pages of 1 files"


# ---- 7. the socket ------------------------------------------------------------------------------

def test_control_socket_is_private_and_goes_away_on_umount(s3, bucket, mounter, mnt):
    s3.put_object(Bucket=bucket, Key="f", Body=b"f")
    mount = mounter(f"s3://{bucket}", path=mnt)
    sock = mount.cache_dir / "control.sock"
    assert os.getxattr(mount.path, "user.objfs.control").decode() == str(sock)
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    with open(f"/proc/{mount.pid}/status") as f:
        uids = dict(line.split(":", 1) for line in f)["Uid"].split()
    assert st.st_uid == int(uids[1]) and st.st_gid == os.getgid()   # the daemon's euid

    # A daemon killed outright leaves its socket behind; a remount with the same cache dir
    # replaces it.
    pid = mount.pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid), what="the daemon to die")
    assert sock.exists()
    mounter.remount(mount)
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert cli_stats(mount)["mount"]["pid"] == mount.pid

    mounter.unmount(mount)
    assert not sock.exists()


def test_a_cache_dir_too_long_for_a_unix_socket_path_still_mounts(s3, bucket, mounter, mnt,
                                                                  tmp_path):
    # A unix socket path has at most 107 bytes. Cache dirs longer than 94 bytes are legal
    # (a non-root default ~/.cache/objfs/BUCKET-HASH reaches that with a 56-byte bucket
    # name), mounted before the control endpoint existed, and still must; stats must work.
    s3.put_object(Bucket=bucket, Key="f", Body=b"f")
    cache_dir = tmp_path / ("c" * 60) / ("d" * 40)
    assert len(str(cache_dir / "control.sock")) > 107
    mount = mounter(f"s3://{bucket}", cache_dir=cache_dir, path=mnt)
    assert (mount.path / "f").read_bytes() == b"f"
    assert cli_stats(mount)["metrics"]["fuse_read_bytes"] == 1
