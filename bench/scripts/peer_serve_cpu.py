"""What serving cached pages to a peer costs the owner: sendfile from a worker thread (the
peer cache's zero-copy path) against reading the page files and writing them through aiohttp
(its fallback, and what aiohttp's FileResponse does on uvloop).

    .venv/bin/python bench/scripts/peer_serve_cpu.py [--mib 512] [--rounds 3]

An owner process (a real ``PageCache`` with every page of a ``--mib`` object READY, and a
``PeerServer`` on 127.0.0.1) is started per mode; this process asks it for the whole object in
8-page runs over one kept-alive connection, ``--rounds`` times, and reads the owner's CPU
(user+sys, /proc) before and after. Prints MB/s and owner CPU seconds per GiB served, per mode
and round. The asker only counts bytes (no verification), so the owner's cost dominates.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECRET = b"peer-serve-cpu-bench-secret-0123456789"
MiB = 1 << 20


def owner(mib: int, zero_copy: bool, directory: str) -> None:
    """Child: fill a page cache, serve it, print the port, wait for stdin to close."""
    import asyncio

    from objfs.cache.pagecache import PageCache
    from objfs.cache.peer import PeerServer, PeerSettings, PeerTracker
    from objfs.cache.sources import SourceChain
    from objfs.cluster import StaticMembership
    from objfs.loop import EventLoopThread
    from objfs.metrics import Metrics
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.unit.test_pagecache import FakeSource, settle

    source = FakeSource()
    version = source.put("big.bin", os.urandom(mib * MiB), bucket="bench")
    loop = EventLoopThread().start()
    metrics = Metrics()
    cache = PageCache(Path(directory), SourceChain([source], metrics=metrics), loop,
                      metrics=metrics, capacity_bytes=2 * mib * MiB, background=False)
    cache.read(version, 0, version.size)
    settle(cache)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    membership = StaticMembership(f"127.0.0.1:{port}", [])
    settings = PeerSettings(zero_copy=zero_copy)
    server = PeerServer(cache, bucket="bench", prefix="", secret=SECRET,
                        listen=("127.0.0.1", port), membership=membership,
                        tracker=PeerTracker(membership.self_id, metrics, settings),
                        metrics=metrics, settings=settings)
    loop.run(server.start())
    print(f"ready {port} {version.etag}", flush=True)
    sys.stdin.read()
    loop.run(server.stop())
    asyncio.set_event_loop(None)
    cache.close()
    loop.stop()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ask(port: int, etag: str, mib: int) -> int:
    from objfs.cache.pages import ObjectVersion
    from objfs.cache.peer import PAGES_PATH, encode_query, version_query
    from objfs.cluster import sign
    version = ObjectVersion("bench", "big.bin", etag, mib * MiB)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    total = 0
    try:
        for first in range(0, mib, 8):
            path = PAGES_PATH + "?" + encode_query(
                [*version_query(version), ("first", str(first)),
                 ("count", str(min(8, mib - first)))])
            conn.request("GET", path, headers=sign(SECRET, "GET", path))
            resp = conn.getresponse()
            if resp.status != 200:
                raise SystemExit(f"HTTP {resp.status}: {resp.read()[:200]!r}")
            while chunk := resp.read(1 << 20):
                total += len(chunk)
    finally:
        conn.close()
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--owner", choices=("sendfile", "copy"))
    p.add_argument("--dir")
    a = p.parse_args()
    if a.owner:
        owner(a.mib, a.owner == "sendfile", a.dir)
        return
    for mode in ("sendfile", "copy"):
        with tempfile.TemporaryDirectory(prefix="peer-serve-cpu-") as d:
            proc = subprocess.Popen([sys.executable, __file__, "--owner", mode, "--mib",
                                     str(a.mib), "--dir", d], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            try:
                _, port, etag = proc.stdout.readline().split()
                for r in range(1, a.rounds + 1):
                    c0, t0 = cpu_s(proc.pid), time.perf_counter()
                    got = ask(int(port), etag, a.mib)
                    secs, cpu = time.perf_counter() - t0, cpu_s(proc.pid) - c0
                    print(f"{mode:8} round {r}: {got / MiB:.0f} MiB in {secs:.2f} s = "
                          f"{got / 1e6 / secs:.0f} MB/s; owner CPU {cpu:.2f} s "
                          f"({cpu / (got / (1 << 30)):.2f} s per GiB)", flush=True)
            finally:
                proc.stdin.close()
                proc.wait(60)


if __name__ == "__main__":
    main()
