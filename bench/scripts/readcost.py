#!/usr/bin/env python3
"""The daemon's own cost of a read, in-process: no kernel, no FUSE round trip, no network.

    .venv/bin/python bench/scripts/readcost.py [--iterations N] [--profile OUT.prof]

Builds a ``Filesystem`` with its page cache in a temp dir over an in-memory origin (a source
that hands back bytes), and times, in CPU microseconds per call (``time.process_time``, so
other load on the machine matters less than for wall-clock figures):

- **hit 128 KiB / hit 4 KiB**: ``FuseOperations.read`` (the adapter's per-request hook and
  the hit path the FUSE worker runs holding llfuse's lock) of READY pages whose file is open
  and in the kernel's page cache, sequential 128 KiB pieces / random 4 KiB pieces;
- **fresh 128 KiB**: the same pieces served from the in-memory window of pages just fetched;
- **cold GiB**: CPU seconds to read 1 GiB through ``Filesystem.read`` from an empty cache,
  the origin being memory (the fetch path, storing pages, handing bytes back: everything but
  the HTTP client and the kernel).

Prints one JSON line. ``--profile`` writes a cProfile of the hit loops.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from objfs.cache.pagecache import PageCache  # noqa: E402
from objfs.cache.pages import PAGE_SIZE, ObjectVersion, byte_range  # noqa: E402
from objfs.cache.sources import SourceChain  # noqa: E402
from objfs.config import MountConfig, StoreConfig  # noqa: E402
from objfs.fs import Filesystem  # noqa: E402
from objfs.loop import EventLoopThread  # noqa: E402
from objfs.metrics import Metrics  # noqa: E402
from objfs.store import ObjectInfo  # noqa: E402
from objfs.tree import MetadataTree  # noqa: E402

K128 = 128 * 1024
MiB = 1024 * 1024


class MemorySource:
    """An origin in memory: ``fetch`` slices the object's bytes (one copy, like a GET)."""

    name = "origin"

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def fetch(self, version: ObjectVersion, pages: range, **kwargs) -> bytearray:
        start, end = byte_range(version, pages)
        return bytearray(self.data[start:end])


def build(tmp: Path, data: bytes, fresh: bool) -> tuple[Filesystem, int, object]:
    loop = EventLoopThread().start()
    metrics = Metrics()
    store = StoreConfig(bucket="b", endpoint="http://127.0.0.1:1")
    config = MountConfig(store=store, mountpoint=tmp / "mnt", cache_dir=tmp / "cache",
                         read_only=True, cache_free_floor_bytes=0)
    tree = MetadataTree(tmp / "tree", prefix="", identity="bench", metrics=metrics)
    tree.refresh(iter([[ObjectInfo("obj", len(data), '"e"', 0)]]))
    chain = SourceChain([MemorySource(data)], metrics=metrics)
    cache = PageCache(tmp / "pages", chain, loop, metrics=metrics,
                      capacity_bytes=4 * len(data), background=False,
                      fresh_bytes=None if fresh else 0)
    fs = Filesystem(config, tree, cache, metrics=metrics)
    fh = fs.open(tree.resolve("obj").ino, os.O_RDONLY)
    return fs, fh, (loop, cache, tree)


def settle(cache: PageCache) -> None:
    deadline = time.monotonic() + 60
    while cache._inflight and time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> int:
    from objfs.fuse_adapter import FuseOperations

    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--cold-mib", type=int, default=1024)
    p.add_argument("--profile")
    a = p.parse_args()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        size = 64 * MiB
        data = random.Random(1).randbytes(size)
        fs, fh, (loop, cache, tree) = build(tmp / "hits", data, fresh=False)
        ops = FuseOperations(fs)
        for off in range(0, size, K128):  # fetch, store, then open every page file
            fs.read(fh, off, K128)
        settle(cache)
        for off in range(0, size, K128):
            fs.read(fh, off, K128)
        assert bytes(ops.read(fh, 3 * K128, K128)) == data[3 * K128:4 * K128]
        profiler = cProfile.Profile() if a.profile else None
        rng = random.Random(2)
        seq = [(i * K128) % size for i in range(a.iterations)]
        rnd = [rng.randrange(0, size // 4096) * 4096 for _ in range(a.iterations)]
        for name, offsets, length in (("hit_128k_us", seq, K128), ("hit_4k_us", rnd, 4096)):
            if profiler:
                profiler.enable()
            t0 = time.process_time()
            for off in offsets:
                ops.read(fh, off, length)
            out[name] = (time.process_time() - t0) / len(offsets) * 1e6
            if profiler:
                profiler.disable()
        out["hits_served_in_memory_check"] = fs.metrics.get("read_cache_hit_bytes") > 0
        loop.stop()

        fs, fh, (loop, cache, tree) = build(tmp / "fresh", data, fresh=True)
        ops = FuseOperations(fs)
        stream_pages = 16
        for off in range(0, stream_pages * PAGE_SIZE, K128):
            fs.read(fh, off, K128)
        settle(cache)
        t0 = time.process_time()
        n = 0
        for _ in range(max(1, a.iterations // (stream_pages * 8))):
            for off in range(0, stream_pages * PAGE_SIZE, K128):
                ops.read(fh, off, K128)
                n += 1
        out["fresh_128k_us"] = (time.process_time() - t0) / n * 1e6
        loop.stop()

        cold = a.cold_mib * MiB
        big = os.urandom(cold)
        fs, fh, (loop, cache, tree) = build(tmp / "cold", big, fresh=True)
        t0 = time.process_time()
        for off in range(0, cold, K128):
            fs.read(fh, off, K128)
        settle(cache)
        out["cold_GiB_cpu_s"] = (time.process_time() - t0) * (1024 / a.cold_mib)
        loop.stop()
    if a.profile:
        profiler.dump_stats(a.profile)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
