"""`objfs master`, `objfs preload` and `objfs sign`: argument parsing and printing only.

The work is elsewhere: ``objfs.master.server`` runs the master, ``objfs.master.client`` talks
to it. ``objfs preload`` prints a progress bar on a terminal, a plain line every few seconds
otherwise, or JSON with ``--json``; it exits 0 when the job is done, 1 when it failed or was
cancelled, 130 on ^C (asking on a terminal whether to cancel the job, or cancelling at once
with ``--cancel-on-interrupt``; otherwise the job goes on). User errors are one line on stderr
(``cli.main`` prints every ``ObjfsError``).

``objfs preload MOUNTPOINT/PATH`` (a path, not an s3:// URL) needs no master: the daemon of
that mount warms its own cache (``objfs.warmup``, through the control endpoint) and the
command follows the job with the same display until it ends; ^C cancels it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, TextIO

from objfs.config import parse_size
from objfs.errors import ConfigError

MiB = 1024 * 1024
_VERBS = ("status", "cancel", "list")


def register(sub: Any) -> None:
    """Add ``master``, ``preload`` and ``sign`` to the ``objfs`` subcommands."""
    p = sub.add_parser("master", help="run the preload master (in the foreground)",
                       description="Run the cluster's master: member registry and preload "
                       "jobs, state in --state-dir, API on --listen.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address of the HTTP API (e.g. 0.0.0.0:9560)")
    p.add_argument("--state-dir", required=True, metavar="DIR",
                   help="LMDB state (jobs, members); a restarted master resumes from it")
    p.add_argument("--cluster-secret-file", required=True, metavar="FILE",
                   help="the cluster's shared secret (mode 0600)")
    p.add_argument("--endpoint", help="S3 endpoint URL the master lists with (default: AWS)")
    p.add_argument("--region", help="region for signing (default: AWS_REGION or us-east-1)")
    p.add_argument("--heartbeat-interval", type=float, default=2.0, metavar="SECONDS",
                   help="how often members heartbeat (default 2)")
    p.add_argument("--member-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="drop a member after this long without a heartbeat (default 15)")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="attempts per extent before it counts as failed (default 3)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-file", help="log here (default: stderr)")
    p.set_defaults(func=cmd_master)

    p = sub.add_parser(
        "preload", help="warm data into the cluster's caches (status, cancel, list)",
        usage="objfs preload s3://BUCKET/PATH [s3://...] --master URL [--wait] ...\n"
              "       objfs preload status ID | cancel ID | list --master URL ...\n"
              "       objfs preload MOUNTPOINT/PATH [--bandwidth-limit RATE]",
        description="Submit a preload job to the master (a directory, a file, a bucket, or "
        "several files), or look at / cancel jobs. With a path on an objfs mount instead "
        "of s3:// URLs: warm that host's cache only (no master), following the job until "
        "it ends (^C cancels it).")
    p.add_argument("target", nargs="+", metavar="ARG",
                   help="s3:// URLs to preload, or: status ID, cancel ID, list; or one "
                   "path on an objfs mount (local warm-up)")
    p.add_argument("--master", default=os.environ.get("OBJFS_MASTER"), metavar="URL",
                   help="the master (default: $OBJFS_MASTER)")
    p.add_argument("--cluster-secret-file", metavar="FILE",
                   default=os.environ.get("OBJFS_CLUSTER_SECRET_FILE"),
                   help="the cluster's secret (default: $OBJFS_CLUSTER_SECRET_FILE)")
    p.add_argument("--wait", action="store_true",
                   help="follow the job with a progress display until it ends")
    p.add_argument("--json", action="store_true", dest="as_json",
                   help="print JSON (with --wait: the final status only)")
    p.add_argument("--cancel-on-interrupt", action="store_true",
                   help="on ^C while waiting, cancel the job without asking")
    p.add_argument("--bandwidth-limit", metavar="RATE",
                   help="bytes/s for the whole job across hosts, e.g. 200M (default: none)")
    p.add_argument("--group", help="the member group to preload into, when several mount "
                   "the data (ids: GET /v1/members)")
    p.add_argument("--files-from", metavar="FILE",
                   help="read more s3:// URLs from FILE, one per line ('-': stdin)")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="seconds between progress updates (default 1 on a terminal, else 5)")
    p.set_defaults(func=cmd_preload)

    p = sub.add_parser("sign", help="print the signature headers of a master or peer request "
                       "(for curl -H @FILE)")
    p.add_argument("method", metavar="METHOD", help="GET, POST, DELETE, ...")
    p.add_argument("path", metavar="PATH", help="path and query as sent, e.g. /v1/preloads")
    p.add_argument("--data", default="", help="the request body exactly as sent "
                   "('@FILE' reads it from FILE)")
    p.add_argument("--cluster-secret-file", metavar="FILE",
                   default=os.environ.get("OBJFS_CLUSTER_SECRET_FILE"),
                   help="the cluster's secret (default: $OBJFS_CLUSTER_SECRET_FILE)")
    p.set_defaults(func=cmd_sign)


# ---- objfs master / sign -----------------------------------------------------------------------

def cmd_master(args: argparse.Namespace) -> int:
    from objfs.master import server

    config = server.MasterConfig.create(
        listen=args.listen, state_dir=args.state_dir, secret_file=args.cluster_secret_file,
        endpoint=args.endpoint, region=args.region,
        heartbeat_interval=args.heartbeat_interval, member_timeout=args.member_timeout,
        max_attempts=args.max_attempts, log_level=args.log_level, log_file=args.log_file)
    return server.run(config)


def cmd_sign(args: argparse.Namespace) -> int:
    from objfs.cluster import load_cluster_secret, sign

    if not args.cluster_secret_file:
        raise ConfigError("objfs sign: --cluster-secret-file is required "
                          "(or set OBJFS_CLUSTER_SECRET_FILE)")
    secret = load_cluster_secret(args.cluster_secret_file)
    data = args.data.encode()
    if args.data.startswith("@"):
        try:
            with open(args.data[1:], "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError(f"--data {args.data}: {exc.strerror}") from None
    if not args.path.startswith("/"):
        raise ConfigError(f"PATH must start with '/': {args.path!r}")
    for name, value in sign(secret, args.method, args.path, data).items():
        print(f"{name}: {value}")
    return 0


# ---- objfs preload -----------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> Any:
    from objfs.master.client import MasterClient

    if not args.master:
        raise ConfigError("objfs preload: --master URL is required (or set OBJFS_MASTER)")
    if not args.cluster_secret_file:
        raise ConfigError("objfs preload: --cluster-secret-file is required "
                          "(or set OBJFS_CLUSTER_SECRET_FILE)")
    return MasterClient.from_secret_file(args.master, args.cluster_secret_file)


def _sources(args: argparse.Namespace) -> list[str]:
    sources = list(args.target)
    if args.files_from:
        try:
            stream = sys.stdin if args.files_from == "-" else open(args.files_from)
        except OSError as exc:
            raise ConfigError(f"--files-from {args.files_from}: {exc.strerror}") from None
        with stream:
            sources += [line.strip() for line in stream if line.strip()]
    return sources


def cmd_preload(args: argparse.Namespace) -> int:
    verb = args.target[0]
    if verb in _VERBS:
        return _cmd_verb(args, verb, args.target[1:])
    if not any(t.startswith("s3://") for t in args.target) and not args.files_from:
        if len(args.target) != 1:
            raise ConfigError("objfs preload: give one path on an objfs mount (or s3:// URLs "
                              "for the master)")
        if args.group:  # (--master may come from $OBJFS_MASTER: not an error here)
            raise ConfigError("objfs preload: --group is for s3:// sources (a path warms "
                              "this host's cache only)")
        return _cmd_local(args, args.target[0])
    sources = _sources(args)
    if not all(s.startswith("s3://") for s in sources):
        bad = next(s for s in sources if not s.startswith("s3://"))
        raise ConfigError(f"objfs preload: {bad!r} is not an s3:// URL (a path on a mount "
                          "is preloaded on its own: objfs preload MOUNTPOINT/PATH)")
    limit = _bandwidth_limit(args)
    client = _client(args)
    if len(sources) == 1 and not args.files_from:
        status = client.submit(sources[0], bandwidth_limit=limit, group=args.group)
    else:
        status = client.submit(files=sources, bandwidth_limit=limit, group=args.group)
    if not args.wait:
        if args.as_json:
            _print_json(status)
        else:
            print(status["id"])
        return 0
    return _follow(client, status["id"], args)


def _bandwidth_limit(args: argparse.Namespace) -> int | None:
    if not args.bandwidth_limit:
        return None
    limit = parse_size(args.bandwidth_limit.removesuffix("/s"), "--bandwidth-limit")
    if limit <= 0:
        raise ConfigError("--bandwidth-limit must be positive")
    return limit


def _cmd_local(args: argparse.Namespace, path: str) -> int:
    """Warm one host's cache through its daemon's control endpoint and follow the job."""
    import urllib.parse

    from objfs.tools import control_client

    full = os.path.abspath(path)
    root = control_client.find_mount_root(full)
    rel = control_client.relative_to_mount(root, full)
    limit = _bandwidth_limit(args)
    query = {"path": rel, **({"bandwidth_limit": str(limit)} if limit else {})}
    status = control_client.request(root, "POST",
                                    f"/preload?{urllib.parse.urlencode(query)}")
    job_id = status["id"]
    tty = sys.stdout.isatty() and not args.as_json
    interval = args.interval or (1.0 if tty else 5.0)
    display = Progress(sys.stdout, tty=tty, quiet=args.as_json, interval=interval)
    quoted = urllib.parse.quote(job_id, safe="")
    try:
        while True:
            display.update(status)
            if status["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(min(interval, 0.5))
            status = control_client.request(root, "GET", f"/preload/{quoted}", timeout=10.0)
    except KeyboardInterrupt:
        display.clear()
        try:
            control_client.request(root, "DELETE", f"/preload/{quoted}", timeout=10.0)
            print(f"objfs: interrupted; preload {job_id} of {path} cancelled", file=sys.stderr)
        except ConfigError as exc:
            print(f"objfs: interrupted; could not cancel preload {job_id}: {exc}",
                  file=sys.stderr)
        return 130
    display.finish(status)
    if args.as_json:
        _print_json(status)
    if status["state"] == "done":
        return 0
    print(f"objfs: {failure_line(status)}", file=sys.stderr)
    return 1


def _cmd_verb(args: argparse.Namespace, verb: str, rest: list[str]) -> int:
    if verb == "list":
        if rest:
            raise ConfigError("objfs preload list takes no arguments")
        jobs = _client(args).list()
        if args.as_json:
            _print_json(jobs)
        else:
            _print_table(jobs)
        return 0
    if len(rest) != 1:
        raise ConfigError(f"usage: objfs preload {verb} ID")
    client = _client(args)
    job_id = rest[0]
    if verb == "cancel":
        status = client.cancel(job_id)
        if args.as_json:
            _print_json(status)
        else:
            print(f"preload {job_id} cancelled")
        return 0
    if args.wait:
        return _follow(client, job_id, args)
    status = client.status(job_id)
    if args.as_json:
        _print_json(status)
    else:
        print(describe(status))
    return 0


def _follow(client: Any, job_id: str, args: argparse.Namespace) -> int:
    """Wait for the job with a progress display; the exit code says how it ended."""
    tty = sys.stdout.isatty() and not args.as_json
    interval = args.interval or (1.0 if tty else 5.0)
    display = Progress(sys.stdout, tty=tty, quiet=args.as_json, interval=interval)
    try:
        # Poll at least every second, so the end is seen at once; print every interval.
        final = client.wait(job_id, callback=display.update, interval=min(interval, 1.0))
    except KeyboardInterrupt:
        display.clear()
        return _interrupted(client, job_id, args)
    display.finish(final)
    if args.as_json:
        _print_json(final)
    if final["state"] == "done":
        return 0
    print(f"objfs: {failure_line(final)}", file=sys.stderr)
    return 1


def _interrupted(client: Any, job_id: str, args: argparse.Namespace) -> int:
    cancel = args.cancel_on_interrupt
    if not cancel and sys.stdin.isatty() and sys.stdout.isatty():
        # The question goes to the terminal on stdout (input() would put it on stderr).
        sys.stdout.write(f"cancel preload {job_id}? [y/N] ")
        sys.stdout.flush()
        try:
            answer = sys.stdin.readline()
        except KeyboardInterrupt:
            answer = ""
        cancel = answer.strip().lower() in ("y", "yes")
    if cancel:
        try:
            client.cancel(job_id)
            print(f"objfs: interrupted; preload {job_id} cancelled", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - still an interrupt: report and exit 130
            print(f"objfs: interrupted; could not cancel preload {job_id}: {exc}",
                  file=sys.stderr)
    else:
        print(f"objfs: interrupted; preload {job_id} goes on "
              f"(objfs preload cancel {job_id} stops it)", file=sys.stderr)
    return 130


# ---- formatting ----------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _pair(done: int, total: int) -> str:
    """'1.21/2.70 GiB': both in the unit of ``total``."""
    unit, scale = "B", 1
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if total < scale * 1024:
            break
        unit, scale = name, scale * 1024
    if scale == 1:
        return f"{done}/{total} B"
    return f"{done / scale:.2f}/{total / scale:.2f} {unit}"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fraction(status: dict[str, Any]) -> float | None:
    b = status["bytes"]
    if status["listing"] or not b["total"]:
        return None if status["listing"] else 1.0
    return (b["done"] + b["skipped"] + b["failed"]) / b["total"]


def progress_line(status: dict[str, Any], bar_width: int = 0) -> str:
    b, f = status["bytes"], status["files"]
    files_final = f["done"] + f["skipped"] + f["failed"]
    frac = fraction(status)
    rate = status.get("throughput_bytes_per_s")
    # With a bar (a terminal) the line is redrawn under a header naming the job: keep it short.
    parts = [] if bar_width else [f"preload {status['id']}", status["state"]]
    if bar_width:
        filled = int(round((frac or 0.0) * bar_width))
        parts.append("[" + "#" * filled + "-" * (bar_width - filled) + "]")
    parts.append("listing" if frac is None else f"{100 * frac:.1f}%")
    parts.append(_pair(b["done"] + b["skipped"] + b["failed"], b["total"]))
    parts.append(f"{files_final}/{f['total']} files")
    if f["skipped"] or b["skipped"]:
        parts.append(f"{human_bytes(b['skipped'])} skipped")
    if f["failed"]:
        parts.append(f"{f['failed']} failed")
    parts.append("-" if rate is None else f"{rate / MiB:.1f} MiB/s")
    parts.append(f"ETA {human_duration(status.get('eta_s'))}")
    return "  ".join(parts)


def summary_line(status: dict[str, Any]) -> str:
    b, f = status["bytes"], status["files"]
    elapsed = status.get("elapsed_s") or 0.0
    rate = b["done"] / elapsed / MiB if elapsed > 0 else 0.0
    return (f"preload {status['id']} {status['state']}: {f['total']} files ({f['done']} "
            f"fetched, {f['skipped']} skipped, {f['failed']} failed), "
            f"{human_bytes(b['done'])} fetched, {human_bytes(b['skipped'])} skipped, "
            f"{human_bytes(b['failed'])} failed in {elapsed:.1f}s ({rate:.1f} MiB/s)")


def failure_line(status: dict[str, Any]) -> str:
    if status["state"] == "cancelled":
        return f"preload {status['id']} was cancelled"
    line = f"preload {status['id']} {status['state']}"
    if status.get("message"):
        line += f": {status['message']}"
    errors = status.get("errors") or []
    if errors:
        first = errors[0]
        line += f"; first error: {first.get('key')}: {first.get('error')}"
    return line


def describe(status: dict[str, Any]) -> str:
    b, f, e = status["bytes"], status["files"], status["extents"]
    lines = [progress_line(status),
             f"  source   {status['source']}  (group {status['group']})",
             f"  files    {f['total']} total, {f['done']} fetched, {f['skipped']} skipped, "
             f"{f['failed']} failed",
             f"  bytes    {human_bytes(b['total'])} total, {human_bytes(b['done'])} fetched, "
             f"{human_bytes(b['skipped'])} skipped, {human_bytes(b['failed'])} failed",
             f"  extents  {e['total']} total, {e['final']} final, {e['failed']} failed, "
             f"{e['reassigned']} reassigned, {e['retried']} retried"]
    for host, h in status.get("hosts", {}).items():
        lines.append(f"  host {host:<21} {h['state']:<4} {h['extents_done']} done, "
                     f"{h['extents_assigned']} to go, {h['extents_failed']} failed, "
                     f"{human_bytes(h['bytes_done'])} fetched, "
                     f"{human_bytes(h['bytes_skipped'])} skipped")
    for err in status.get("errors", []):
        lines.append(f"  error    {err.get('host') or '-'} {err.get('key')} extent "
                     f"{err.get('extent')}: {err.get('error')}")
    for warning in status.get("warnings", []):
        lines.append(f"  warning  {warning}")
    if status.get("message"):
        lines.append(f"  message  {status['message']}")
    return "\n".join(lines)


def _print_table(jobs: list[dict[str, Any]]) -> None:
    print(f"{'ID':<16}  {'STATE':<9}  {'DONE':>6}  {'FILES':>7}  {'BYTES':>11}  SOURCE")
    for job in jobs:
        frac = fraction(job)
        done = "-" if frac is None else f"{100 * frac:.0f}%"
        print(f"{job['id']:<16}  {job['state']:<9}  {done:>6}  {job['files']['total']:>7}  "
              f"{human_bytes(job['bytes']['total']):>11}  {job['source']}")


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


class Progress:
    """Progress display: a redrawn bar on a terminal, else a plain line per interval."""

    def __init__(self, stream: TextIO, *, tty: bool, quiet: bool = False,
                 interval: float = 5.0, clock: Any = time.monotonic) -> None:
        self._stream = stream
        self._tty = tty
        self._quiet = quiet
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._drawn = 0
        self._header = False

    def update(self, status: dict[str, Any]) -> None:
        if self._quiet or status["state"] in ("done", "failed", "cancelled"):
            return
        if self._tty:
            if not self._header:
                self._header = True
                self._stream.write(f"preload {status['id']}: {status['source']} "
                                   f"(^C to stop waiting)\n")
            width = shutil.get_terminal_size((100, 20)).columns
            line = progress_line(status, bar_width=20)[:width - 1]
            self._stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
            self._stream.flush()
            return
        now = self._clock()
        if self._last is None or now - self._last >= self._interval:
            self._last = now
            self._stream.write(progress_line(status) + "\n")
            self._stream.flush()

    def clear(self) -> None:
        if self._tty and self._drawn:
            self._stream.write("\r" + " " * self._drawn + "\r")
            self._stream.flush()
            self._drawn = 0

    def finish(self, status: dict[str, Any]) -> None:
        if self._quiet:
            return
        self.clear()
        self._stream.write(summary_line(status) + "\n")
        self._stream.flush()
