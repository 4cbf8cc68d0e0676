"""Workload ``seqread``: the 1 GiB object read sequentially by every contender, three ways.

Per contender, in one fresh mount with an empty cache dir:

- **cold**: ``sync; echo 3 > drop_caches``, the origin re-warmed (``s5cmd cat`` of the object to
  /dev/null, so SeaweedFS serves from memory), then ``fio bench/fio/seqread.fio`` (1 MiB reads);
- **warm**: kernel caches dropped again, fio again: objfs and rclone serve from their on-disk
  caches, s3fs from its ``use_cache`` file;
- **re-read**: fio once more without dropping: the kernel page cache, if the client keeps it;
- the daemon's CPU time for the cold read and its peak RSS (VmHWM) over the mount's life.

Baselines: **s5cmd** (``s5cmd cat --concurrency 16 --part-size 8`` of the object to /dev/null
after the same drop + re-warm: the origin's practical limit for a parallel download), and
**local** disk (the same bytes in a local file on the cache disk: warm = after drop_caches,
re-read = from the kernel cache). The first and last MiB and a few between are checked after
each contender's reads.
"""

from __future__ import annotations

import os

from bench.common import drop_caches, proc_cpu_s
from bench.datasets import seq_objects
from bench.report import Metric, RunRecord
from bench.workloads.base import ContenderWorkload, daemon_peak_rss, fio_run, mbps


class SeqreadWorkload(ContenderWorkload):
    name = "seqread"
    description = ("Sequential read of the 1 GiB object (fio, 1 MiB reads): cold (empty client "
                   "cache, kernel cache dropped, origin warm), warm (client's disk cache, kernel "
                   "cache dropped), re-read (kernel page cache).")
    figures = [
        Metric("cold_MBps", "cold sequential read", "MB/s", 0, summary=True),
        Metric("warm_MBps", "warm read (client disk cache; kernel cache dropped)",
               "MB/s", 0, summary=True),
        Metric("reread_MBps", "re-read (kernel page cache)", "MB/s", 0, summary=True),
        Metric("cold_cpu_s", "daemon CPU for the cold read", "s", 2),
        Metric("peak_rss_mib", "daemon peak RSS (VmHWM)", "MiB", 0, summary=True),
    ]
    baselines = ("s5cmd", "local")
    emulated_baselines = ("s5cmd",)
    emulated_skip = ("warm_MBps", "reread_MBps")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.ds = seq_objects(self.sizes.seq_size, self.sizes.seq_count)
        self.key = self.ds.key(0)
        self.local_file = ctx.data_dir / "local" / f"{self.ds.name}-obj0.bin"

    def setup_data(self) -> dict:
        info = self.ctx.origin.ensure_dataset(self.ds, self.ctx.args.repopulate)
        if not self.local_file.exists() or self.local_file.stat().st_size != self.ds.size:
            self.log(f"seqread: writing the local copy {self.local_file}")
            self.ds.write_local(0, self.local_file)
        return {"dataset": info}

    def workload_settings(self) -> dict:
        return {"object": f"{self.ds.prefix}{self.key}", "bytes": self.ds.size,
                "fio_job": "bench/fio/seqread.fio", "local_file": str(self.local_file),
                "s5cmd": "cat --concurrency 16 --part-size 8 > /dev/null"}

    def _fio(self, path, what: str) -> float:
        r = fio_run("seqread.fio", {"BENCH_FILE": str(path), "BENCH_SIZE": str(self.ds.size)},
                    self.sizes.step_timeout, what, readonly=True)
        return r["read"]["MBps"]

    def measure(self, name: str, rec: RunRecord) -> None:
        obj = self.ds.prefix + self.key
        if name == "s5cmd":
            drop_caches()
            self.ctx.origin.rewarm([obj])
            with open(os.devnull, "wb") as dn:
                _, secs = self.ctx.origin.s5cmd(
                    "cat", "--concurrency", "16", "--part-size", "8",
                    f"s3://{self.ctx.origin.bucket}/{obj}", timeout=self.sizes.step_timeout,
                    what="s5cmd cat", stdout=dn)
            rec.metrics["s5cmd.cold_MBps"] = mbps(self.ds.size, secs)
            self.log(f"  s5cmd: {rec.metrics['s5cmd.cold_MBps']:.0f} MB/s")
            return
        if name == "local":
            drop_caches()
            rec.metrics["local.warm_MBps"] = self._fio(self.local_file, "local fio")
            rec.metrics["local.reread_MBps"] = self._fio(self.local_file, "local fio re-read")
            self.log(f"  local: {rec.metrics['local.warm_MBps']:.0f} MB/s dropped, "
                     f"{rec.metrics['local.reread_MBps']:.0f} MB/s re-read")
            return
        client = self.clients[name]
        with self.mounted(client, self.ds.name, rec, name) as mnt:
            path = mnt.mp / self.key
            os.stat(path)
            drop_caches()
            self.ctx.origin.rewarm([obj])
            cpu0 = proc_cpu_s(mnt.pid)
            self.row(rec, name, "cold_MBps", lambda: self._fio(path, f"{name} cold fio"))
            if f"{name}.cold_MBps" in rec.metrics:
                rec.metrics[f"{name}.cold_cpu_s"] = proc_cpu_s(mnt.pid) - cpu0
            if not self.emulated:
                drop_caches()
                self.row(rec, name, "warm_MBps", lambda: self._fio(path, f"{name} warm fio"))
                self.row(rec, name, "reread_MBps",
                         lambda: self._fio(path, f"{name} re-read fio"))
            self.ds.verify_file(0, path)
            rss = daemon_peak_rss(mnt.pid)
            if rss is not None:
                rec.metrics[f"{name}.peak_rss_mib"] = rss
            m = rec.metrics
            self.log(f"  {name}: cold {m.get(f'{name}.cold_MBps', 0):.0f}, warm "
                     f"{m.get(f'{name}.warm_MBps', 0):.0f}, re-read "
                     f"{m.get(f'{name}.reread_MBps', 0):.0f} MB/s; CPU "
                     f"{m.get(f'{name}.cold_cpu_s', 0):.1f} s; RSS {rss or 0:.0f} MiB")
