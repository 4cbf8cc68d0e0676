"""Workload ``listing``: how long until a big prefix is browsable, cold and after a remount.

Per run, in this order and against the same origin:
  (a) boto3 flat listing: ListObjectsV2 paginator without delimiter over the prefix;
  (b) cold: ``objfs mount`` with a fresh empty cache dir (seconds until the command returns:
      the daemon lists the prefix flat and builds its LMDB tree before it returns), then
      ``find MOUNTPOINT`` (line count must equal 1 root + directories + objects);
  (c) ``objfs umount``; ``objfs mount`` again with the same cache dir (returns at once with the
      stored tree, refreshing in the background), ``find`` again (same count check);
  (d) daemon VmRSS / VmHWM / CPU seconds, read from /proc after each find.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.common import StepError, now_stamp
from bench.mounts import ObjfsClient, daemon_stats, find_count, is_fuse_mounted
from bench.origin import BUCKET, Dataset
from bench.report import Metric, RunRecord


class ListingWorkload:
    name = "listing"
    description = ("Flat listing of a prefix of small objects: raw boto3 paginator vs. objfs "
                   "cold mount + `find`, and remount (same cache dir) + `find`.")
    metrics = [
        Metric("boto3_list_s", "boto3 flat listing (list_objects_v2, no delimiter)", "s"),
        Metric("boto3_objects_per_s", "boto3 listing rate", "objects/s", 0),
        Metric("cold_mount_s", "cold: `objfs mount` until it returns (empty cache dir)", "s"),
        Metric("cold_find_s", "cold: `find MOUNTPOINT` after the mount", "s"),
        Metric("cold_total_s", "cold total = mount + find", "s"),
        Metric("umount_s", "`objfs umount` (waits for the daemon to exit)", "s"),
        Metric("remount_mount_s", "remount: `objfs mount`, same cache dir", "s"),
        Metric("remount_find_s", "remount: `find MOUNTPOINT`", "s"),
        Metric("remount_total_s", "remount total = mount + find", "s"),
        Metric("cold_over_boto3", "ratio cold total / boto3 listing", "x"),
        Metric("cold_mount_over_boto3", "ratio cold mount alone / boto3 listing", "x"),
        Metric("remount_over_boto3", "ratio remount total / boto3 listing", "x"),
        Metric("cold_over_remount", "ratio cold total / remount total", "x"),
        Metric("cold_rss_mib", "daemon VmRSS after cold find", "MiB", 1),
        Metric("cold_hwm_mib", "daemon VmHWM (peak RSS) after cold find", "MiB", 1),
        Metric("cold_cpu_s", "daemon CPU (user+sys) for cold mount + find", "s"),
        Metric("remount_rss_mib", "daemon VmRSS after remount find", "MiB", 1),
        Metric("remount_hwm_mib", "daemon VmHWM (peak RSS) after remount find", "MiB", 1),
        Metric("remount_cpu_s", "daemon CPU (user+sys) for remount + find", "s"),
    ]

    def __init__(self, ctx):
        self.ctx = ctx
        self.ds = Dataset(objects=ctx.args.objects)
        self.client = ObjfsClient(ctx.origin.endpoint, extra_args=ctx.args.mount_arg,
                                  mount_timeout=ctx.args.timeout,
                                  umount_timeout=min(ctx.args.timeout, 300))
        self.expected_lines = 0
        self.objfs_ok = False
        self.objfs_note = ""

    def settings(self) -> dict:
        return {
            "objects": self.ds.objects,
            "dataset": self.ds.name,
            "url": self.url,
            "layout": "per 1000 objects: dNNN/ 600 files, dNNN/s0..s2/ 100 each, "
                      "dNNN/n/deep/x0..x3/ 25 each; sizes 0-1024 B",
            "expected_find_lines": self.expected_lines,
            "objfs_cli": self.client.exe,
            "objfs_mount_extra_args": self.client.extra_args,
            "timeout_s": self.ctx.args.timeout,
            "boto3_page_size": 1000,
        }

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/{self.ds.name}"

    def setup(self) -> dict:
        info = self.ctx.origin.ensure_dataset(self.ds, repopulate=self.ctx.args.repopulate)
        self.expected_lines = self.ds.expected_find_lines()
        info["expected_find_lines"] = self.expected_lines
        self.objfs_ok, self.objfs_note = self.client.available()
        if not self.objfs_ok:
            self.ctx.log(f"listing: objfs unavailable, only the boto3 part will run: "
                         f"{self.objfs_note}")
        return info

    def run_once(self, rec: RunRecord) -> None:
        m = rec.metrics
        log = self.ctx.log
        # (a) raw listing; the client is built outside the timed part
        s3 = self.ctx.origin.client()
        n, pages, secs = self.ctx.origin.list_flat(self.ds.prefix, s3)
        rec.extra["boto3_objects"] = n
        rec.extra["boto3_pages"] = pages
        if n != self.ds.objects:
            rec.extra["boto3_list_s_unverified"] = secs
            raise StepError(f"boto3 listed {n} objects, expected {self.ds.objects}")
        m["boto3_list_s"] = secs
        m["boto3_objects_per_s"] = n / secs
        log(f"  (a) boto3 listing: {n} objects, {pages} pages, {secs:.2f} s")

        if not self.objfs_ok:
            raise StepError(f"objfs not runnable: {self.objfs_note[-800:]}")

        run_dir = self.ctx.work_dir / f"listing-{now_stamp()}-run{rec.run}"
        cache, mp, mlog = run_dir / "cache", run_dir / "mnt", run_dir / "objfs-cli.log"
        cache.mkdir(parents=True)
        rec.extra["run_dir"] = str(run_dir)
        ok = False
        try:
            # (b) cold
            mnt = self.client.mount(BUCKET, self.ds.name, mp, cache, mlog)
            secs, pid = mnt.mount_s, mnt.pid
            rec.extra["cold_pid"] = pid
            m["cold_mount_s"] = secs
            log(f"  (b) cold mount: {secs:.2f} s (daemon pid {pid})")
            fsecs = self._find(mp, rec, "cold")
            m["cold_find_s"] = fsecs
            m["cold_total_s"] = secs + fsecs
            self._stats(pid, rec, "cold")
            log(f"      cold find: {fsecs:.2f} s; total {secs + fsecs:.2f} s; "
                f"RSS {m['cold_rss_mib']:.0f} MiB, HWM {m['cold_hwm_mib']:.0f} MiB")

            # (c) remount with the same cache dir
            m["umount_s"] = self.client.umount(mp, mlog)
            self._wait_gone(pid)
            mnt = self.client.mount(BUCKET, self.ds.name, mp, cache, mlog)
            secs, pid = mnt.mount_s, mnt.pid
            rec.extra["remount_pid"] = pid
            m["remount_mount_s"] = secs
            log(f"  (c) umount {m['umount_s']:.2f} s; remount: {secs:.2f} s (pid {pid})")
            fsecs = self._find(mp, rec, "remount")
            m["remount_find_s"] = fsecs
            m["remount_total_s"] = secs + fsecs
            self._stats(pid, rec, "remount")
            log(f"      remount find: {fsecs:.2f} s; total {secs + fsecs:.2f} s; "
                f"RSS {m['remount_rss_mib']:.0f} MiB, HWM {m['remount_hwm_mib']:.0f} MiB")
            rec.extra["remount_umount_s"] = self.client.umount(mp, mlog)
            self._wait_gone(pid)
            ok = True
        finally:
            self._ratios(m)
            notes = self.client.cleanup(mp, log=log)
            if notes:
                rec.extra["cleanup"] = notes
            if is_fuse_mounted(mp):
                rec.extra["left_mounted"] = str(mp)
                log(f"  WARNING: {mp} is still mounted after cleanup")
            elif ok and not self.ctx.args.keep_run_dirs:
                shutil.rmtree(run_dir, ignore_errors=True)
                rec.extra.pop("run_dir", None)

    # ---- helpers ----------------------------------------------------------------------------

    def _find(self, mp: Path, rec: RunRecord, phase: str) -> float:
        lines, secs = find_count(mp, timeout=self.ctx.args.timeout)
        rec.extra[f"{phase}_find_lines"] = lines
        if lines != self.expected_lines:
            rec.extra[f"{phase}_find_s_unverified"] = secs
            raise StepError(f"{phase} find printed {lines} lines, expected "
                            f"{self.expected_lines} (1 root + {self.expected_lines - 1 - self.ds.objects} "
                            f"dirs + {self.ds.objects} objects)")
        if not is_fuse_mounted(mp):
            raise StepError(f"{phase}: {mp} is no longer mounted after find (daemon died?)")
        return secs

    @staticmethod
    def _stats(pid: int, rec: RunRecord, phase: str) -> None:
        try:
            st = daemon_stats(pid)
        except OSError as e:
            raise StepError(f"{phase}: cannot read /proc/{pid}/status: {e}") from None
        rec.metrics[f"{phase}_rss_mib"] = st["rss_mib"]
        rec.metrics[f"{phase}_hwm_mib"] = st["hwm_mib"]
        rec.metrics[f"{phase}_cpu_s"] = st["cpu_s"]
        rec.extra[f"{phase}_threads"] = st["threads"]

    @staticmethod
    def _wait_gone(pid: int, timeout: float = 30) -> None:
        from objfs.procinfo import process_alive as pid_alive
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise StepError(f"daemon {pid} still alive {timeout:.0f} s after objfs umount")
            time.sleep(0.05)

    @staticmethod
    def _ratios(m: dict) -> None:
        b = m.get("boto3_list_s")
        if b:
            if "cold_total_s" in m:
                m["cold_over_boto3"] = m["cold_total_s"] / b
            if "cold_mount_s" in m:
                m["cold_mount_over_boto3"] = m["cold_mount_s"] / b
            if "remount_total_s" in m:
                m["remount_over_boto3"] = m["remount_total_s"] / b
        if "cold_total_s" in m and m.get("remount_total_s"):
            m["cold_over_remount"] = m["cold_total_s"] / m["remount_total_s"]

    def teardown(self) -> None:
        pass
