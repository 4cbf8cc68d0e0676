"""Shared fixtures: a real S3 server (moto's server mode) on loopback, a fault proxy in front
of it, and real objfs mounts run as subprocesses, always unmounted afterwards."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from objfs.procinfo import process_alive  # noqa: F401 - re-exported for the tests
from objfs.mounts import unescape_mountinfo
from tests.faultproxy import FaultProxy

VENV_BIN = Path(sys.executable).parent
OBJFS = str(VENV_BIN / "objfs")
CREDS = {"AWS_ACCESS_KEY_ID": "objfs-test", "AWS_SECRET_ACCESS_KEY": "objfs-test-secret",
         "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


def mount_type(path: Path) -> str | None:
    """fstype mounted exactly at ``path`` according to the kernel, or None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if unescape_mountinfo(fields[4]) == target:
                found = fields[fields.index("-") + 1]
    return found


@pytest.fixture(scope="session", autouse=True)
def aws_credentials() -> None:
    os.environ.update(CREDS)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(var, None)


@pytest.fixture(scope="session")
def s3_endpoint(aws_credentials: None) -> Iterator[str]:
    proc, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(s3_endpoint: str):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_endpoint).start()
    try:
        yield p
    finally:
        p.stop()


@dataclasses.dataclass
class Mount:
    path: Path
    cache_dir: Path
    url: str
    endpoint: str
    args: list[str]

    @property
    def pid(self) -> int:
        return int(os.getxattr(self.path, "user.objfs.pid"))


def run_objfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OBJFS, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def force_unmount(path: Path) -> None:
    if mount_type(path) is None:
        return
    try:
        pid = int(os.getxattr(path, "user.objfs.pid"))
    except (OSError, ValueError):
        pid = None
    result = run_objfs("umount", str(path), timeout=40)
    if mount_type(path) is not None:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    if pid is not None and result.returncode != 0:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


class Mounter:
    def __init__(self, tmp_path: Path, endpoint: str) -> None:
        self._tmp = tmp_path
        self._endpoint = endpoint
        self.mounts: list[Mount] = []

    def __call__(self, url: str, *extra: str, endpoint: str | None = None,
                 cache_dir: Path | None = None, path: Path | None = None) -> Mount:
        path = path or self._tmp / f"mnt{len(self.mounts)}"
        path.mkdir(exist_ok=True)
        cache_dir = cache_dir or self._tmp / f"cache{len(self.mounts)}"
        endpoint = endpoint or self._endpoint
        args = ["mount", "--endpoint", endpoint, "--cache-dir", str(cache_dir), *extra, url,
                str(path)]
        result = run_objfs(*args)
        assert result.returncode == 0, f"mount failed: {result.stderr}"
        assert mount_type(path) == "fuse.objfs", f"{path} is not an objfs mount"
        mount = Mount(path, cache_dir, url, endpoint, args)
        self.mounts.append(mount)
        return mount

    def remount(self, mount: Mount) -> Mount:
        self.unmount(mount)
        result = run_objfs(*mount.args)
        assert result.returncode == 0, f"remount failed: {result.stderr}"
        assert mount_type(mount.path) == "fuse.objfs"
        return mount

    def unmount(self, mount: Mount) -> None:
        result = run_objfs("umount", str(mount.path))
        assert result.returncode == 0, f"umount failed: {result.stderr}"
        assert mount_type(mount.path) is None

    def cleanup(self) -> None:
        for mount in self.mounts:
            force_unmount(mount.path)


@pytest.fixture
def mounter(tmp_path: Path, s3_endpoint: str) -> Iterator[Mounter]:
    m = Mounter(tmp_path, s3_endpoint)
    try:
        yield m
    finally:
        m.cleanup()


def put_many(s3, bucket: str, items: dict[str, bytes], workers: int = 16) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]),
                      items.items()))


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Lazily unmount objfs mounts this session left under its own temp dir (never another
    session's: several pytest runs may share the machine)."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    leftovers = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            path = unescape_mountinfo(fields[4])
            if "fuse.objfs" in fields and path.startswith(base + "/"):
                leftovers.append(path)
    for path in leftovers:
        subprocess.run(["umount", "-l", path], capture_output=True)


@pytest.fixture(scope="session")
def seaweed_endpoint(aws_credentials: None, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[str]:
    """SeaweedFS ``weed mini`` on loopback (the embedded default origin of ``make run``), for
    the tests that must see what a second real server answers (it differs from moto: copies
    answer unquoted ETags, a key ending with '/' cannot be copied, listings order keys
    differently). Started once per session, on first use."""
    from objfs.tools.devserver import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server.endpoint
    finally:
        server.stop()
