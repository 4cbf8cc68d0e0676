"""Workload ``listing``: how long until a big prefix is browsable, cold and after a remount.

Dataset: N small objects (100,000 in the full run) in a tree of N/1000 top-level directories
(see origin.Dataset). Per run, against the same origin:

- **boto3**: a ListObjectsV2 paginator without delimiter over the prefix (the raw API's
  listing time; the client is built before timing);
- per contender: mount with a fresh empty cache dir (**cold mount**: objfs returns once the flat
  listing is in LMDB; s3fs and rclone return at once and list per directory on demand), then
  ``find MOUNTPOINT`` (**cold find**; its line count must be 1 + directories + N), then
  ``ls -lR MOUNTPOINT`` in the same mount (**ls -lR**: every entry stat()ed; entry count
  checked); then unmount, mount again with the **same cache dir** (objfs reuses its stored
  tree and refreshes in the background; s3fs and rclone keep no metadata across mounts) and
  time ``find`` again;
- the daemon's CPU time from its start (the mount) through the cold ``ls -lR``, and its peak
  RSS (VmHWM).

A traversal that exceeds the step timeout is shown as ``timeout`` (its contender's remaining
cells too).
"""

from __future__ import annotations

from bench.common import StepError
from bench.mounts import daemon_stats, find_count, is_fuse_mounted, ls_lr_count
from bench.origin import Dataset
from bench.report import Metric, RunRecord
from bench.workloads.base import ContenderWorkload


class ListingWorkload(ContenderWorkload):
    name = "listing"
    description = ("Browsing a prefix of N small objects (100,000 in the full run, 1,000 "
                   "directories): cold mount + `find` + `ls -lR`, then remount (same cache dir) "
                   "+ `find`; boto3 flat listing as the raw API's time.")
    figures = [
        Metric("cold_mount_s", "cold: mount until usable (empty cache dir)", "s"),
        Metric("cold_find_s", "cold: `find` after the mount", "s"),
        Metric("cold_total_s", "cold: mount + find (boto3: flat listing of the prefix)",
               "s", summary=True),
        Metric("cold_lslr_s", "`ls -lR` right after that find (same mount)", "s", summary=True),
        Metric("remount_s", "remount with the same cache dir, until usable", "s"),
        Metric("remount_find_s", "remount: `find`", "s"),
        Metric("remount_total_s", "remount: mount + find", "s", summary=True),
        Metric("cpu_s", "daemon CPU from its start through the cold ls -lR (mount's listing "
               "included)", "s"),
        Metric("peak_rss_mib", "daemon peak RSS (VmHWM) after the cold ls -lR",
               "MiB", 0, summary=True),
    ]
    baselines = ("boto3",)
    default_modes = ("loopback",)  # under the emulated latency s3fs alone takes many minutes
    full_runs = 2

    def __init__(self, ctx):
        super().__init__(ctx)
        self.ds = Dataset(objects=ctx.args.objects)
        self.expected_lines = 0

    def setup_data(self) -> dict:
        info = self.ctx.origin.ensure_dataset(self.ds, repopulate=self.ctx.args.repopulate)
        self.expected_lines = self.ds.expected_find_lines()
        info["expected_find_lines"] = self.expected_lines
        return {"dataset": info}

    def workload_settings(self) -> dict:
        return {"objects": self.ds.objects, "dataset": self.ds.name,
                "layout": "per 1000 objects: dNNN/ 600 files, dNNN/s0..s2/ 100 each, "
                          "dNNN/n/deep/x0..x3/ 25 each; sizes 0-1024 B",
                "expected_find_lines": self.expected_lines, "boto3_page_size": 1000,
                "traversal_timeout_s": self.sizes.step_timeout}

    def measure(self, name: str, rec: RunRecord) -> None:
        m = rec.metrics
        if name == "boto3":
            s3 = self.ctx.origin.client()
            n, pages, secs = self.ctx.origin.list_flat(self.ds.prefix, s3)
            if n != self.ds.objects:
                raise StepError(f"boto3 listed {n} objects, expected {self.ds.objects}")
            m["boto3.cold_total_s"] = secs
            self.log(f"  boto3 flat listing: {n} objects, {pages} pages, {secs:.2f} s")
            return
        client = self.clients[name]
        with self.mounted(client, self.ds.name, rec, name) as mnt:
            m[f"{name}.cold_mount_s"] = mnt.mount_s
            secs = self._find(mnt.mp, rec, f"{name}.cold")
            m[f"{name}.cold_find_s"] = secs
            m[f"{name}.cold_total_s"] = mnt.mount_s + secs
            m[f"{name}.cold_lslr_s"] = self._lslr(mnt.mp, rec, f"{name}.cold")
            st = daemon_stats(mnt.pid)
            m[f"{name}.cpu_s"] = st["cpu_s"]  # the daemon started with this mount
            m[f"{name}.peak_rss_mib"] = st["hwm_mib"]
            self.log(f"  {name} cold: mount {mnt.mount_s:.2f} s, find {secs:.2f} s, ls -lR "
                     f"{m[f'{name}.cold_lslr_s']:.2f} s; RSS {st['hwm_mib']:.0f} MiB")
            mnt2 = self.remount(mnt, self.ds.name)
            m[f"{name}.remount_s"] = mnt2.mount_s
            secs = self._find(mnt2.mp, rec, f"{name}.remount")
            m[f"{name}.remount_find_s"] = secs
            m[f"{name}.remount_total_s"] = mnt2.mount_s + secs
            self.log(f"  {name} remount: {mnt2.mount_s:.2f} s, find {secs:.2f} s")

    def _find(self, mp, rec: RunRecord, phase: str) -> float:
        lines, secs = find_count(mp, timeout=self.sizes.step_timeout)
        rec.extra[f"{phase}_find_lines"] = lines
        if lines != self.expected_lines:
            rec.extra[f"{phase}_find_s_unverified"] = secs
            raise StepError(f"{phase} find printed {lines} lines, expected "
                            f"{self.expected_lines} (1 root + "
                            f"{self.expected_lines - 1 - self.ds.objects} dirs + "
                            f"{self.ds.objects} objects)")
        if not is_fuse_mounted(mp):
            raise StepError(f"{phase}: {mp} is no longer mounted after find (daemon died?)")
        return secs

    def _lslr(self, mp, rec: RunRecord, phase: str) -> float:
        n, secs = ls_lr_count(mp, timeout=self.sizes.step_timeout)
        rec.extra[f"{phase}_lslr_entries"] = n
        if n != self.expected_lines - 1:
            rec.extra[f"{phase}_lslr_s_unverified"] = secs
            raise StepError(f"{phase} ls -lR listed {n} entries, expected "
                            f"{self.expected_lines - 1}")
        return secs
