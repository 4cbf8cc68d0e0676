"""`objfs stats`, `objfs peers`, `objfs refresh`, `objfs cache drop`: clients of a mount's control endpoint.

The mount point alone finds the endpoint: the mount root carries a ``user.objfs.control``
extended attribute naming the unix socket in the cache dir. Only argument handling, the HTTP
request and printing live here; the daemon does the work (objfs/control.py).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import sys
import time
import urllib.parse
from typing import Any

from objfs.errors import ConfigError
from objfs.mounts import mounted_fstype

MiB = 1024 * 1024


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def find_mount_root(path: str) -> str:
    """The objfs mount point at or above ``path``. Raises ConfigError."""
    current = os.path.abspath(path)
    if not os.path.exists(current) and mounted_fstype(current) is None:
        raise ConfigError(f"{path}: no such file or directory")
    while True:
        fstype = mounted_fstype(current)
        if fstype is not None:
            if fstype != "fuse.objfs":
                raise ConfigError(f"{path} is not on an objfs mount (it is on {fstype})")
            return current
        parent = os.path.dirname(current)
        if parent == current:
            raise ConfigError(f"{path} is not on an objfs mount")
        current = parent


def control_socket(mount_root: str) -> str:
    try:
        return os.getxattr(mount_root, "user.objfs.control").decode()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise ConfigError(f"{mount_root} is a dead objfs mount (its daemon is gone); "
                              f"run: objfs umount {mount_root}") from None
        raise ConfigError(f"{mount_root}: the objfs daemon has no control endpoint "
                          f"({exc.strerror})") from None


def request(mount_root: str, method: str, path: str, timeout: float = 30.0) -> Any:
    sock_path = control_socket(mount_root)
    # Reach the socket through a descriptor of its directory: a unix socket path is limited
    # to 107 bytes, a cache dir path is not.
    try:
        dir_fd = os.open(os.path.dirname(sock_path), os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(f"cannot reach the control endpoint of {mount_root} at {sock_path}: "
                          f"{exc.strerror}") from None
    conn = _UnixConnection(f"/proc/self/fd/{dir_fd}/{os.path.basename(sock_path)}", timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ConfigError(f"cannot reach the control endpoint of {mount_root} at {sock_path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    finally:
        conn.close()
        os.close(dir_fd)
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        raise ConfigError(f"bad answer from {sock_path}: {body[:200]!r}") from None
    if response.status != 200:
        raise ConfigError(payload.get("error") or f"HTTP {response.status}")
    return payload


def relative_to_mount(mount_root: str, path: str | None) -> str:
    """PATH as given on the command line -> path relative to the mount root."""
    if not path:
        return ""
    if os.path.isabs(path):
        full = os.path.normpath(path)
        if full != mount_root and not full.startswith(mount_root.rstrip("/") + "/"):
            raise ConfigError(f"{path} is not under the mount {mount_root}")
        return os.path.relpath(full, mount_root) if full != mount_root else ""
    rel = os.path.normpath(path)
    if rel == ".." or rel.startswith("../"):
        raise ConfigError(f"{path} leaves the mount")
    return "" if rel == "." else rel


def command(mount: str, endpoint: str, path: str | None) -> dict[str, Any]:
    root = find_mount_root(mount)
    rel = relative_to_mount(root, path)
    query = urllib.parse.urlencode({"path": rel})
    return request(root, "POST", f"{endpoint}?{query}", timeout=600.0)


# ---- stats ---------------------------------------------------------------------------------

_COLUMNS = [  # header, width
    ("ops/s", 7), ("rd MB/s", 8), ("cache", 7), ("fetch", 7), ("origin", 7), ("peer", 6),
    ("hit%", 5), ("infl", 5), ("ra", 4), ("used GiB", 9), ("wr MB/s", 8), ("parts", 5),
    ("buf MB", 7), ("lat ms", 7), ("err/s", 6),
]


def _fuse_ops(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("fuse_") and k.endswith("_total")
               and not k.endswith(("_errors_total", "_refused_total")))


def _errors(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.endswith("_errors_total"))


def stats_row(prev: dict[str, Any], cur: dict[str, Any]) -> list[str]:
    a, b = prev["metrics"], cur["metrics"]
    dt = max(1e-6, cur["time"] - prev["time"])

    def rate(name: str, scale: float = 1.0) -> float:
        return (b.get(name, 0) - a.get(name, 0)) / dt / scale

    cache, fetched = rate("read_cache_bytes"), rate("read_fetched_bytes")
    # Hits: bytes from pages that were cached before this read wanted them (pages readahead
    # fetched moments ago came from the origin: read_prefetched_bytes, not hits).
    hits = rate("read_cache_hit_bytes")
    hit = f"{100 * hits / (cache + fetched):.0f}" if cache + fetched > 0 else "-"
    reads = b.get("fuse_read_total", 0) - a.get("fuse_read_total", 0)
    read_s = b.get("fuse_read_seconds_total", 0) - a.get("fuse_read_seconds_total", 0)
    latency = f"{1000 * read_s / reads:.2f}" if reads else "-"
    values = [
        f"{(_fuse_ops(b) - _fuse_ops(a)) / dt:.0f}", f"{rate('fuse_read_bytes', MiB):.1f}",
        f"{cache / MiB:.1f}", f"{fetched / MiB:.1f}", f"{rate('read_origin_bytes', MiB):.1f}",
        f"{rate('read_peer_bytes', MiB):.1f}", hit, f"{b.get('cache_pages_inflight', 0):.0f}",
        f"{b.get('readahead_window_pages_max', 0):.0f}",
        f"{b.get('cache_used_bytes', 0) / 2**30:.2f}", f"{rate('upload_bytes', MiB):.1f}",
        f"{b.get('upload_parts_inflight', 0):.0f}",
        f"{b.get('upload_bytes_buffered', 0) / MiB:.0f}", latency,
        f"{(_errors(b) - _errors(a)) / dt:.1f}",
    ]
    return values


def _line(cells: list[str]) -> str:
    return " ".join(c.rjust(w) for c, (_, w) in zip(cells, _COLUMNS))


def run_stats(mount: str, *, interval: float, count: int | None, as_json: bool) -> int:
    root = find_mount_root(mount)
    prev = request(root, "GET", "/stats", timeout=10.0)
    if as_json:
        json.dump(prev, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    print(f"objfs stats {root}  ({prev['mount'].get('source', '?')}, every {interval:g}s; "
          "MB/s are MiB/s; cache/fetch/origin/peer: bytes read by source)", flush=True)
    print(" ".join(h.rjust(w) for h, w in _COLUMNS), flush=True)
    rows = 0
    try:
        while count is None or rows < count:
            time.sleep(interval)
            cur = request(root, "GET", "/stats", timeout=10.0)
            print(_line(stats_row(prev, cur)), flush=True)
            prev = cur
            rows += 1
    except KeyboardInterrupt:
        pass
    return 0


# ---- peers ---------------------------------------------------------------------------------

def _mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def peers_table(info: dict[str, Any]) -> list[str]:
    """The lines ``objfs peers`` prints for a ``GET /peers`` answer."""
    if not info.get("cluster"):
        return ["not a cluster member (mounted without --peer-listen)"]
    lines = [f"this host: {info.get('self')} (listening on {info.get('listen')}), "
             f"s3://{info.get('bucket')}/{info.get('prefix', '')}, extents of "
             f"{info.get('extent_pages')} pages",
             f"{'member':<24} {'state':<22} {'in MiB':>9} {'out MiB':>9} {'asked':>7} "
             f"{'served':>7} {'fallbk':>7} {'owner GETs':>10}  last error"]
    master = info.get("master")
    if master:
        ago = master.get("last_heartbeat_s_ago")
        line = (f"master: {master['url']} {master['state']}"
                + (f", last heartbeat {ago:.1f}s ago" if ago is not None else "")
                + f", {master.get('extents_held', 0)} preload extents held")
        if master.get("last_error"):
            line += f" ({master['last_error']})"
        lines.insert(1, line)
    for m in info.get("members", []):
        state = m["state"]
        if m.get("retry_in_s"):
            state = f"{state} ({m['retry_in_s']:.0f}s)"
        if not m.get("member", True):
            state += " [not a member]"
        error = m.get("last_error") or ""
        if error and m.get("last_error_age_s") is not None:
            error = f"{error} ({m['last_error_age_s']:.0f}s ago)"
        lines.append(f"{m['id']:<24} {state:<22} {_mib(m['in_bytes']):>9} "
                     f"{_mib(m['out_bytes']):>9} {m['requests']:>7} {m['served']:>7} "
                     f"{m['fallbacks']:>7} {m['owner_fetches']:>10}  {error}".rstrip())
    return lines


def run_peers(mount: str, *, as_json: bool) -> int:
    root = find_mount_root(mount)
    info = request(root, "GET", "/peers", timeout=10.0)
    if as_json:
        json.dump(info, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    for line in peers_table(info):
        print(line)
    return 0
