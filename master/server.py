"""``objfs master``: settings validated at the edge, then the service's lifecycle.

``run`` loads the cluster secret, locks the state dir (one master per dir), opens the LMDB
state, resumes the jobs found there, serves the API on ``--listen`` from one event-loop
thread, sweeps expired members every second, and stops on SIGTERM/SIGINT (state synced,
listener closed). It runs in the foreground, like a systemd service wants; its log goes to
stderr or ``--log-file``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import fcntl
import logging
import logging.handlers
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from objfs.cluster import load_cluster_secret
from objfs.config import parse_host_port
from objfs.errors import ConfigError
from objfs.loop import EventLoopThread
from objfs.master.app import make_app
from objfs.master.coordinator import Coordinator, Settings
from objfs.master.origin import StoreOrigin
from objfs.master.protocol import normalize_endpoint
from objfs.master.state import StateStore
from objfs.master.errors import BadRequest

log = logging.getLogger("objfs.master")

_SWEEP_INTERVAL_S = 1.0
_SYNC_INTERVAL_S = 10.0


@dataclasses.dataclass(frozen=True)
class MasterConfig:
    listen: tuple[str, int]
    state_dir: Path
    secret_file: Path
    endpoint: str | None = None
    region: str = "us-east-1"
    heartbeat_interval_s: float = 2.0
    member_timeout_s: float = 15.0
    max_attempts: int = 3
    log_level: str = "INFO"
    log_file: Path | None = None

    @classmethod
    def create(cls, *, listen: str, state_dir: str, secret_file: str,
               endpoint: str | None = None, region: str | None = None,
               heartbeat_interval: float = 2.0, member_timeout: float = 15.0,
               max_attempts: int = 3, log_level: str = "INFO",
               log_file: str | None = None) -> "MasterConfig":
        """Validate CLI values; raises a one-line ``ConfigError``."""
        host_port = parse_host_port(listen, "--listen")
        if endpoint:
            try:
                endpoint = normalize_endpoint(endpoint)
            except BadRequest:
                raise ConfigError(f"--endpoint: {endpoint!r} is not an http(s)://HOST[:PORT] "
                                  "URL") from None
        for flag, value in (("--heartbeat-interval", heartbeat_interval),
                            ("--member-timeout", member_timeout)):
            if not 0 < value < math.inf:
                raise ConfigError(f"{flag}: must be positive seconds, got {value}")
        if member_timeout < 2 * heartbeat_interval:
            raise ConfigError(f"--member-timeout ({member_timeout:g}s) must be at least twice "
                              f"--heartbeat-interval ({heartbeat_interval:g}s)")
        if max_attempts < 1:
            raise ConfigError("--max-attempts must be >= 1")
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level: unknown level {log_level!r}")
        region = region or os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or "us-east-1"
        return cls(listen=host_port, state_dir=Path(os.path.abspath(state_dir)),
                   secret_file=Path(secret_file), endpoint=endpoint or None, region=region,
                   heartbeat_interval_s=heartbeat_interval, member_timeout_s=member_timeout,
                   max_attempts=max_attempts, log_level=log_level.upper(),
                   log_file=Path(log_file) if log_file else None)

    def settings(self) -> Settings:
        return Settings(heartbeat_interval_s=self.heartbeat_interval_s,
                        member_timeout_s=self.member_timeout_s,
                        max_attempts=self.max_attempts)


def setup_logging(config: MasterConfig) -> None:
    handler: logging.Handler
    if config.log_file is not None:
        handler = logging.handlers.WatchedFileHandler(config.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s[%(threadName)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    for noisy in ("botocore", "boto3", "urllib3", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def lock_state_dir(state_dir: Path) -> int:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"--state-dir {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"--state-dir {state_dir} is in use by another objfs master") \
            from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_credentials() -> None:
    import boto3

    if boto3.Session().get_credentials() is None:
        raise ConfigError("no AWS credentials found for listing the origin (set "
                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an "
                          "instance role)")


class MasterService:
    """The running master: start, then stop (from any thread)."""

    def __init__(self, config: MasterConfig, *, secret: bytes | None = None,
                 coordinator_factory: Callable[..., Coordinator] = Coordinator) -> None:
        self.config = config
        self._secret = secret if secret is not None else load_cluster_secret(config.secret_file)
        self._factory = coordinator_factory
        self._lock_fd: int | None = None
        self.loop = EventLoopThread("objfs-master")
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="objfs-api")
        self._runner: web.AppRunner | None = None
        self._sweeper: concurrent.futures.Future[None] | None = None
        self.state: StateStore | None = None
        self.origin: StoreOrigin | None = None
        self.coordinator: Coordinator | None = None
        self.port = config.listen[1]

    def start(self) -> "MasterService":
        self._lock_fd = lock_state_dir(self.config.state_dir)
        try:
            self.state = StateStore(self.config.state_dir / "state")
            self.loop.start()
            self.origin = StoreOrigin(self.config.endpoint, self.config.region, self.loop)
            self.coordinator = self._factory(self.state, self.origin,
                                             settings=self.config.settings())
            app = make_app(self.coordinator, self._secret, executor=self._pool)
            self._runner = web.AppRunner(app, access_log=None)
            self.loop.run(self._runner.setup())
            host, port = self.config.listen
            try:
                site = web.TCPSite(self._runner, host, port)
                self.loop.run(site.start())
            except OSError as exc:
                raise ConfigError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
            self.coordinator.resume()
            self._sweeper = self.loop.submit(self._sweep_forever())
            log.info("objfs master listening on http://%s:%d (state in %s, origin %s)",
                     host, port, self.config.state_dir, self.origin.where)
            return self
        except BaseException:
            self.stop()
            raise

    async def _sweep_forever(self) -> None:
        assert self.coordinator is not None and self.state is not None
        loop = asyncio.get_running_loop()
        since_sync = 0.0
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            try:
                await loop.run_in_executor(self._pool, self.coordinator.sweep)
                since_sync += _SWEEP_INTERVAL_S
                if since_sync >= _SYNC_INTERVAL_S:
                    since_sync = 0.0
                    await loop.run_in_executor(self._pool, self.state.sync)
            except Exception:  # noqa: BLE001 - the sweeper must not die
                log.exception("master sweep failed")

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._runner is not None:
            try:
                self.loop.run(self._runner.cleanup(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - stopping anyway
                log.debug("listener cleanup: %s", exc)
            self._runner = None
        if self.coordinator is not None:
            self.coordinator.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.origin is not None:
            self.origin.close()
        self.loop.stop()
        if self.state is not None:
            self.state.close()
            self.state = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def run(config: MasterConfig) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP. BLOCKS the main thread."""
    setup_logging(config)
    check_credentials()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    service = MasterService(config).start()
    try:
        while not stop.wait(1.0):
            pass
        log.info("objfs master stopping")
    finally:
        service.stop()
    return 0
