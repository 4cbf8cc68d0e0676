"""The ``objfs`` command: argument parsing, daemonizing and printing; the work is elsewhere.

Every failure a user can cause ends as one line on stderr and a non-zero exit: ``ObjfsError``
messages are printed as they are, argparse reports bad flags (exit 2), and nothing prints a
traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from objfs import __version__
from objfs.config import MountConfig
from objfs.errors import ConfigError, ObjfsError
from objfs.mounts import mounted_fstype
from objfs.procinfo import process_alive


def _add_mount_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="s3://BUCKET[/PREFIX]", help="what to mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    p.add_argument("--endpoint", help="S3 endpoint URL (default: AWS S3)")
    p.add_argument("--region", help="region for signing (default: AWS_REGION or us-east-1)")
    p.add_argument("--cache-dir", help="metadata tree and page cache (default: "
                   "/var/cache/objfs/BUCKET-HASH as root, else ~/.cache/objfs/...)")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="do not daemonize; log to stderr")
    p.add_argument("--ttl", type=float, metavar="SECONDS",
                   help="metadata staleness bound: relist the prefix this often (default 300)")
    p.add_argument("--attr-timeout", type=float, metavar="SECONDS", dest="attr_timeout_s",
                   help="how long the kernel may cache names and attributes (default: the "
                   "TTL; relists and this host's changes tell the kernel what changed)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users (e.g. the training job's) use the mount")
    p.add_argument("--uid", type=int, help="owner shown for files (default: daemon's uid)")
    p.add_argument("--gid", type=int, help="group shown for files (default: daemon's gid)")
    p.add_argument("--file-mode", help="permission bits of files, octal (default 0644)")
    p.add_argument("--dir-mode", help="permission bits of directories, octal (default 0755)")
    p.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPT[,OPT]",
                   help="extra FUSE mount options, passed through")
    p.add_argument("--fuse-workers", type=int, default=16,
                   help="FUSE worker threads: requests that wait (origin misses, uploads at "
                        "close) in progress at once (default 16; fewer is faster for cache "
                        "hits only, see README)")
    p.add_argument("--read-parallelism", type=int, default=16,
                   help="ranged GETs in flight for the mount (default 16)")
    p.add_argument("--read-request-size", metavar="SIZE",
                   help="largest ranged GET, a multiple of 1M (default 8M)")
    p.add_argument("--readahead", metavar="SIZE",
                   help="largest readahead window of a sequential reader (default 128M)")
    p.add_argument("--random-prefetch", metavar="SIZE",
                   help="fetch whole, in the background, objects up to SIZE that are read "
                   "out of order (0: never; default: a quarter of --cache-size, at most 4G)")
    p.add_argument("--cache-size", metavar="SIZE",
                   help="page cache capacity on disk, e.g. 500G (default 10G)")
    p.add_argument("--cache-free-floor", metavar="SIZE",
                   help="keep this much free on the cache filesystem (default 1G)")
    p.add_argument("--cache-policy", choices=("lru", "uniform"), default="lru",
                   help="eviction policy: lru, or uniform for shuffled multi-epoch training "
                   "over a dataset larger than the cache (default lru)")
    p.add_argument("--object-metadata", choices=("off", "small", "all"), default="off",
                   help="read mode, owner and symlink-ness from the objects' own metadata "
                   "(one HEAD per object version, on first lookup): small = objects up to "
                   "4 KiB, where symlinks are; all = every object; off = listing only "
                   "(default off)")
    p.add_argument("--read-only", action="store_true",
                   help="refuse every modification with EROFS (mount ro)")
    p.add_argument("--write-buffer", metavar="SIZE",
                   help="memory for write buffers across all open files (default 512M)")
    p.add_argument("--upload-concurrency", type=int, default=8, metavar="N",
                   help="multipart parts of one file uploaded at once (default 8)")
    p.add_argument("--part-size", metavar="SIZE",
                   help="multipart part size, whole 4M blocks (default 8M; 4M for stores "
                   "that take 4 MiB parts, like US3)")
    p.add_argument("--rename-dir-limit", type=int, default=10_000, metavar="N",
                   help="most objects a directory rename copies; beyond it EXDEV (mv then "
                   "copies through the mount) (default 10000)")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    peer = p.add_argument_group("peer cache (README: Peer cache)")
    peer.add_argument("--peer-listen", metavar="HOST:PORT",
                      help="serve this host's page cache to the cluster here and fetch "
                      "from the other members")
    peer.add_argument("--peers", action="append", metavar="HOST:PORT,...",
                      help="the members of the cluster (their --peer-advertise addresses; "
                      "may include this host)")
    peer.add_argument("--cluster-secret-file", metavar="FILE",
                      help="the secret the members (and the master) share (mode 0600; "
                      "needed with --peer-listen)")
    peer.add_argument("--peer-advertise", metavar="HOST:PORT",
                      help="the address the other members know this host by (default: "
                      "the --peer-listen address; required if that is a wildcard)")
    peer.add_argument("--peer-serve-limit", metavar="RATE",
                      help="most bytes/s served to peers, e.g. 200M (default: no limit)")
    peer.add_argument("--master", metavar="URL",
                      help="register with this preload master (objfs master), take the "
                      "member list from it and run its preload work (needs --peer-listen; "
                      "--peers then only seeds the list)")
    p.add_argument("--origin-read-limit", metavar="RATE",
                   help="most bytes/s of ranged GETs from the origin, e.g. 400M "
                   "(default: no limit)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-file", type=Path, help="log here (default: CACHE_DIR/objfs.log)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="objfs", description="Mount an S3 bucket prefix.")
    parser.add_argument("--version", action="version", version=f"objfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_mount = sub.add_parser("mount", help="mount s3://BUCKET[/PREFIX] at MOUNTPOINT")
    _add_mount_args(p_mount)
    p_mount.set_defaults(func=cmd_mount)
    p_umount = sub.add_parser("umount", help="unmount and wait for the daemon to exit")
    p_umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    p_umount.add_argument("--timeout", type=float, default=30.0,
                          help="seconds to wait for the daemon to exit (default 30)")
    p_umount.set_defaults(func=cmd_umount)

    p_stats = sub.add_parser("stats", help="live statistics of a mount, one row per interval")
    p_stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    p_stats.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                         help="seconds between rows (default 1)")
    p_stats.add_argument("--count", type=_positive_int, metavar="N",
                         help="stop after N rows (default: until interrupted)")
    p_stats.add_argument("--json", action="store_true", dest="as_json",
                         help="print one snapshot of every counter as JSON and exit")
    p_stats.set_defaults(func=cmd_stats)

    p_refresh = sub.add_parser("refresh", help="relist the origin now (a subtree with PATH)")
    p_refresh.add_argument("mountpoint", metavar="MOUNTPOINT")
    p_refresh.add_argument("path", nargs="?", metavar="PATH",
                           help="directory or file under the mount (default: all of it)")
    p_refresh.set_defaults(func=cmd_refresh)

    p_peers = sub.add_parser("peers", help="the cluster members a mount shares its cache with")
    p_peers.add_argument("mountpoint", metavar="MOUNTPOINT")
    p_peers.add_argument("--json", action="store_true", dest="as_json",
                         help="print the members as JSON")
    p_peers.set_defaults(func=cmd_peers)

    p_cache = sub.add_parser("cache", help="page cache commands")
    cache_sub = p_cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    p_drop = cache_sub.add_parser("drop", help="remove the cached pages of a file or directory")
    p_drop.add_argument("mountpoint", metavar="MOUNTPOINT")
    p_drop.add_argument("path", metavar="PATH", help="file or directory under the mount")
    p_drop.set_defaults(func=cmd_cache_drop)

    from objfs.tools import preload as preload_cli  # objfs master, preload, sign

    preload_cli.register(sub)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def cmd_stats(args: argparse.Namespace) -> int:
    from objfs.tools import control_client

    return control_client.run_stats(args.mountpoint, interval=args.interval, count=args.count,
                                    as_json=args.as_json)


def cmd_peers(args: argparse.Namespace) -> int:
    from objfs.tools import control_client

    return control_client.run_peers(args.mountpoint, as_json=args.as_json)


def cmd_refresh(args: argparse.Namespace) -> int:
    from objfs.tools import control_client

    result = control_client.command(args.mountpoint, "/refresh", args.path)
    print(f"refreshed /{result.get('scope', '')}: {result.get('objects', 0)} objects listed, "
          f"{result.get('added', 0)} added, {result.get('changed', 0)} changed, "
          f"{result.get('removed', 0)} removed in {result.get('duration_s', 0):.2f}s")
    return 0


def cmd_cache_drop(args: argparse.Namespace) -> int:
    from objfs.tools import control_client

    result = control_client.command(args.mountpoint, "/cache/drop", args.path)
    print(f"dropped {result.get('pages_dropped', 0)} cached pages of "
          f"{result.get('files', 0)} files")
    return 0


def _config_from_args(args: argparse.Namespace) -> MountConfig:
    return MountConfig.create(
        url=args.url, mountpoint=args.mountpoint, endpoint=args.endpoint, region=args.region,
        cache_dir=args.cache_dir, ttl=args.ttl, uid=args.uid, gid=args.gid,
        file_mode=args.file_mode, dir_mode=args.dir_mode, fuse_options=args.fuse_options,
        foreground=args.foreground, allow_other=args.allow_other,
        attr_timeout_s=args.attr_timeout_s, fuse_workers=args.fuse_workers,
        read_parallelism=args.read_parallelism, read_request_size=args.read_request_size,
        readahead=args.readahead, cache_size=args.cache_size,
        random_prefetch=args.random_prefetch,
        cache_free_floor=args.cache_free_floor, cache_policy=args.cache_policy,
        object_metadata=args.object_metadata,
        metrics_addr=args.metrics_addr, read_only=args.read_only,
        write_buffer=args.write_buffer, upload_concurrency=args.upload_concurrency,
        part_size=args.part_size, rename_dir_limit=args.rename_dir_limit,
        log_level=args.log_level,
        log_file=args.log_file, peer_listen=args.peer_listen, peers=args.peers,
        cluster_secret_file=args.cluster_secret_file, peer_advertise=args.peer_advertise,
        peer_serve_limit=args.peer_serve_limit, origin_read_limit=args.origin_read_limit,
        master=args.master)


def cmd_mount(args: argparse.Namespace) -> int:
    config = _config_from_args(args)  # bad flags fail before the daemon's imports (~1 s)
    from objfs import daemon

    lock_fd = daemon.preflight(config)
    if config.foreground:
        daemon.setup_logging(config, to_stderr=True)
        return daemon.run(config, lock_fd, ready=lambda msg: None)

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        code = 1
        try:
            log_path = daemon.setup_logging(config, to_stderr=False)
            devnull = os.open(os.devnull, os.O_RDWR)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(log_fd, 2)  # libfuse and crashes write here
            os.close(devnull)
            os.close(log_fd)

            def ready(message: str | None) -> None:
                line = "ready\n" if message is None else f"error {message}\n"
                try:
                    os.write(write_fd, line.encode())
                    os.close(write_fd)
                except OSError:
                    pass

            code = daemon.run(config, lock_fd, ready)
        finally:
            os._exit(code)

    os.close(write_fd)
    os.close(lock_fd)  # the daemon holds its own copy of the lock
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").rstrip("\n")
    if line == "ready":
        return 0
    if line.startswith("error "):
        os.waitpid(pid, 0)
        raise ObjfsError(line[len("error "):])
    _, status = os.waitpid(pid, 0)
    log_path = config.log_file or (config.cache_dir / daemon.LOG_FILE)
    raise ObjfsError(f"the daemon exited during start-up (status {status}); see {log_path}")


def _unmount_command(mountpoint: str) -> list[str]:
    if os.geteuid() == 0:
        return ["umount", mountpoint]
    for tool in ("fusermount", "fusermount3"):
        if shutil.which(tool):
            return [tool, "-u", mountpoint]
    return ["umount", mountpoint]


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    fstype = mounted_fstype(Path(mountpoint))
    if fstype is None:
        raise ConfigError(f"{mountpoint} is not mounted")
    if fstype != "fuse.objfs":
        raise ConfigError(f"{mountpoint} is not an objfs mount (it is {fstype})")
    pid: int | None = None
    try:
        pid = int(os.getxattr(mountpoint, "user.objfs.pid"))
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            pid = None  # a dead daemon: just remove the mount
    result = subprocess.run(_unmount_command(mountpoint), capture_output=True, text=True,
                            timeout=30)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        detail = message[-1] if message else f"exit {result.returncode}"
        if "busy" in detail.lower():
            raise ObjfsError(f"{mountpoint} is busy (files are open or a process has its cwd "
                             f"there): {detail}", errno_value=errno.EBUSY)
        raise ObjfsError(f"cannot unmount {mountpoint}: {detail}")
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while process_alive(pid):
            if time.monotonic() > deadline:
                raise ObjfsError(f"unmounted {mountpoint}, but daemon pid {pid} has not exited "
                                 f"after {args.timeout:.0f}s")
            time.sleep(0.05)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ObjfsError as exc:
        print(f"objfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("objfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `objfs stats --json | head`: the reader is gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
