"""Workload ``smallfiles``: read 10,000 files of 128 KiB (100 class folders of 100), cold.

Per contender: a fresh mount with an empty cache dir, then ``bench/scripts/readfiles.py`` opens
and reads every file whole with 16 threads (like a data loader's workers walking its sample
index: the paths are known, nothing is listed first). The origin's data is warm (re-warmed in
setup; no drop_caches here: a fresh FUSE mount starts with an empty kernel cache anyway).

Baseline **s5cmd**: ``s5cmd cp 's3://bench/<prefix>/*' DIR`` into tmpfs (256 workers, its
default): the origin's limit for fetching the same objects in parallel.

Files and sizes: ``--smoke`` reads 500 files; the full run 10,000 (1.25 GiB).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from bench.common import (BENCH_DIR, RowFailure, StepError, errno_label, proc_cpu_s,
                          run)
from bench.datasets import small_files
from bench.report import Metric, RunRecord
from bench.workloads.base import ContenderWorkload, daemon_peak_rss, mbps

THREADS = 16


class SmallfilesWorkload(ContenderWorkload):
    name = "smallfiles"
    description = ("Read N x 128 KiB files (10,000 in the full run) whole, 16 threads, cold "
                   "(fresh mount, empty cache; origin warm).")
    figures = [
        Metric("files_per_s", "files read per second", "files/s", 0),
        Metric("MBps", "read rate", "MB/s", 0),
        Metric("cpu_s", "daemon CPU for the read", "s", 2),
        Metric("peak_rss_mib", "daemon peak RSS (VmHWM)", "MiB", 0),
    ]
    baselines = ("s5cmd",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.ds = small_files(self.sizes.small_count, self.sizes.small_size)

    def setup_data(self) -> dict:
        info = self.ctx.origin.ensure_dataset(self.ds, self.ctx.args.repopulate)
        self.ctx.origin.rewarm([self.ds.prefix + "*"])
        return {"dataset": info}

    def workload_settings(self) -> dict:
        return {"dataset": self.ds.name, "files": self.ds.count, "file_bytes": self.ds.size,
                "reader": f"bench/scripts/readfiles.py --threads {THREADS}",
                "s5cmd": "cp 's3://bench/PREFIX/*' /dev/shm/DIR/ (256 workers)"}

    def measure(self, name: str, rec: RunRecord) -> None:
        if name == "s5cmd":
            dest = Path("/dev/shm") / f"objfs-bench-small-{os.getpid()}"
            shutil.rmtree(dest, ignore_errors=True)
            try:
                _, secs = self.ctx.origin.s5cmd(
                    "cp", f"s3://{self.ctx.origin.bucket}/{self.ds.prefix}*", f"{dest}/",
                    timeout=self.sizes.step_timeout, what="s5cmd cp")
                n = sum(len(f) for _, _, f in os.walk(dest))
            finally:
                shutil.rmtree(dest, ignore_errors=True)
            if n != self.ds.count:
                raise StepError(f"s5cmd fetched {n} files, expected {self.ds.count}")
            rec.metrics["s5cmd.files_per_s"] = n / secs
            rec.metrics["s5cmd.MBps"] = mbps(self.ds.total_bytes(), secs)
            self.log(f"  s5cmd: {n / secs:.0f} files/s, {rec.metrics['s5cmd.MBps']:.0f} MB/s")
            return
        client = self.clients[name]
        with self.mounted(client, self.ds.name, rec, name) as mnt:
            lst = mnt.mp.parent / "files.txt"
            keys = self.ds.keys()
            lst.write_text("".join(f"{mnt.mp / k}\n" for k in keys))
            st0 = proc_cpu_s(mnt.pid)
            cp, _ = run([sys.executable, str(BENCH_DIR / "scripts" / "readfiles.py"),
                         "--threads", str(THREADS), "--list", str(lst)],
                        timeout=self.sizes.step_timeout, what=f"{name} readfiles", check=False)
            cpu = proc_cpu_s(mnt.pid) - st0
            out = (cp.stdout or b"").decode()
            try:
                res = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise StepError(f"readfiles printed no result: {out[-500:]} "
                                f"{(cp.stderr or b'').decode()[-500:]}") from None
            if res["failed"]:
                label = errno_label(" ".join(res["errors"]))
                raise RowFailure(f"failed: {label}" if label else "failed",
                                 f"{res['failed']} files failed: {res['errors']}")
            if res["bytes"] != self.ds.total_bytes():
                raise StepError(f"read {res['bytes']} bytes, expected {self.ds.total_bytes()}")
            for i in (0, self.ds.count - 1):
                self.ds.verify_file(i, mnt.mp / keys[i], samples=1)
            rec.metrics[f"{name}.files_per_s"] = res["files_per_s"]
            rec.metrics[f"{name}.MBps"] = res["MBps"]
            rec.metrics[f"{name}.cpu_s"] = cpu
            rss = daemon_peak_rss(mnt.pid)
            if rss is not None:
                rec.metrics[f"{name}.peak_rss_mib"] = rss
            self.log(f"  {name}: {res['files_per_s']:.0f} files/s, {res['MBps']:.0f} MB/s, "
                     f"daemon CPU {cpu:.1f} s, RSS {rss or 0:.0f} MiB")
