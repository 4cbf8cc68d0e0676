"""Workload ``write``: a 2 GiB checkpoint written sequentially, fsync on close.

Per contender, in a fresh mount of ``s3://bench/write-v1/`` with an empty cache dir:

- ``dd if=SRC of=MP/ckpt.bin bs=1M conv=fsync`` (SRC: 2 GiB of random bytes in tmpfs, made
  once), timed until dd exits (write + fsync + close);
- then the origin is polled (HEAD every 50 ms) until the object exists with the full size:
  "until at origin" is when another host could read the checkpoint (s3fs uploads inside
  fsync/close; rclone after close, in the background; objfs on close);
- ``fio bench/fio/seqwrite.fio`` (1 MiB writes, ``end_fsync=1``), timed and polled the same way;
- the first and last MiB of the dd object are fetched from the origin and compared;
- the objects are deleted afterwards (outside the timing).

A client that cannot write (objfs before checkpoint writes land: every create fails with
EROFS) gets ``failed: EROFS`` in its cells, named from the errno that dd/fio report, and the
run goes on: the rows fill in by themselves once writes work.

Baselines: **s5cmd** ``cp --concurrency 8 --part-size 8`` of SRC (the origin's upload limit:
parallel multipart); **local** dd/fio to a file on the cache disk.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import RowFailure, StepError, errno_label, run
from bench.datasets import BlobDataset, MiB
from bench.report import Metric, RunRecord
from bench.workloads.base import ContenderWorkload, daemon_peak_rss, fio_run, mbps

PREFIX = "write-v1"


class WriteWorkload(ContenderWorkload):
    name = "write"
    description = ("Sequential write of a checkpoint (2 GiB in the full run), fsync on close: "
                   "`dd bs=1M conv=fsync` and fio; rate until the writer returned, and until "
                   "the whole object is at the origin.")
    figures = [
        Metric("dd_MBps", "dd conv=fsync: until dd returned", "MB/s", 0, summary=True),
        Metric("dd_origin_MBps", "dd: until the object is complete at the origin",
               "MB/s", 0, summary=True),
        Metric("fio_MBps", "fio end_fsync: until fio returned", "MB/s", 0),
        Metric("fio_origin_MBps", "fio: until the object is complete at the origin",
               "MB/s", 0, summary=True),
        Metric("peak_rss_mib", "daemon peak RSS (VmHWM)", "MiB", 0, summary=True),
    ]
    baselines = ("s5cmd", "local")
    emulated_baselines = ("s5cmd",)
    emulated_skip = ("fio_MBps", "fio_origin_MBps")  # dd only: uploads at 50 MB/s per stream
    full_runs = 2

    def __init__(self, ctx):
        super().__init__(ctx)
        self.size = self.sizes.write_size
        self.src_ds = BlobDataset("ckpt-v1", 1, self.size)
        self.src = Path("/dev/shm") / f"objfs-bench-ckpt-{self.size}.bin"
        self.local_dir = ctx.data_dir / "local" / "write"

    def setup_data(self) -> dict:
        if not self.src.exists() or self.src.stat().st_size != self.size:
            self.log(f"write: making {self.size / MiB:.0f} MiB of checkpoint bytes in {self.src}")
            self.src_ds.write_local(0, self.src)
        s3 = self.ctx.origin.client()
        s3.put_object(Bucket=self.ctx.origin.bucket, Key=f"{PREFIX}/README.txt",
                      Body=b"objfs bench: checkpoints are written here and deleted\n")
        return {"source": str(self.src), "bytes": self.size}

    def teardown(self) -> None:
        try:
            self.src.unlink()
        except OSError:
            pass

    def workload_settings(self) -> dict:
        return {"bytes": self.size, "prefix": PREFIX, "dd": "bs=1M conv=fsync",
                "fio_job": "bench/fio/seqwrite.fio",
                "s5cmd": "cp --concurrency 8 --part-size 8", "origin_poll_s": 0.05}

    # ---- steps ------------------------------------------------------------------------------

    def _dd(self, dest: Path) -> float:
        try:
            _, secs = run(["dd", f"if={self.src}", f"of={dest}", "bs=1M", "conv=fsync"],
                          timeout=self.sizes.step_timeout, what=f"dd to {dest}")
        except StepError as e:
            label = errno_label(str(e))
            if e.status == "timeout":
                raise RowFailure("timeout", str(e)) from None
            raise RowFailure(f"failed: {label}" if label else "failed", str(e)) from None
        if os.stat(dest).st_size != self.size:
            raise RowFailure("failed: short file", f"{dest}: {os.stat(dest).st_size} bytes")
        return secs

    def _fio(self, dest: Path) -> float:
        t0 = time.perf_counter()
        fio_run("seqwrite.fio", {"BENCH_FILE": str(dest), "BENCH_SIZE": str(self.size)},
                self.sizes.step_timeout, f"fio write {dest}")
        return time.perf_counter() - t0

    def _wait_origin(self, key: str, t_start: float) -> float:
        """Seconds from ``t_start`` until ``key`` is at the origin with the full size."""
        s3 = self.ctx.origin.client()
        deadline = time.perf_counter() + self.sizes.step_timeout
        while True:
            try:
                h = s3.head_object(Bucket=self.ctx.origin.bucket, Key=key)
                if h["ContentLength"] == self.size:
                    return time.perf_counter() - t_start
            except Exception:  # noqa: BLE001 - 404 until it lands
                pass
            if time.perf_counter() > deadline:
                raise RowFailure("timeout", f"{key} not complete at the origin after "
                                            f"{self.sizes.step_timeout:.0f} s")
            time.sleep(0.05)

    def _check_origin(self, key: str) -> None:
        s3 = self.ctx.origin.client()
        last = (self.size - 1) // MiB
        for j in (0, last):
            lo = j * MiB
            body = s3.get_object(Bucket=self.ctx.origin.bucket, Key=key,
                                 Range=f"bytes={lo}-{min(lo + MiB, self.size) - 1}")["Body"].read()
            if body != self.src_ds.block(0, j):
                raise StepError(f"{key}: MiB {j} at the origin differs from what was written")

    def _delete(self, *keys: str) -> None:
        s3 = self.ctx.origin.client()
        for k in keys:
            try:
                s3.delete_object(Bucket=self.ctx.origin.bucket, Key=k)
            except Exception:  # noqa: BLE001
                pass

    # ---- per contender ----------------------------------------------------------------------

    def measure(self, name: str, rec: RunRecord) -> None:
        m = rec.metrics
        tag = f"{name}-run{rec.run}-{os.getpid()}"
        if name == "s5cmd":
            key = f"{PREFIX}/ckpt-{tag}.bin"
            try:
                _, secs = self.ctx.origin.s5cmd(
                    "cp", "--concurrency", "8", "--part-size", "8", str(self.src),
                    f"s3://{self.ctx.origin.bucket}/{key}", timeout=self.sizes.step_timeout,
                    what="s5cmd cp upload")
                m["s5cmd.dd_origin_MBps"] = mbps(self.size, secs)
                self._check_origin(key)
            finally:
                self._delete(key)
            self.log(f"  s5cmd upload: {m['s5cmd.dd_origin_MBps']:.0f} MB/s")
            return
        if name == "local":
            self.local_dir.mkdir(parents=True, exist_ok=True)
            for fig, fn in (("dd_MBps", self._dd), ("fio_MBps", self._fio)):
                dest = self.local_dir / f"ckpt-{fig}.bin"
                try:
                    self.row(rec, name, fig, lambda fn=fn, dest=dest: mbps(self.size, fn(dest)))
                finally:
                    dest.unlink(missing_ok=True)
            self.log(f"  local: dd {m.get('local.dd_MBps', 0):.0f} MB/s, fio "
                     f"{m.get('local.fio_MBps', 0):.0f} MB/s")
            return
        client = self.clients[name]
        keys = []
        tools = (("dd", self._dd),) if self.emulated else (("dd", self._dd), ("fio", self._fio))
        with self.mounted(client, PREFIX, rec, name) as mnt:
            try:
                for tool, fn in tools:
                    fname = f"ckpt-{tag}-{tool}.bin"
                    key = f"{PREFIX}/{fname}"
                    keys.append(key)
                    t0 = time.perf_counter()
                    try:
                        secs = fn(mnt.mp / fname)
                        m[f"{name}.{tool}_MBps"] = mbps(self.size, secs)
                        m[f"{name}.{tool}_origin_MBps"] = mbps(
                            self.size, self._wait_origin(key, t0))
                    except RowFailure as e:
                        for fig in (f"{tool}_MBps", f"{tool}_origin_MBps"):
                            rec.extra.setdefault("row_failures", {})[f"{name}.{fig}"] = e.label
                        rec.extra.setdefault("row_errors", {})[f"{name}.{tool}"] = str(e)[-800:]
                        self.log(f"  {name} {tool}: {e.label}")
                        continue
                    if tool == "dd":
                        self._check_origin(key)
                    self.log(f"  {name} {tool}: {m[f'{name}.{tool}_MBps']:.0f} MB/s until it "
                             f"returned, {m[f'{name}.{tool}_origin_MBps']:.0f} MB/s until at "
                             "the origin")
                rss = daemon_peak_rss(mnt.pid)
                if rss is not None:
                    m[f"{name}.peak_rss_mib"] = rss
            finally:
                self._delete(*keys)
