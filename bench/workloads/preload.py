"""Workload ``preload``: the figures issue 12 asks of the master and its members.

A dataset of large and small files (full size: 3 x 1 GiB and 10,000 x 128 KiB in 100 folders,
4.2 GiB; ``--smoke``: 1 x 128 MiB and 500 x 128 KiB) under one prefix, mounted by 1, 2 and 4
objfs daemons on this machine (each its own mount point, cache dir and peer port on
127.0.0.1, all with ``--master``), with an ``objfs master`` process listing the same origin.
Per host count, from fresh cache dirs and mounts:

1. **preload**: one job for the whole prefix (``MasterClient.submit`` + ``wait``): wall time
   from the submit to done (the master's listing included), aggregate MB/s (dataset bytes /
   that time), origin bytes (Δ``read_origin_bytes`` over the daemons) over the dataset, the
   daemons' CPU;
2. **first training-style read** on host 0, after ``drop_caches``: every file whole in a
   shuffled order, 16 threads (``bench/scripts/readfiles.py``, a data loader's pattern), MB/s,
   origin bytes, bytes from peers.

And once, **the same read without preload**: one plain mount (no cluster), cold cache, the
origin re-warmed. Only the origin (127.0.0.2) is shaped in the emulated mode (50 MB/s per
connection, +20 ms per request); peer and master traffic on 127.0.0.1 is not. Sampled MiB
blocks of what was read are checked against the dataset's known contents.

One machine with 2 cores: the daemons, the master, SeaweedFS and the delay line share them,
so the rates are CPU-bound; the origin bytes are exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BENCH_DIR, StepError, drop_caches, proc_cpu_s, run
from bench.datasets import BlobDataset, MiB, _h
from bench.mounts import ObjfsClient
from bench.report import Metric, RunRecord
from bench.workloads.base import Workload, mbps

HOST_COUNTS = (1, 2, 4)
THREADS = 16
SMALL_PER_DIR = 100


@dataclasses.dataclass(frozen=True)
class _Part(BlobDataset):
    """A BlobDataset stored under ``root/part/`` (both parts of the dataset share a root)."""

    root: str = ""
    part: str = ""

    @property
    def prefix(self) -> str:
        return f"{self.root}/{self.part}/"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics() -> list[Metric]:
    out = []
    for h in HOST_COUNTS:
        p = f"h{h}"
        out += [
            Metric(f"{p}_preload_s", f"{h} host(s): preload wall time (submit to done)", "s", 1),
            Metric(f"{p}_preload_MBps", f"{h} host(s): preload aggregate rate (dataset / time)",
                   "MB/s", 0, summary=True),
            Metric(f"{p}_preload_origin_x", f"{h} host(s): preload origin bytes / dataset",
                   "x", 3, summary=True),
            Metric(f"{p}_preload_cpu_s", f"{h} host(s): CPU of the daemons during the preload",
                   "s", 1),
            Metric(f"{p}_read_MBps", f"{h} host(s): first training-style read on host 0 after "
                   "the preload", "MB/s", 0, summary=True),
            Metric(f"{p}_read_origin_mib", f"{h} host(s): origin MiB during that read", "MiB",
                   0),
            Metric(f"{p}_read_peer_mib", f"{h} host(s): MiB host 0 got from peers in that read",
                   "MiB", 0),
        ]
    out += [
        Metric("cold_read_MBps", "the same read without preload (1 host, cold cache)", "MB/s",
               0, summary=True),
        Metric("cold_read_origin_mib", "origin MiB of the read without preload", "MiB", 0),
    ]
    return out


class PreloadWorkload(Workload):
    name = "preload"
    full_runs = 1
    modes = ("loopback", "emulated")
    default_modes = ("emulated",)
    description = ("objfs preload (issue 12): a 4.2 GiB dataset (3 x 1 GiB + 10,000 x 128 KiB) "
                   "preloaded by 1, 2 and 4 daemons through an objfs master (time, MB/s, "
                   "origin bytes), then read training-style on one host, against the same "
                   "read without preload.")
    metrics = _metrics()

    def __init__(self, ctx):
        super().__init__(ctx)
        big_size, big_count = self.sizes.seq_size, 3 if self.sizes.seq_size >= 1 << 30 else 1
        small_count, small_size = self.sizes.small_count, self.sizes.small_size
        self.root = (f"preload-v1-{big_count}x{_h(big_size)}-{small_count}x"
                     f"{_h(small_size)}")
        self.big = _Part(f"{self.root}-big", big_count, big_size, root=self.root, part="big")
        self.small = _Part(f"{self.root}-small", small_count, small_size,
                           per_dir=SMALL_PER_DIR, root=self.root, part="small")
        self.total = self.big.total_bytes() + self.small.total_bytes()
        # One client per host: a client's cleanup stops every daemon it has seen.
        self.clients = [ObjfsClient(ctx.origin.endpoint, extra_args=ctx.args.mount_arg,
                                    mount_timeout=self.sizes.step_timeout,
                                    work_dir=ctx.work_dir) for _ in range(max(HOST_COUNTS))]
        self.client = self.clients[0]

    def settings(self) -> dict:
        return {"dataset": self.root, "bytes": self.total,
                "big": {"count": self.big.count, "bytes": self.big.size},
                "small": {"count": self.small.count, "bytes": self.small.size},
                "hosts": list(HOST_COUNTS), "objfs": self.client.settings(),
                "member_flags": "--peer-listen 127.0.0.1:PORT --cluster-secret-file (0600) "
                                "--master URL",
                "master": "objfs master --heartbeat-interval 1 --member-timeout 10",
                "reader": f"bench/scripts/readfiles.py --threads {THREADS}, every file, "
                          "shuffled (seed 12)"}

    def setup(self) -> dict:
        ok, note = self.client.available()
        if not ok:
            raise StepError(note)
        return {"big": self.ctx.origin.ensure_dataset(self.big, self.ctx.args.repopulate),
                "small": self.ctx.origin.ensure_dataset(self.small, self.ctx.args.repopulate)}

    def _files(self) -> list[tuple[_Part, int, str]]:
        """(part, index, path below the mount) of every file, in the reader's order."""
        files = [(ds, i, f"{ds.part}/{ds.key(i)}") for ds in (self.big, self.small)
                 for i in range(ds.count)]
        random.Random(12).shuffle(files)
        return files

    def _rewarm(self) -> float:
        return self.ctx.origin.rewarm([self.big.prefix + k for k in self.big.keys()]
                                      + [self.small.prefix + "*"])

    def run_once(self, rec: RunRecord) -> None:
        for hosts in HOST_COUNTS:
            self._phase(rec, hosts)
        self._cold_read(rec)

    # ---- with a master -----------------------------------------------------------------------

    def _phase(self, rec: RunRecord, hosts: int) -> None:
        from objfs.master.client import MasterClient

        p, m = f"h{hosts}", rec.metrics
        with contextlib.ExitStack() as stack:
            run_dir = self.new_run_dir(rec, f"{p}-master")
            stack.callback(shutil.rmtree, run_dir, True)
            secret = run_dir / "cluster.secret"
            secret.write_bytes(os.urandom(32).hex().encode())
            os.chmod(secret, 0o600)
            port = _free_port()
            master_log = open(run_dir / "master.log", "ab")
            stack.callback(master_log.close)
            master = subprocess.Popen(
                [self.client.exe, "master", "--listen", f"127.0.0.1:{port}", "--state-dir",
                 str(run_dir / "state"), "--cluster-secret-file", str(secret), "--endpoint",
                 self.ctx.origin.endpoint, "--heartbeat-interval", "1", "--member-timeout",
                 "10"], stdout=master_log, stderr=master_log, stdin=subprocess.DEVNULL)
            stack.callback(_stop, master)
            url = f"http://127.0.0.1:{port}"
            client = MasterClient(url, secret.read_bytes().strip(), timeout=60)
            ids = [f"127.0.0.1:{_free_port()}" for _ in range(hosts)]
            _wait(lambda: _answers(client), 30, "the master to listen")
            mounts = []
            for i in range(hosts):
                extra = ["--peer-listen", ids[i], "--cluster-secret-file", str(secret),
                         "--master", url]
                mounts.append(stack.enter_context(
                    self.mounted(self.clients[i], self.root, rec, f"{p}-h{i}", extra)))
            _wait(lambda: [g["members"] for g in client.members()["groups"]] == [sorted(ids)],
                  60, "every member to register")
            time.sleep(2.5)  # every member has heard of every other (heartbeats every 1 s)
            rec.extra[f"{p}_drop_s"] = drop_caches()
            rec.extra[f"{p}_rewarm_s"] = self._rewarm()
            before = [self.client.stats(mnt.mp) for mnt in mounts]
            cpu0 = [proc_cpu_s(mnt.pid) for mnt in mounts]
            t0 = time.perf_counter()
            job = client.submit(f"s3://{self.ctx.origin.bucket}/{self.root}/")
            final = client.wait(job["id"], interval=0.2, timeout=self.sizes.step_timeout)
            secs = time.perf_counter() - t0
            cpu = sum(proc_cpu_s(mnt.pid) for mnt in mounts) - sum(cpu0)
            if final["state"] != "done":
                raise StepError(f"preload {final['state']}: {final.get('message')} "
                                f"{final.get('errors', [])[:2]}")
            if final["bytes"]["total"] != self.total:
                raise StepError(f"preload counted {final['bytes']['total']} bytes, "
                                f"expected {self.total}")
            time.sleep(1.0)
            after = [self.client.stats(mnt.mp) for mnt in mounts]
            origin = sum(a.get("read_origin_bytes", 0) - b.get("read_origin_bytes", 0)
                         for a, b in zip(after, before))
            m[f"{p}_preload_s"] = secs
            m[f"{p}_preload_MBps"] = mbps(self.total, secs)
            m[f"{p}_preload_origin_x"] = origin / self.total
            m[f"{p}_preload_cpu_s"] = cpu
            rec.extra[f"{p}_job"] = {k: final[k] for k in ("files", "bytes", "extents",
                                                           "elapsed_s", "hosts")}
            self.log(f"  {p}: preload {self.total / MiB:.0f} MiB in {secs:.1f} s "
                     f"({m[f'{p}_preload_MBps']:.0f} MB/s), origin {origin / MiB:.0f} MiB "
                     f"({m[f'{p}_preload_origin_x']:.3f} x), daemons' CPU {cpu:.1f} s")

            # The first training-style read, on host 0.
            rec.extra[f"{p}_read_drop_s"] = drop_caches()
            before = after
            mbs = self._read(mounts[0].mp, f"{p} read")
            after = [self.client.stats(mnt.mp) for mnt in mounts]
            m[f"{p}_read_MBps"] = mbs
            m[f"{p}_read_origin_mib"] = sum(
                a.get("read_origin_bytes", 0) - b.get("read_origin_bytes", 0)
                for a, b in zip(after, before)) / MiB
            m[f"{p}_read_peer_mib"] = (after[0].get("read_peer_bytes", 0)
                                       - before[0].get("read_peer_bytes", 0)) / MiB
            self.log(f"  {p}: read on host 0 at {mbs:.0f} MB/s, origin "
                     f"{m[f'{p}_read_origin_mib']:.0f} MiB, from peers "
                     f"{m[f'{p}_read_peer_mib']:.0f} MiB")

    # ---- without preload -----------------------------------------------------------------------

    def _cold_read(self, rec: RunRecord) -> None:
        with self.mounted(self.client, self.root, rec, "cold") as mnt:
            rec.extra["cold_drop_s"] = drop_caches()
            rec.extra["cold_rewarm_s"] = self._rewarm()
            before = self.client.stats(mnt.mp)
            mbs = self._read(mnt.mp, "cold read")
            after = self.client.stats(mnt.mp)
        rec.metrics["cold_read_MBps"] = mbs
        rec.metrics["cold_read_origin_mib"] = (after.get("read_origin_bytes", 0)
                                               - before.get("read_origin_bytes", 0)) / MiB
        self.log(f"  cold read (no preload): {mbs:.0f} MB/s, origin "
                 f"{rec.metrics['cold_read_origin_mib']:.0f} MiB")

    def _read(self, mp: Path, what: str) -> float:
        files = self._files()
        lst = mp.parent / "files.txt"
        lst.write_text("".join(f"{mp / path}\n" for _, _, path in files))
        cp, _ = run([sys.executable, str(BENCH_DIR / "scripts" / "readfiles.py"),
                     "--threads", str(THREADS), "--list", str(lst)],
                    timeout=self.sizes.step_timeout, what=what, check=False)
        out = (cp.stdout or b"").decode()
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise StepError(f"readfiles printed no result: {out[-500:]} "
                            f"{(cp.stderr or b'').decode()[-500:]}") from None
        if res["failed"] or res["bytes"] != self.total:
            raise StepError(f"{what}: {res['bytes']} of {self.total} bytes, "
                            f"{res['failed']} files failed: {res['errors']}")
        for ds, i, path in files[:3] + [f for f in files if f[0] is self.big][:1]:
            ds.verify_file(i, mp / path, samples=2)
        return res["MBps"]


def _answers(client) -> bool:
    try:
        client.members()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise StepError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
