"""Workload ``smallfiles``: read 10,000 files of 128 KiB (100 class folders of 100), cold.

Per contender, two readers, each on a fresh mount with an empty cache dir
(``bench/scripts/readfiles.py``: open, read whole in 1 MiB reads, close; the paths are known,
nothing is listed first):

- **in order**: one reader, the files in listing order (folder by folder, names sorted): a
  script or a sequential sampler walking a dataset;
- **shuffled**: 8 workers taking the files in a random order (fixed seed): a PyTorch
  DataLoader with ``num_workers=8, shuffle=True``.

The origin's data is warm (re-warmed in setup; no drop_caches here: a fresh FUSE mount starts
with an empty kernel cache anyway).

Baseline **s5cmd**: ``s5cmd run`` of one ``cp 's3://bench/<prefix>/dNNN/*' DIR/dNNN/`` per
folder into tmpfs (256 workers, its default): the origin's limit for fetching the same objects
in parallel.

Files and sizes: ``--smoke`` reads 500 files; the full run 10,000 (1.25 GiB); with the emulated
network the first 1,000 (10 folders; 200 with ``--smoke``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import (BENCH_DIR, RowFailure, StepError, errno_label, proc_cpu_s,
                          run)
from bench.datasets import small_files
from bench.report import Metric, RunRecord
from bench.workloads.base import ContenderWorkload, daemon_peak_rss, mbps

# (tag, threads, shuffle seed): one reader in listing order; a shuffled 8-worker loader
READERS = (("inorder", 1, None), ("shuffled", 8, 1))


class SmallfilesWorkload(ContenderWorkload):
    name = "smallfiles"
    description = ("Read N x 128 KiB files (10,000 in the full run) whole, cold (fresh mount, "
                   "empty cache; origin warm): one reader in listing order, then 8 workers in "
                   "shuffled order.")
    figures = [
        Metric("files_per_s", "one reader, listing order: files read per second", "files/s",
               0, summary=True),
        Metric("MBps", "one reader, listing order: read rate", "MB/s", 0),
        Metric("cpu_s", "one reader, listing order: daemon CPU", "s", 2),
        Metric("shuffled_files_per_s", "8 workers, shuffled: files read per second",
               "files/s", 0, summary=True),
        Metric("shuffled_MBps", "8 workers, shuffled: read rate", "MB/s", 0),
        Metric("shuffled_cpu_s", "8 workers, shuffled: daemon CPU", "s", 2),
        Metric("peak_rss_mib", "daemon peak RSS (VmHWM, largest of the two mounts)", "MiB", 0,
               summary=True),
    ]
    baselines = ("s5cmd",)
    full_runs = 2

    def __init__(self, ctx):
        super().__init__(ctx)
        self.ds = small_files(self.sizes.small_count, self.sizes.small_size)
        # with the emulated network (20 ms per request) the first N files only (whole folders)
        n = (min(self.sizes.emulated_small_count, self.ds.count) if self.emulated
             else self.ds.count)
        self.folders = max(1, n // self.ds.per_dir)
        self.count = min(self.ds.count, self.folders * self.ds.per_dir)
        self.keys = self.ds.keys()[:self.count]

    def setup_data(self) -> dict:
        info = self.ctx.origin.ensure_dataset(self.ds, self.ctx.args.repopulate)
        self.ctx.origin.rewarm([self.ds.prefix + "*"])
        return {"dataset": info}

    def workload_settings(self) -> dict:
        return {"dataset": self.ds.name, "files": self.count, "file_bytes": self.ds.size,
                "readers": [f"{tag}: bench/scripts/readfiles.py --threads {n}"
                            + (f" --shuffle {seed}" if seed is not None else "")
                            for tag, n, seed in READERS],
                "s5cmd": "s5cmd run FILE: one wildcard cp per folder into /dev/shm "
                         "(256 workers)"}

    def measure(self, name: str, rec: RunRecord) -> None:
        if name == "s5cmd":
            dest = Path("/dev/shm") / f"objfs-bench-small-{os.getpid()}"
            shutil.rmtree(dest, ignore_errors=True)
            cmds = self.ctx.work_dir / f"smallfiles-s5cmd-{os.getpid()}.txt"
            src = f"s3://{self.ctx.origin.bucket}/{self.ds.prefix}"
            cmds.write_text("".join(f"cp '{src}d{i:03d}/*' {dest}/d{i:03d}/\n"
                                    for i in range(self.folders)))
            try:
                _, secs = self.ctx.origin.s5cmd("run", str(cmds),
                                                timeout=self.sizes.step_timeout,
                                                what="s5cmd run (cp)",
                                                stdout=subprocess.DEVNULL)
                n = sum(len(f) for _, _, f in os.walk(dest))
            finally:
                shutil.rmtree(dest, ignore_errors=True)
                cmds.unlink(missing_ok=True)
            if n != self.count:
                raise StepError(f"s5cmd fetched {n} files, expected {self.count}")
            rec.metrics["s5cmd.files_per_s"] = n / secs
            rec.metrics["s5cmd.MBps"] = mbps(n * self.ds.size, secs)
            # the origin's limit does not depend on the order the files are wanted in
            rec.metrics["s5cmd.shuffled_files_per_s"] = rec.metrics["s5cmd.files_per_s"]
            rec.metrics["s5cmd.shuffled_MBps"] = rec.metrics["s5cmd.MBps"]
            self.log(f"  s5cmd: {n / secs:.0f} files/s, {rec.metrics['s5cmd.MBps']:.0f} MB/s")
            return
        client = self.clients[name]
        for tag, threads, seed in READERS:
            self._read_all(client, name, rec, tag, threads, seed)

    def _read_all(self, client, name: str, rec: RunRecord, tag: str, threads: int,
                  seed: int | None) -> None:
        prefix = "" if tag == "inorder" else f"{tag}_"
        with self.mounted(client, self.ds.name, rec, f"{name}-{tag}") as mnt:
            lst = mnt.mp.parent / "files.txt"
            keys = self.keys
            lst.write_text("".join(f"{mnt.mp / k}\n" for k in keys))
            cmd = [sys.executable, str(BENCH_DIR / "scripts" / "readfiles.py"),
                   "--threads", str(threads), "--list", str(lst)]
            if seed is not None:
                cmd += ["--shuffle", str(seed)]
            st0 = proc_cpu_s(mnt.pid)
            cp, _ = run(cmd, timeout=self.sizes.step_timeout, what=f"{name} readfiles ({tag})",
                        check=False)
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
            if res["bytes"] != self.count * self.ds.size:
                raise StepError(f"read {res['bytes']} bytes, expected {self.count * self.ds.size}")
            for i in (0, self.count - 1):
                self.ds.verify_file(i, mnt.mp / keys[i], samples=1)
            rec.metrics[f"{name}.{prefix}files_per_s"] = res["files_per_s"]
            rec.metrics[f"{name}.{prefix}MBps"] = res["MBps"]
            rec.metrics[f"{name}.{prefix}cpu_s"] = cpu
            rss = daemon_peak_rss(mnt.pid)
            if rss is not None:
                key = f"{name}.peak_rss_mib"
                rec.metrics[key] = max(rss, rec.metrics.get(key, 0))
            self.log(f"  {name} {tag} ({threads} reader{'s' if threads > 1 else ''}): "
                     f"{res['files_per_s']:.0f} files/s, {res['MBps']:.0f} MB/s, "
                     f"daemon CPU {cpu:.1f} s, RSS {rss or 0:.0f} MiB")
