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
    emulated_small_count: int = 1000  # the first 1,000 of them with the emulated network
    write_size: int = 2 * GiB      # the checkpoint
    rand_seconds: float = 10       # each fio random-read job
    listing_objects: int = 100_000
    step_timeout: float = 900      # any single measured step

    @classmethod
    def smoke(cls) -> "Sizes":
        return cls(seq_size=128 * MiB, seq_count=4, epoch_files=16, epoch_cache=64 * MiB,
                   small_count=500, emulated_small_count=200, write_size=128 * MiB,
                   rand_seconds=4,
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
    modes: tuple[str, ...] = ("loopback",)  # network modes it can run in
    default_modes: tuple[str, ...] = ("loopback",)  # ... and runs in when all workloads run
    full_runs = 3  # runs in the loopback mode unless --runs says otherwise

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


# --------------------------------------------------------------------------------------------
# contender workloads: the same figures for every client, side by side, ratios per run

BASELINES = ("s5cmd", "local", "boto3")


class ContenderWorkload(Workload):
    """A workload measured for each contender (objfs, s3fs, rclone) plus baselines (s5cmd, local
    disk...) in the same run. Subclasses set ``figures`` (per-contender Metrics),
    ``baselines`` (which baseline columns they measure) and implement ``measure(name, rec)``,
    which stores ``rec.metrics[f"{name}.{figure}"]``.

    The contenders take turns in a rotating order (run 1: objfs first, run 2: the second one
    first...), so slow drift of the machine does not always favour the same one. A failure of
    one contender marks its figures in that run (``failed: EROFS``, ``timeout``...) and the others
    go on. After the run, ``objfs/<peer>.<figure>`` ratios are computed from that run's values."""

    figures: list = []
    baselines: tuple[str, ...] = ()
    base = "objfs"
    modes = ("loopback", "emulated")
    default_modes = ("loopback", "emulated")
    # In the emulated mode, baselines that do not touch the network (local disk) and figures
    # that do not depend on it (warm reads from the client's disk, kernel re-reads) are left
    # out: they would repeat the loopback figures.
    emulated_baselines: tuple[str, ...] | None = None
    emulated_skip: tuple[str, ...] = ()

    def __init__(self, ctx):
        super().__init__(ctx)
        from bench.mounts import CONTENDERS
        self.clients = {}
        for name in ctx.contenders:
            cls = CONTENDERS[name]
            self.clients[name] = cls(ctx.origin.endpoint,
                                     extra_args=ctx.args.mount_arg if name == "objfs" else [],
                                     mount_timeout=self.sizes.step_timeout,
                                     umount_timeout=self.sizes.step_timeout,
                                     work_dir=ctx.work_dir)
        self.unavailable: dict[str, str] = {}
        self.emulated = ctx.mode == "emulated"
        if self.emulated:
            if self.emulated_baselines is not None:
                self.baselines = self.emulated_baselines
            self.figures = [f for f in self.figures if f.key not in self.emulated_skip]
        self.columns = [*self.clients, *self.baselines]
        self.peers = [c for c in self.columns if c != self.base and self.base in self.clients]
        self.metrics = self._expand()

    def _expand(self) -> list:
        from bench.report import Metric
        out = []
        for c in self.columns:
            for f in self.figures:
                out.append(Metric(f"{c}.{f.key}", f"{c}: {f.label}", f.unit, f.digits))
        for p in self.peers:
            for f in self.figures:
                out.append(Metric(f"{self.base}/{p}.{f.key}", f"{self.base}/{p}: {f.label}",
                                  "x", 2))
        return out

    def matrix(self) -> dict:
        return {"figures": self.figures, "columns": self.columns, "base": self.base,
                "peers": self.peers}

    def setup(self) -> dict:
        info = {}
        for name, client in self.clients.items():
            ok, note = client.available()
            if not ok:
                self.unavailable[name] = note
                self.log(f"{self.name}: {name} unavailable: {note}")
            info[f"{name}_version"] = client.version() if ok else f"unavailable: {note}"
        info.update(self.setup_data())
        return info

    def setup_data(self) -> dict:
        return {}

    def settings(self) -> dict:
        return {"contenders": {n: c.settings() for n, c in self.clients.items()},
                "baselines": list(self.baselines), **self.workload_settings()}

    def workload_settings(self) -> dict:
        return {}

    def run_once(self, rec: RunRecord) -> None:
        k = (rec.run - 1) % max(1, len(self.columns))
        order = self.columns[k:] + self.columns[:k]
        rec.extra["order"] = order
        for name in order:
            if name in self.unavailable:
                self._fail_all(rec, name, "unavailable")
                continue
            self.log(f" -- {self.name}: {name}")
            try:
                self.measure(name, rec)
            except RowFailure as e:
                self._fail_all(rec, name, e.label, str(e))
            except StepError as e:
                label = e.status if e.status != "failed" else "failed"
                errno_name = errno_label(str(e))
                if errno_name:
                    label = f"{label}: {errno_name}"
                self._fail_all(rec, name, label, str(e))
                self.log(f"  {name}: {label}: {str(e)[:300]}")
        for p in self.peers:
            for f in self.figures:
                a, b = rec.metrics.get(f"{self.base}.{f.key}"), rec.metrics.get(f"{p}.{f.key}")
                if a is not None and b:
                    rec.metrics[f"{self.base}/{p}.{f.key}"] = a / b

    def _fail_all(self, rec: RunRecord, name: str, label: str, detail: str = "") -> None:
        """Mark every figure of ``name`` not measured in this run as failed with ``label``."""
        for f in self.figures:
            key = f"{name}.{f.key}"
            if key not in rec.metrics:
                rec.extra.setdefault("row_failures", {}).setdefault(key, label)
        if detail:
            rec.extra.setdefault("row_errors", {})[name] = detail[-1500:]

    def measure(self, name: str, rec: RunRecord) -> None:
        raise NotImplementedError

    def row(self, rec: RunRecord, name: str, figure: str, fn) -> None:
        """Measure one figure; a RowFailure marks just that figure."""
        try:
            v = fn()
        except RowFailure as e:
            key = f"{name}.{figure}"
            rec.extra.setdefault("row_failures", {})[key] = e.label
            rec.extra.setdefault("row_errors", {})[key] = str(e)[-1500:]
            self.log(f"  {name} {figure}: {e.label}")
            return
        if v is not None:
            rec.metrics[f"{name}.{figure}"] = v


def daemon_peak_rss(pid: int) -> float | None:
    """VmHWM (MiB) of a live daemon: the peak RSS over its life so far."""
    from bench.common import proc_status
    try:
        return proc_status(pid)["VmHWM"] / 1024
    except OSError:
        return None


def fio_run(job: str, env: dict, timeout: float, what: str, readonly: bool = False) -> dict:
    """Run ``fio --output-format=json bench/fio/<job>`` with ``env`` (BENCH_FILE...). Returns
    the (group-reported) job's figures: ``read``/``write`` each with bytes, MBps, iops,
    clat_p50_ms, clat_p99_ms; ``runtime_s``. A failed job raises RowFailure naming the errno
    (``failed: EROFS``)."""
    import json as _json
    from bench.common import BENCH_DIR
    cmd = ["fio", "--output-format=json", *(["--readonly"] if readonly else []),
           str(BENCH_DIR / "fio" / job)]
    try:
        cp, secs = run(cmd, timeout=timeout, what=what, env={**os.environ, **env}, check=False)
    except StepError as e:  # a timeout
        raise RowFailure(e.status, str(e)) from None
    out = (cp.stdout or b"").decode("utf-8", "replace")
    err = (cp.stderr or b"").decode("utf-8", "replace")
    data = None
    if "{" in out:
        try:
            data = _json.loads(out[out.index("{"):])
        except ValueError:
            data = None
    job_err = 0
    if data and data.get("jobs"):
        job_err = max(int(j.get("error", 0)) for j in data["jobs"])
    if cp.returncode != 0 or job_err or not data or not data.get("jobs"):
        text = f"err={job_err} {err} {out[:400] if not data else ''}" if job_err else err + out
        label = errno_label(text)
        raise RowFailure(f"failed: {label}" if label else "failed",
                         f"{what}: fio exit {cp.returncode}: {text.strip()[-1200:]}")
    j = data["jobs"][0]
    res = {"runtime_s": secs}
    for d in ("read", "write"):
        x = j.get(d) or {}
        if not x.get("io_bytes"):
            continue
        pct = (x.get("clat_ns") or {}).get("percentile") or {}
        res[d] = {"bytes": x["io_bytes"], "MBps": x["bw_bytes"] / 1e6, "iops": x["iops"],
                  "runtime_s": x.get("runtime", 0) / 1000,
                  "clat_p50_ms": pct.get("50.000000", 0) / 1e6,
                  "clat_p99_ms": pct.get("99.000000", 0) / 1e6}
    sync = j.get("sync") or {}
    if sync:
        res["sync_total_ns"] = sync.get("total_ios")
    return res
