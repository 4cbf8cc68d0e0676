"""Workload ``randread``: random reads of the 1 GiB object, 4 KiB and 128 KiB, time-bounded.

Per contender and block size: a fresh mount with an empty cache dir (the origin warm), then
``fio bench/fio/randread.fio`` for ``rand_seconds`` (20 s; 4 s with --smoke): 4 readers, each at
its own reproducible random offsets, with O_DIRECT (``direct=1``): every read reaches the
client's daemon instead of the kernel page cache. (Buffered, the kernel cache soon serves
most reads of a 1 GiB file and the figure measures how fast each client fills it; with
O_DIRECT it measures what a read costs each daemon, from its own cache or from the origin.)
The figures are fio's aggregate IOPS / MB/s and the 99th percentile completion latency. Whatever
the client fetches around each read (objfs: 1 MiB pages; rclone: 4 MiB chunks; s3fs: its
ranges) is its own business: the data cached during the run counts, as it would in real use.

Baseline **local**: the same fio job on the local copy after its pages were evicted from the
kernel cache (``posix_fadvise DONTNEED``: the disk's own random read speed on this VM).

No ``drop_caches`` here: a fresh FUSE mount starts with an empty kernel cache anyway, and the
origin's data stays in memory (re-warmed once in setup).
"""

from __future__ import annotations

import os

from bench.common import evict_file
from bench.datasets import seq_objects
from bench.report import Metric, RunRecord
from bench.workloads.base import ContenderWorkload, daemon_peak_rss, fio_run


class RandreadWorkload(ContenderWorkload):
    name = "randread"
    description = ("Random reads of the 1 GiB object, fio, 4 readers, O_DIRECT (every read "
                   "reaches the daemon), time-bounded, starting cold (empty client cache, "
                   "origin warm).")
    figures = [
        Metric("r4k_iops", "random 4 KiB reads", "IOPS", 0, summary=True),
        Metric("r4k_p99_ms", "random 4 KiB: p99 latency", "ms", 2),
        Metric("r128k_MBps", "random 128 KiB reads", "MB/s", 0, summary=True),
        Metric("r128k_p99_ms", "random 128 KiB: p99 latency", "ms", 2),
        Metric("peak_rss_mib", "daemon peak RSS (VmHWM)", "MiB", 0),
    ]
    baselines = ("local",)
    full_runs = 2
    emulated_baselines = ()

    def __init__(self, ctx):
        super().__init__(ctx)
        self.ds = seq_objects(self.sizes.seq_size, self.sizes.seq_count)
        self.key = self.ds.key(0)
        self.local_file = ctx.data_dir / "local" / f"{self.ds.name}-obj0.bin"

    def setup_data(self) -> dict:
        info = self.ctx.origin.ensure_dataset(self.ds, self.ctx.args.repopulate)
        if not self.local_file.exists() or self.local_file.stat().st_size != self.ds.size:
            self.ds.write_local(0, self.local_file)
        self.ctx.origin.rewarm([self.ds.prefix + self.key])
        return {"dataset": info}

    def workload_settings(self) -> dict:
        return {"object": f"{self.ds.prefix}{self.key}", "fio_job": "bench/fio/randread.fio",
                "runtime_s": self.sizes.rand_seconds, "readers": 4}

    def _fio(self, path, bs: str, what: str) -> dict:
        env = {"BENCH_FILE": str(path), "BENCH_SIZE": str(self.ds.size), "BENCH_BS": bs,
               "BENCH_RUNTIME": str(int(self.sizes.rand_seconds)), "BENCH_DIRECT": "1"}
        return fio_run("randread.fio", env, self.sizes.rand_seconds + self.sizes.step_timeout,
                       what, readonly=True)["read"]

    def _store(self, rec: RunRecord, name: str, bs: str, r: dict) -> None:
        if bs == "4k":
            rec.metrics[f"{name}.r4k_iops"] = r["iops"]
            rec.metrics[f"{name}.r4k_p99_ms"] = r["clat_p99_ms"]
        else:
            rec.metrics[f"{name}.r128k_MBps"] = r["MBps"]
            rec.metrics[f"{name}.r128k_p99_ms"] = r["clat_p99_ms"]
        self.log(f"  {name} {bs}: {r['iops']:.0f} IOPS, {r['MBps']:.1f} MB/s, p99 "
                 f"{r['clat_p99_ms']:.2f} ms")

    def measure(self, name: str, rec: RunRecord) -> None:
        for bs in ("4k", "128k"):
            fig = "r4k_iops" if bs == "4k" else "r128k_MBps"
            if name == "local":
                evict_file(self.local_file)
                self.row(rec, name, fig, lambda bs=bs: self._store(
                    rec, name, bs, self._fio(self.local_file, bs, f"local {bs}")))
                continue
            client = self.clients[name]
            with self.mounted(client, self.ds.name, rec, f"{name}-{bs}") as mnt:
                path = mnt.mp / self.key
                os.stat(path)
                self.row(rec, name, fig, lambda bs=bs, path=path: self._store(
                    rec, name, bs, self._fio(path, bs, f"{name} {bs}")))
                rss = daemon_peak_rss(mnt.pid)
                if rss is not None:
                    key = f"{name}.peak_rss_mib"
                    rec.metrics[key] = max(rss, rec.metrics.get(key, 0))
