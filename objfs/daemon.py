"""Lifecycle of one mount: preflight checks, start-up, the refresher, shutdown.

``preflight`` runs in the CLI process before it forks (no threads exist yet, so forking is
safe): it validates the mount point and the cache dir and takes the cache dir's lock, so the
most common mistakes fail fast with one line. ``run`` does the rest in the daemon process:
start the event loop, prove the origin is reachable with these credentials, open (or build)
the metadata tree, mount, report readiness through ``ready``, and serve until unmounted or
signalled (SIGTERM/SIGINT/SIGHUP end the FUSE loop; the mount is then removed).

With ``--peer-listen`` the daemon is a member of a cluster (``cache.peer``): the peer server
starts on the event loop right after the page cache opens (so a port in use fails the mount
at once), the peer source goes in front of the origin, and the page cache cuts runs at the
ring's extents and evicts copies before owned pages. With ``--master`` the member list comes
from the master (``master.agent``: registration, heartbeats, preload work), which starts
once the mount is up and leaves the master when it stops.

Every daemon runs local preloads (``objfs preload MOUNTPOINT/PATH``, ``objfs.warmup``)
through its control endpoint.

A cold mount (no complete tree in the cache dir) lists the prefix before it reports ready, so
the first ``ls`` sees everything. A remount with a complete tree serves at once; the
``Refresher`` keeps the tree no older than the TTL in the background.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import logging.handlers
import os
import resource
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from objfs.cache.limits import TokenBucket
from objfs.cache.pagecache import PageCache
from objfs.cache.peer import PeerService
from objfs.cache.preload import ExtentFetcher
from objfs.cache.ring import DEFAULT_EXTENT_PAGES
from objfs.cache.sources import OriginSource, SourceChain
from objfs.cluster import MutableMembership, StaticMembership
from objfs.config import MiB, MountConfig
from objfs.control import SOCKET_NAME, ControlServer
from objfs.errors import ConfigError, NotFound, ObjfsError
from objfs.fs import Filesystem
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from objfs.mounts import mounted_fstype
from objfs.store import ObjectInfo, ObjectStore
from objfs.tree import MetadataTree, RefreshStats
from objfs.uploads import PendingUpload, UploadLedger

log = logging.getLogger(__name__)

LOG_FILE = "objfs.log"


def check_mountpoint(config: MountConfig) -> None:
    mp = config.mountpoint
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise ConfigError(f"mount point {mp} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise ConfigError(f"{mp} is a dead FUSE mount (its daemon is gone); "
                              f"run: objfs umount {mp}") from None
        raise ConfigError(f"mount point {mp}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mount point {mp} is not a directory")
    if os.path.ismount(mp) or mounted_fstype(mp) is not None:
        try:
            os.statvfs(mp)  # never answered from the kernel's attribute cache
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise ConfigError(f"{mp} is a dead FUSE mount (its daemon is gone); "
                                  f"run: objfs umount {mp}") from None
        raise ConfigError(f"{mp} is already a mount point")
    if "nonempty" not in config.fuse_options and any(os.scandir(mp)):
        raise ConfigError(f"mount point {mp} is not empty (pass -o nonempty to mount over it)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise ConfigError("FUSE is not available here: /dev/fuse is missing or not accessible "
                          "(install fuse3 and load the fuse module)")


def prepare_cache_dir(config: MountConfig) -> int:
    """Create/validate the cache dir and lock it for this mount; return the lock fd.

    The cache dir holds every key of the mounted prefix (tree, page headers, log) and cached
    bytes: it is made private to the daemon's user (0700, and a umask of 077 for everything
    the daemon creates in it, so files are 0600)."""
    cdir = config.cache_dir
    os.umask(0o077)
    try:
        cdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise ConfigError(f"cache dir {cdir} is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot create cache dir {cdir}: {exc.strerror}") from None
    if not cdir.is_dir():
        raise ConfigError(f"cache dir {cdir} is not a directory")
    try:
        if stat.S_IMODE(os.stat(cdir).st_mode) & 0o077:
            os.chmod(cdir, 0o700)  # an older objfs or a hand-made dir: close it
    except OSError as exc:
        raise ConfigError(f"cache dir {cdir}: cannot make it private (chmod 700): "
                          f"{exc.strerror}") from None
    probe = cdir / f".probe-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cache dir {cdir} is not writable: {exc.strerror}") from None
    lock_path = cdir / "lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = lock_path.read_text().strip() or "?"
        os.close(fd)
        raise ConfigError(f"cache dir {cdir} is in use by another objfs daemon (pid {owner}); "
                          "give each mount its own --cache-dir") from None
    return fd


def write_lock_owner(lock_fd: int) -> bool:
    """Write our pid into the lock file. Returns whether the previous daemon of this cache
    dir stopped cleanly: a clean stop empties the file (``release_lock_owner``), so a pid
    still there is a daemon that was killed or crashed."""
    clean = os.fstat(lock_fd).st_size == 0
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    return clean


_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_changed(cache_dir: Path, boot_id_path: str = _BOOT_ID_PATH) -> bool:
    """Whether the machine rebooted since the last daemon of ``cache_dir`` started (the
    boot id it recorded differs); records the current one. False when unknown."""
    record = cache_dir / "boot_id"
    try:
        current = Path(boot_id_path).read_text().strip()
    except OSError:
        return False
    try:
        previous = record.read_text().strip()
    except OSError:
        previous = None
    try:
        record.write_text(current + "\n")
    except OSError as exc:
        log.warning("cannot record the boot id in %s: %s", record, exc.strerror)
    return previous is not None and previous != current


def discard_unsynced_state(cache_dir: Path) -> None:
    """The metadata tree and the page index are LMDB files written without an fsync per
    transaction: a daemon that dies loses nothing (the writes are in the kernel), but a
    power cut or a kernel crash can leave them damaged. After an unclean stop in an earlier
    boot, both are rebuilt (the tree from a listing, the cache from nothing) rather than
    trusted."""
    for name in ("tree", "pages/index"):
        path = cache_dir / name
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def release_lock_owner(lock_fd: int) -> None:
    try:
        os.ftruncate(lock_fd, 0)
    except OSError as exc:
        log.warning("could not mark this stop as clean in the cache dir's lock file: %s", exc)


def preflight(config: MountConfig) -> int:
    """All checks that need neither threads nor network. Returns the cache-dir lock fd."""
    check_mountpoint(config)
    return prepare_cache_dir(config)


def setup_logging(config: MountConfig, to_stderr: bool) -> Path:
    log_path = config.log_file or (config.cache_dir / LOG_FILE)
    handler: logging.Handler
    if to_stderr:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.WatchedFileHandler(log_path)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s[%(threadName)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return log_path


class Refresher:
    """Keeps the tree no older than the TTL: a background thread that relists the prefix and
    tells ``fs`` what changed (versions, removed names, attributes), so the kernel's caches,
    which may keep names and attributes for the TTL, follow."""

    def __init__(self, tree: MetadataTree, store: ObjectStore, ttl_s: float, fs: Filesystem,
                 clock: Callable[[], float] = time.time) -> None:
        self._tree = tree
        self._store = store
        self._ttl_s = ttl_s
        self._fs = fs
        self._clock = clock
        self._stop = threading.Event()
        self._retry_at: float | None = None  # refresher thread only
        self._thread = threading.Thread(target=self._run, name="objfs-refresh", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _due_in(self) -> float:
        """Seconds until the next refresh, capped at an hour (the loop re-checks then):
        Event.wait overflows on very large timeouts."""
        if self._retry_at is not None:
            due = self._retry_at - self._clock()
        else:
            listed_at = self._tree.listed_at()
            due = 0.0 if listed_at is None else listed_at + self._ttl_s - self._clock()
        return min(max(0.0, due), 3600.0)

    def stopped(self) -> bool:
        """True once the thread is gone (a refresh may outlive ``stop``'s join timeout)."""
        return not self._thread.is_alive()

    def _pages(self, scope: str) -> Iterator[list[ObjectInfo]]:
        for page in self._store.list_pages(self._store.config.prefix + scope):
            if self._stop.is_set():
                raise ObjfsError("refresh cancelled: shutting down")
            yield page

    def refresh_now(self, scope: str = "") -> RefreshStats:
        fs = self._fs
        stats = self._tree.refresh(self._pages(scope), scope=scope, on_changed=fs.changed,
                                   on_changing=fs.changing, on_removed=fs.entries_removed,
                                   on_attrs=fs.attrs_changed)
        log.info("refreshed %s: %d objects listed, %d added, %d changed, %d removed, "
                 "%d invalid keys skipped in %.2fs", scope or "/", stats.objects, stats.added,
                 stats.changed, stats.removed, stats.skipped_invalid, stats.duration_s)
        return stats

    def _run(self) -> None:
        while not self._stop.wait(self._due_in()):
            if self._due_in() > 0:
                continue  # woke from the one-hour cap, not because a refresh is due
            try:
                self.refresh_now()
                self._retry_at = None
            except ObjfsError as exc:
                delay = min(self._ttl_s, 30.0)
                log.warning("metadata refresh failed, retrying in %.0fs: %s", delay, exc)
                self._retry_at = self._clock() + delay
            except Exception:
                delay = min(self._ttl_s, 30.0)
                log.exception("metadata refresh failed unexpectedly, retrying in %.0fs", delay)
                self._retry_at = self._clock() + delay


def start_peers(config: MountConfig, metrics: Metrics) -> PeerService | None:
    """The peer cache's pieces for ``--peer-listen`` (not serving yet), or None."""
    if not config.cluster:
        return None
    assert config.peer_id is not None and config.peer_listen is not None
    assert config.cluster_secret is not None
    membership: StaticMembership | MutableMembership
    if config.master_url:
        membership = MutableMembership(config.peer_id, initial=config.peers)
    else:
        membership = StaticMembership(config.peer_id, config.peers)
    serve_limit = TokenBucket(config.peer_serve_limit_bytes) \
        if config.peer_serve_limit_bytes else None
    log.info("peer cache: this host is %s, members %s", config.peer_id,
             ", ".join(membership.ring().members))
    return PeerService(membership, config.cluster_secret, metrics,
                       bucket=config.store.bucket, prefix=config.store.prefix,
                       listen=config.peer_listen, serve_limit=serve_limit)


def open_page_cache(config: MountConfig, store: ObjectStore, loop: EventLoopThread,
                    metrics: Metrics, peers: PeerService | None = None) -> PageCache:
    origin_limit = TokenBucket(config.origin_read_limit_bytes) \
        if config.origin_read_limit_bytes else None
    sources: list = [OriginSource(store, limit=origin_limit, metrics=metrics)]
    extent_pages = owns = None
    if peers is not None:
        ring = peers.membership.ring()
        sources.insert(0, peers.source)
        extent_pages, owns = ring.extent_pages, ring.owns_page
    try:
        cache = PageCache(config.cache_dir / "pages", SourceChain(sources, metrics=metrics),
                          loop, metrics=metrics, capacity_bytes=config.cache_size_bytes,
                          policy=config.cache_policy,
                          free_floor_bytes=config.cache_free_floor_bytes,
                          request_pages=config.read_request_bytes // MiB,
                          parallelism=config.read_parallelism,
                          max_window_pages=config.readahead_bytes // MiB,
                          whole_object_bytes=config.whole_object_bytes,
                          extent_pages=extent_pages, owns=owns)
    except OSError as exc:
        raise ConfigError(f"page cache in {config.cache_dir}: {exc.strerror or exc}") from None
    if peers is not None:
        peers.membership.subscribe(lambda ring: cache.set_owner_function(ring.owns_page))
    return cache


def start_master_agent(config: MountConfig, peers: PeerService, fetcher: ExtentFetcher,
                       loop: EventLoopThread, metrics: Metrics):  # -> MasterAgent
    """The member side of ``--master`` (not started yet)."""
    from objfs.master.agent import MasterAgent
    from objfs.master.client import MasterClient
    from objfs.master.protocol import Origin, normalize_endpoint

    assert config.master_url is not None and config.cluster_secret is not None
    membership = peers.membership
    assert isinstance(membership, MutableMembership)
    origin = Origin(normalize_endpoint(config.store.endpoint), config.store.bucket,
                    config.store.prefix)
    client = MasterClient(config.master_url, config.cluster_secret, timeout=10.0)
    return MasterAgent(client, membership, origin, fetcher, loop, metrics)


def start_control(config: MountConfig, loop: EventLoopThread, metrics: Metrics, fs: Filesystem,
                  refresher: Refresher, url: str,
                  peers: PeerService | None = None, preloads: object = None,
                  agent: object = None) -> ControlServer:
    """The control endpoint: stats, refresh and cache-drop commands, Prometheus metrics."""

    def refresh(path: str) -> dict[str, object]:
        rel = path.strip("/")
        scope = ""
        if rel:
            try:
                inode = fs.resolve(rel)
                scope = rel if inode.is_dir else rel.rpartition("/")[0]
            except NotFound:
                scope = rel  # not known yet: list it, it may have appeared at the origin
        scope = f"{scope}/" if scope else ""
        return dataclasses.asdict(refresher.refresh_now(scope))

    def describe_peers() -> dict[str, object]:
        assert peers is not None
        info = peers.describe()
        if agent is not None:
            info["master"] = agent.describe()  # type: ignore[attr-defined]
        return info

    control = ControlServer(
        loop=loop, metrics=metrics, socket_path=config.cache_dir / SOCKET_NAME,
        info={"source": url, "mountpoint": str(config.mountpoint), "pid": os.getpid(),
              "cache_dir": str(config.cache_dir), "cache_policy": config.cache_policy,
              "cache_size_bytes": config.cache_size_bytes},
        refresh=refresh, drop=fs.drop_cached, metrics_addr=config.metrics_addr,
        peers=describe_peers if peers is not None else None, preloads=preloads)
    control.start()
    return control


def abort_leftover_uploads(store: ObjectStore, leftovers: list[PendingUpload],
                           metrics: Metrics) -> int:
    """Abort the multipart uploads a previous run of this mount started and never finished
    (it was killed mid-write): their parts are stored, and billed, until aborted. Runs in a
    background thread once mounted; an upload that cannot be aborted now keeps its record
    for the next start. Returns how many were aborted."""
    log.info("%d multipart upload(s) left unfinished by a previous run of this mount "
             "(killed while writing?): aborting them; nothing of them was published",
             len(leftovers))
    aborted = 0
    for upload in leftovers:
        if upload.bucket != store.config.bucket:
            log.warning("not aborting upload %s of s3://%s/%s: this mount is on bucket %s",
                        upload.upload_id, upload.bucket, upload.key, store.config.bucket)
            continue
        try:
            store.abort(upload.key, upload.upload_id)  # crosses out the record
        except Exception as exc:  # noqa: BLE001 - the record stays; the next start retries
            log.warning("could not abort the leftover upload of %s (%s): %s; trying again at "
                        "the next start", upload.key, upload.upload_id, exc)
            continue
        aborted += 1
        metrics.inc("upload_leftovers_aborted_total")
        log.info("aborted the leftover multipart upload of %s (%s)", upload.key,
                 upload.upload_id)
    return aborted


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the page cache keeps page files open
    between hits, up to half the limit); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.info("could not raise the open files limit from %d to %d: %s", soft, hard, exc)
    return soft


def run(config: MountConfig, lock_fd: int, ready: Callable[[str | None], None]) -> int:
    """Serve the mount. ``ready(None)`` once mounted, ``ready(message)`` on a start-up error."""
    from objfs import fuse_adapter  # the only llfuse import, kept out of the CLI's start-up

    raise_open_files_limit()

    previous_stop_clean = write_lock_owner(lock_fd)
    if boot_changed(config.cache_dir) and not previous_stop_clean:
        log.warning("the previous daemon of %s did not stop cleanly and the machine has "
                    "rebooted since (power loss or crash?): rebuilding the metadata tree and "
                    "dropping the page cache index, which may be damaged", config.cache_dir)
        discard_unsynced_state(config.cache_dir)
    metrics = Metrics()
    loop = EventLoopThread().start()
    store: ObjectStore | None = None
    tree: MetadataTree | None = None
    cache: PageCache | None = None
    refresher: Refresher | None = None
    control: ControlServer | None = None
    peers: PeerService | None = None
    peers_started = False
    preloads = None
    agent = None
    mounted = False
    try:
        ledger = UploadLedger(config.cache_dir / "uploads", config.store.bucket)
        leftovers = ledger.pending()
        store = ObjectStore(config.store, loop, metrics=metrics, uploads=ledger)
        store.check_access()
        tree = MetadataTree(config.cache_dir / "tree", prefix=config.store.prefix,
                            identity=config.store.identity, metrics=metrics)
        peers = start_peers(config, metrics)
        cache = open_page_cache(config, store, loop, metrics, peers)
        if peers is not None:
            peers_started = True  # stop() also cleans up a start that failed half-way
            loop.run(peers.start(cache), timeout=30)
        url = f"s3://{config.store.bucket}/{config.store.prefix}".rstrip("/")
        fs = Filesystem(config, tree, cache, metrics=metrics, store=store, loop=loop, xattrs={
            "user.objfs.pid": str(os.getpid()),
            "user.objfs.cache_dir": str(config.cache_dir),
            "user.objfs.source": url,
            "user.objfs.endpoint": config.store.endpoint or "",
            "user.objfs.control": str(config.cache_dir / SOCKET_NAME),
        })
        listed = tree.listed_at() is not None
        if not listed:
            log.info("no complete metadata tree in %s: listing %s", config.cache_dir, url)
        elif not previous_stop_clean:
            # Files it was writing are in the tree but were never published: relist before
            # serving, which sweeps them (and catches up with the origin).
            log.warning("the previous daemon of %s did not stop cleanly (killed?): relisting "
                        "%s before serving", config.cache_dir, url)
        if not (listed and previous_stop_clean):
            started = time.monotonic()
            stats = tree.refresh(store.list_pages())
            log.info("listed %d objects (%d removed, %d invalid keys skipped) in %.2fs",
                     stats.objects, stats.removed, stats.skipped_invalid,
                     time.monotonic() - started)
        refresher = Refresher(tree, store, config.ttl_s, fs)
        refresher.start()
        metrics.gauge("tree_objects", tree.count)
        from objfs.warmup import LocalPreloads

        fetcher = ExtentFetcher(cache, metrics, concurrency=config.read_parallelism)
        extent_pages = peers.membership.ring().extent_pages if peers is not None \
            else DEFAULT_EXTENT_PAGES
        preloads = LocalPreloads(tree, fs.version_of, fetcher, loop, extent_pages=extent_pages)
        if config.master_url and peers is not None:
            agent = start_master_agent(config, peers, fetcher, loop, metrics)
        control = start_control(config, loop, metrics, fs, refresher, url, peers, preloads,
                                agent)
        options = fuse_adapter.mount_options(
            fsname=f"objfs:{config.store.bucket}/{config.store.prefix}".rstrip("/"),
            allow_other=config.allow_other, read_only=config.read_only,
            extra=config.fuse_options)

        def on_mounted() -> None:
            nonlocal mounted
            mounted = True
            log.info("mounted %s at %s (pid %d)", url, config.mountpoint, os.getpid())
            ready(None)
            if agent is not None:
                agent.start()
            if leftovers:
                threading.Thread(target=abort_leftover_uploads, args=(store, leftovers, metrics),
                                 name="objfs-leftovers", daemon=True).start()

        signum = fuse_adapter.serve(fs, str(config.mountpoint), options, config.fuse_workers,
                                    on_mounted=on_mounted)
        log.info("unmounted %s (%s)", config.mountpoint,
                 f"signal {signum}" if signum else "unmount request")
        return 0
    except ObjfsError as exc:
        log.error("%s", exc)
        if not mounted:
            ready(str(exc))
        return 1
    except Exception as exc:
        log.exception("objfs daemon failed")
        if not mounted:
            ready(f"unexpected error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        t0 = time.monotonic()
        if agent is not None:
            agent.stop(leave=True)
        if preloads is not None:
            preloads.stop()
        if control is not None:
            control.stop()
        if refresher is not None:
            refresher.stop()
        if peers is not None and peers_started:
            try:
                loop.run(peers.stop(), timeout=10)
            except Exception as exc:  # shutting down anyway
                log.debug("peer cache stop: %s", exc)
        t1 = time.monotonic()
        if store is not None:
            store.close()
        t2 = time.monotonic()
        loop.stop()
        if cache is not None:
            cache.close()
        log.debug("shutdown: refresher %.3fs, store %.3fs, loop %.3fs", t1 - t0, t2 - t1,
                  time.monotonic() - t2)
        if tree is not None and (refresher is None or refresher.stopped()):
            tree.close()  # else a refresh still writes to it; the process exit ends it
        release_lock_owner(lock_fd)
