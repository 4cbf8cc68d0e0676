"""Workload ``pagecache``: the figures issue 3 asks of objfs's on-disk page cache.

Per run, against the same origin:

(a) **cold** sequential read of the 1 GiB object: fresh cache dir, fresh mount; then
    ``sync; echo 3 > /proc/sys/vm/drop_caches`` and the ORIGIN re-warmed (the object read once
    through SeaweedFS with ``s5cmd cat`` to /dev/null), so the figure measures objfs and not
    SeaweedFS's disk; then ``cat FILE > /dev/null`` timed.
(b) **warm**: kernel caches dropped again, ``cat`` again: every byte from objfs's page files
    (checked: no origin bytes during the read). Compared with ``cat`` of the same bytes from a
    local file on the same disk, kernel caches dropped (the ratio warm/local is per run).
(c) **re-read**: ``cat`` once more in the same mount: the kernel page cache (``keep_cache``).
(d) **hit ratios** of ``lru`` and ``uniform``: a dataset twice the cache size (64 x 8 MiB with
    ``--cache-size 256M --cache-free-floor 0``), 3 epochs, each reading every file once in a
    fresh seeded random order (the same orders for both policies in a run), kernel caches
    dropped (and the origin re-warmed) before each epoch. Per epoch, from ``objfs stats --json``:
    hit ratio = Δread_cache_bytes / (Δread_cache_bytes + Δread_fetched_bytes), and the origin
    bytes per byte read, Δread_origin_bytes / Δfuse_read_bytes (1.0: everything came from the
    origin; 0.5: half from the cache; above 1: pages were fetched more than once). The second
    one is the honest hit figure: read_cache_bytes also counts pages that readahead fetched a
    moment before the reader asked for them.
(e) **RSS** of the daemon while reading 4 GiB (4 x 1 GiB objects, one ``cat`` after the other;
    then 4 ``cat`` at once on a fresh mount), VmRSS sampled every 0.1 s, and VmHWM.

The sampled bytes of every file read are checked against the dataset's known contents.
"""

from __future__ import annotations

import random
import subprocess
import time

from bench.common import RssSampler, StepError, drop_caches, proc_cpu_s, proc_status
from bench.datasets import MiB, epoch_files, seq_objects
from bench.mounts import ObjfsClient
from bench.report import Metric, RunRecord
from bench.workloads.base import Workload, mbps


def _epoch_metrics() -> list[Metric]:
    out = []
    for policy in ("lru", "uniform"):
        for e in (1, 2, 3):
            out.append(Metric(f"{policy}_hit_e{e}", f"{policy}: epoch {e} hit ratio "
                              "Δcache/(Δcache+Δfetched)", "ratio", 3))
        for e in (1, 2, 3):
            out.append(Metric(f"{policy}_origin_e{e}", f"{policy}: epoch {e} origin bytes per "
                              "byte read, Δread_origin_bytes/Δfuse_read_bytes (1 = all from "
                              "origin)", "ratio", 3))
        for e in (1, 2, 3):
            out.append(Metric(f"{policy}_MBps_e{e}", f"{policy}: epoch {e} read rate", "MB/s", 0))
        out.append(Metric(f"{policy}_used_max_mib", f"{policy}: largest cache_used_bytes after "
                          "an epoch", "MiB", 0))
    return out


class PagecacheWorkload(Workload):
    name = "pagecache"
    full_runs = 2
    description = ("objfs page cache (issue 3): cold / warm / kernel re-read of the 1 GiB "
                   "object vs `cat` from local disk; lru vs uniform hit ratios on a shuffled "
                   "3-epoch read of a dataset twice the cache; daemon RSS reading 4 GiB.")
    metrics = [
        Metric("cold_MBps", "cold sequential read (fresh cache; kernel cache dropped, origin "
               "re-warmed)", "MB/s", 0),
        Metric("cold_origin_MiB", "cold: bytes fetched from the origin", "MiB", 0),
        Metric("cold_cpu_s", "cold: daemon CPU (user+sys) for the read", "s"),
        Metric("warm_MBps", "warm read: objfs page files, kernel cache dropped", "MB/s", 0),
        Metric("warm_origin_MiB", "warm: bytes fetched from the origin (must be 0)", "MiB", 0),
        Metric("local_MBps", "`cat` of the same bytes from a local file, kernel cache dropped",
               "MB/s", 0),
        Metric("warm_over_local", "ratio warm objfs / local `cat`", "x", 2),
        Metric("reread_MBps", "re-read in the same mount (kernel page cache)", "MB/s", 0),
        Metric("reread_fuse_MiB", "re-read: bytes the daemon served (kernel cache hits: ~0)",
               "MiB", 0),
        Metric("local_reread_MBps", "local file re-read (kernel page cache)", "MB/s", 0),
        Metric("reread_over_local", "ratio re-read objfs / local re-read", "x", 2),
        *_epoch_metrics(),
        Metric("rss_idle_mib", "daemon VmRSS after mount, before the 4 GiB read", "MiB", 1),
        Metric("rss_seq4g_peak_mib", "daemon peak VmRSS (sampled) reading the 4 seq objects "
               "(4 x 1 GiB; smaller with --smoke), one after the other", "MiB", 1),
        Metric("rss_seq4g_hwm_mib", "daemon VmHWM after that read", "MiB", 1),
        Metric("rss_par4_peak_mib", "daemon peak VmRSS (sampled) reading the 4 objects with 4 "
               "concurrent `cat`", "MiB", 1),
        Metric("rss_par4_hwm_mib", "daemon VmHWM after the concurrent read", "MiB", 1),
    ]

    def __init__(self, ctx):
        super().__init__(ctx)
        s = self.sizes
        self.seq = seq_objects(s.seq_size, s.seq_count)
        self.epochs = epoch_files(s.epoch_files, s.epoch_file_size)
        self.client = ObjfsClient(ctx.origin.endpoint, extra_args=ctx.args.mount_arg,
                                  mount_timeout=s.step_timeout, work_dir=ctx.work_dir)
        self.local_file = ctx.data_dir / "local" / f"{self.seq.name}-obj0.bin"

    def settings(self) -> dict:
        s = self.sizes
        return {"seq_dataset": self.seq.name, "seq_object_bytes": self.seq.size,
                "seq_objects_for_rss": self.seq.count,
                "epoch_dataset": self.epochs.name, "epoch_cache_size": s.epoch_cache,
                "epochs": s.epochs, "local_file": str(self.local_file),
                "objfs": self.client.settings(),
                "reader": "cat FILE > /dev/null (GNU cat, 128 KiB reads)",
                "cold_origin_rewarm": "s5cmd cat --concurrency 8 of the object to /dev/null "
                                      "after the drop_caches (the SeaweedFS volume data back "
                                      "in the page cache)"}

    def setup(self) -> dict:
        ok, note = self.client.available()
        if not ok:
            raise StepError(note)
        info = {"seq": self.ctx.origin.ensure_dataset(self.seq, self.ctx.args.repopulate),
                "epochs": self.ctx.origin.ensure_dataset(self.epochs, self.ctx.args.repopulate)}
        if not self.local_file.exists() or self.local_file.stat().st_size != self.seq.size:
            self.log(f"pagecache: writing the local copy {self.local_file}")
            self.seq.write_local(0, self.local_file)
        return info

    # ---- one run ------------------------------------------------------------------------------

    def run_once(self, rec: RunRecord) -> None:
        self._seq(rec)
        for policy in ("lru", "uniform"):
            self._epochs(rec, policy)
        self._rss(rec)

    def _seq(self, rec: RunRecord) -> None:
        m, log, size = rec.metrics, self.log, self.seq.size
        key = self.seq.key(0)
        with self.mounted(self.client, self.seq.name, rec, "seq") as mnt:
            path = mnt.mp / key
            path.stat()  # lookup outside the timed read
            # (a) cold
            rec.extra["cold_drop_s"] = drop_caches()
            rec.extra["cold_rewarm_s"] = self.ctx.origin.rewarm([self.seq.prefix + key])
            s0, c0 = self.client.stats(mnt.mp), proc_cpu_s(mnt.pid)
            secs = self.cat([path], "cold cat")
            s1, c1 = self.client.stats(mnt.mp), proc_cpu_s(mnt.pid)
            m["cold_MBps"] = mbps(size, secs)
            m["cold_origin_MiB"] = _d(s0, s1, "read_origin_bytes") / MiB
            m["cold_cpu_s"] = c1 - c0
            log(f"  cold: {secs:.2f} s = {m['cold_MBps']:.0f} MB/s, origin "
                f"{m['cold_origin_MiB']:.0f} MiB, daemon CPU {m['cold_cpu_s']:.1f} s")
            # (b) warm
            drop_caches()
            secs = self.cat([path], "warm cat")
            s2 = self.client.stats(mnt.mp)
            m["warm_MBps"] = mbps(size, secs)
            m["warm_origin_MiB"] = _d(s1, s2, "read_origin_bytes") / MiB
            log(f"  warm: {secs:.2f} s = {m['warm_MBps']:.0f} MB/s, origin "
                f"{m['warm_origin_MiB']:.0f} MiB")
            # (c) re-read with the kernel page cache
            secs = self.cat([path], "re-read cat")
            s3 = self.client.stats(mnt.mp)
            m["reread_MBps"] = mbps(size, secs)
            m["reread_fuse_MiB"] = _d(s2, s3, "fuse_read_bytes") / MiB
            log(f"  re-read: {secs:.2f} s = {m['reread_MBps']:.0f} MB/s (daemon served "
                f"{m['reread_fuse_MiB']:.0f} MiB)")
            self.seq.verify_file(0, path)
        # local disk, same bytes, same conditions
        drop_caches()
        secs = self.cat([self.local_file], "local cat")
        m["local_MBps"] = mbps(size, secs)
        secs = self.cat([self.local_file], "local re-read")
        m["local_reread_MBps"] = mbps(size, secs)
        m["warm_over_local"] = m["warm_MBps"] / m["local_MBps"]
        m["reread_over_local"] = m["reread_MBps"] / m["local_reread_MBps"]
        log(f"  local cat: {m['local_MBps']:.0f} MB/s (warm/local {m['warm_over_local']:.2f}); "
            f"local re-read {m['local_reread_MBps']:.0f} MB/s")

    def _epochs(self, rec: RunRecord, policy: str) -> None:
        m, ds, s = rec.metrics, self.epochs, self.sizes
        args = ["--cache-size", str(s.epoch_cache), "--cache-free-floor", "0",
                "--cache-policy", policy]
        with self.mounted(self.client, ds.name, rec, f"epochs-{policy}", args) as mnt:
            paths = [mnt.mp / k for k in ds.keys()]
            for p in paths:
                p.stat()
            used_max = 0
            for e in range(1, s.epochs + 1):
                order = list(range(ds.count))
                random.Random(1000 * rec.run + e).shuffle(order)
                drop_caches()
                self.ctx.origin.rewarm([ds.prefix + "*"])
                s0 = self.client.stats(mnt.mp)
                secs = self.cat([paths[i] for i in order], f"epoch {e} cat")
                s1 = self.client.stats(mnt.mp)
                cache, fetched = _d(s0, s1, "read_cache_bytes"), _d(s0, s1, "read_fetched_bytes")
                origin, read = _d(s0, s1, "read_origin_bytes"), _d(s0, s1, "fuse_read_bytes")
                m[f"{policy}_hit_e{e}"] = cache / (cache + fetched) if cache + fetched else 0.0
                m[f"{policy}_origin_e{e}"] = origin / read if read else 0.0
                m[f"{policy}_MBps_e{e}"] = mbps(ds.total_bytes(), secs)
                used = s1.get("cache_used_bytes", 0)
                used_max = max(used_max, used)
                rec.extra[f"{policy}_e{e}"] = {
                    "order_seed": 1000 * rec.run + e, "read_cache_bytes": cache,
                    "read_fetched_bytes": fetched, "read_origin_bytes": origin,
                    "fuse_read_bytes": read, "cache_used_bytes": used,
                    "evicted_pages": _d(s0, s1, "cache_evicted_pages_total"), "secs": secs}
                self.log(f"  {policy} epoch {e}: hit {m[f'{policy}_hit_e{e}']:.3f}, origin "
                         f"bytes/read {m[f'{policy}_origin_e{e}']:.3f}, "
                         f"{m[f'{policy}_MBps_e{e}']:.0f} MB/s, cache used {used / MiB:.0f} MiB")
            for i in (0, ds.count - 1):
                ds.verify_file(i, paths[i], samples=2)
            m[f"{policy}_used_max_mib"] = used_max / MiB
            if used_max > s.epoch_cache:
                rec.extra[f"{policy}_capacity_exceeded"] = used_max
                raise StepError(f"{policy}: cache_used_bytes {used_max} > --cache-size "
                                f"{s.epoch_cache}")

    def _rss(self, rec: RunRecord) -> None:
        m, ds = rec.metrics, self.seq
        with self.mounted(self.client, ds.name, rec, "rss-seq") as mnt:
            paths = [mnt.mp / k for k in ds.keys()]
            for p in paths:
                p.stat()
            m["rss_idle_mib"] = proc_status(mnt.pid)["VmRSS"] / 1024
            with RssSampler([mnt.pid]) as smp:
                secs = self.cat(paths, "4 GiB cat")
            m["rss_seq4g_peak_mib"] = smp.peak_mib(mnt.pid)
            m["rss_seq4g_hwm_mib"] = smp.hwm_mib(mnt.pid)
            rec.extra["rss_seq4g_read_s"] = secs
            self.log(f"  RSS reading {ds.total_bytes() / MiB:.0f} MiB: idle "
                     f"{m['rss_idle_mib']:.0f} MiB, peak {m['rss_seq4g_peak_mib']:.0f} MiB, "
                     f"HWM {m['rss_seq4g_hwm_mib']:.0f} MiB ({secs:.1f} s)")
            ds.verify_file(ds.count - 1, paths[-1], samples=2)
        with self.mounted(self.client, ds.name, rec, "rss-par") as mnt:
            paths = [mnt.mp / k for k in ds.keys()]
            for p in paths:
                p.stat()
            with RssSampler([mnt.pid]) as smp:
                t0 = time.perf_counter()
                procs = [subprocess.Popen(["cat", str(p)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE) for p in paths]
                errs = []
                for p in procs:
                    try:
                        _, err = p.communicate(timeout=self.sizes.step_timeout)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        _, err = p.communicate()
                        errs.append("timeout")
                    if p.returncode:
                        errs.append(err.decode("utf-8", "replace")[-300:])
                secs = time.perf_counter() - t0
            if errs:
                raise StepError(f"concurrent cat failed: {errs}")
            m["rss_par4_peak_mib"] = smp.peak_mib(mnt.pid)
            m["rss_par4_hwm_mib"] = smp.hwm_mib(mnt.pid)
            rec.extra["rss_par4_read_s"] = secs
            self.log(f"  RSS with 4 concurrent readers: peak {m['rss_par4_peak_mib']:.0f} MiB, "
                     f"HWM {m['rss_par4_hwm_mib']:.0f} MiB ({secs:.1f} s)")


def _d(a: dict, b: dict, key: str) -> float:
    return float(b.get(key, 0)) - float(a.get(key, 0))
