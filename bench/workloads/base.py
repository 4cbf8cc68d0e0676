"""What every workload shares: sizes (full or smoke), per-run directories, a mount context
that always cleans up, timed ``cat``, and row failures that do not end the run."""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import RowFailure, StepError, errno_label, now_stamp, run
from bench.datasets import GiB, MiB
from bench.mounts import FuseClient, Mounted, is_fuse_mounted
from bench.report import RunRecord


@dataclass(frozen=True)
class Sizes:
    """Dataset and step sizes. ``full`` is what the issues ask for; ``smoke`` finishes the whole
    harness in a few minutes (same code paths, small numbers)."""

    seq_size: int = GiB            # "the 1 GiB object"
    seq_count: int = 4             # 4 x 1 GiB: the RSS read of 4 GiB
    epoch_files: int = 64          # 64 x 8 MiB = 512 MiB dataset ...
    epoch_file_size: int = 8 * MiB
    epoch_cache: int = 256 * MiB   # ... with a cache of half of it
    epochs: int = 3
    small_count: int = 10_000      # 10,000 x 128 KiB files
    small_size: int = 128 * 1024
    write_size: int = 2 * GiB      # the checkpoint
    rand_seconds: float = 20       # each fio random-read job
    listing_objects: int = 100_000
    step_timeout: float = 900      # any single measured step

    @classmethod
    def smoke(cls) -> "Sizes":
        return cls(seq_size=128 * MiB, seq_count=4, epoch_files=16, epoch_cache=64 * MiB,
                   small_count=500, write_size=128 * MiB, rand_seconds=4,
                   listing_objects=2000, step_timeout=300)

    def to_json(self) -> dict:
        return asdict(self)


def mbps(nbytes: int, secs: float) -> float:
    """Decimal MB/s (10^6 bytes per second), as dd and fio print."""
    return nbytes / 1e6 / secs if secs > 0 else float("nan")


class Workload:
    name = "?"
    description = ""
    metrics: list = []

    def __init__(self, ctx):
        self.ctx = ctx
        self.sizes: Sizes = ctx.sizes
        self.log = ctx.log

    def settings(self) -> dict:
        return {}

    def setup(self) -> dict:
        return {}

    def teardown(self) -> None:
        pass

    # ---- helpers ----------------------------------------------------------------------------

    def new_run_dir(self, rec: RunRecord, tag: str) -> Path:
        d = self.ctx.work_dir / f"{self.name}-{now_stamp()}-run{rec.run}-{tag}"
        d.mkdir(parents=True, exist_ok=False)
        return d

    @contextmanager
    def mounted(self, client: FuseClient, prefix: str, rec: RunRecord, tag: str,
                extra_args: list[str] = (), cache_dir: Path | None = None):
        """Mount ``prefix`` of the bench bucket with ``client`` in a fresh run dir; always
        unmount and clean up. The run dir (cache, logs) is removed afterwards unless the
        block failed or --keep-run-dirs."""
        run_dir = self.new_run_dir(rec, tag)
        mp, log_path = run_dir / "mnt", run_dir / f"{client.name}.log"
        cache = cache_dir or run_dir / "cache"
        ok = False
        try:
            m = client.mount(self.ctx.origin.bucket, prefix, mp, cache, log_path, extra_args)
            self.log(f"  {tag}: {client.name} mounted in {m.mount_s:.2f} s (pid {m.pid})")
            yield m
            ok = True
        finally:
            notes = client.cleanup(mp, log=self.log)
            if notes:
                rec.extra.setdefault("cleanup", []).extend(notes)
            if is_fuse_mounted(mp):
                rec.extra.setdefault("left_mounted", []).append(str(mp))
                self.log(f"  WARNING: {mp} is still mounted after cleanup")
            elif ok and not notes and not self.ctx.args.keep_run_dirs:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                rec.extra.setdefault("kept_run_dirs", []).append(str(run_dir))
                if notes:
                    self.log(f"  kept {run_dir} (cleanup needed force: see its logs)")

    def umount(self, m: Mounted) -> float:
        return m.client.umount(m.mp, m.log_path)

    def remount(self, m: Mounted, prefix: str, extra_args: list[str] = ()) -> Mounted:
        """Unmount and mount again with the same cache dir (a daemon restart)."""
        self.umount(m)
        m2 = m.client.mount(self.ctx.origin.bucket, prefix, m.mp, m.cache_dir, m.log_path,
                            extra_args)
        self.log(f"  remount: {m.client.name} in {m2.mount_s:.2f} s (pid {m2.pid})")
        return m2

    def cat(self, paths: list, what: str = "cat") -> float:
        """``cat PATHS > /dev/null``; returns seconds. A failure names its errno."""
        with open(os.devnull, "wb") as devnull:
            try:
                _, secs = run(["cat", *map(str, paths)], timeout=self.sizes.step_timeout,
                              what=what, stdout=devnull)
            except StepError as e:
                label = errno_label(str(e))
                if label:
                    raise RowFailure(f"failed: {label}", str(e)[-500:]) from None
                raise
        return secs


def record_row(rec: RunRecord, key: str, fn):
    """Run ``fn()`` for one figure (or a group); a RowFailure marks ``key`` failed in this run
    (shown in its cell) instead of failing the whole run."""
    try:
        return fn()
    except RowFailure as e:
        rec.extra.setdefault("row_failures", {})[key] = e.label
        rec.extra.setdefault("row_errors", {})[key] = str(e)[-1500:]
        return None


def wait_until(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
