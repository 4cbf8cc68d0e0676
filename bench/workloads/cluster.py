"""Workload ``cluster``: the figures issue 11 asks of the peer cache.

Four objfs daemons on this machine (one "host" each: own mount point, cache dir and peer
port on 127.0.0.1) read the same 1 GiB object cold, first all at once, then one after the
other, each pattern once with the peer cache (``--peer-listen``/``--peers``/
``--cluster-secret-file``) and once without. Every phase starts from fresh cache dirs and
fresh mounts, after ``drop_caches`` and a re-warm of the origin (so SeaweedFS's disk is not
measured). Peer traffic stays on 127.0.0.1 and is not shaped; in the emulated mode only the
origin (127.0.0.2) is: 50 MB/s per connection, +20 ms per request (bench/netem.py).

Per phase: the origin bytes each daemon fetched (Δread_origin_bytes of ``objfs stats``, which
includes what an owner fetched for the others), their sum over the object size (≈ 1 with the
peer cache, 4 without), the bytes that came from peers, the fallbacks to the origin, each
host's read rate (``cat`` of the object, MB/s), the aggregate rate (4 x 1 GiB over the
phase's wall time), and the daemons' CPU. Sampled MiB of every copy are checked against the
dataset's known contents.

This is one machine with 2 cores: four daemons, SeaweedFS and the delay line share them, so
the rates are CPU-bound and say more about the relation between the rows than about a real
cluster, where each host has its own cores and NIC.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

from bench.common import StepError, drop_caches, proc_cpu_s
from bench.datasets import BlobDataset, MiB, _h
from bench.mounts import ObjfsClient
from bench.report import Metric, RunRecord
from bench.workloads.base import Workload, mbps

HOSTS = 4
PHASES = [(peer, pattern) for peer in ("peer", "nopeer") for pattern in ("concurrent",
                                                                          "sequential")]
_LABEL = {"peer": "with the peer cache", "nopeer": "without the peer cache",
          "concurrent": "4 hosts at once", "sequential": "one host after the other"}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics() -> list[Metric]:
    out = []
    for peer, pattern in PHASES:
        p = f"{peer}_{pattern}"
        what = f"{_LABEL[peer]}, {_LABEL[pattern]}"
        out += [
            Metric(f"{p}_origin_x", f"{what}: origin bytes / object size (all hosts)", "x", 2,
                   summary=True),
            *[Metric(f"{p}_origin_mib_h{i}", f"{what}: origin MiB fetched by host {i}", "MiB", 0)
              for i in range(HOSTS)],
            Metric(f"{p}_peer_mib", f"{what}: MiB received from peers (all hosts)", "MiB", 0),
            Metric(f"{p}_fallbacks", f"{what}: runs owned by a peer read from the origin", "n", 0),
            Metric(f"{p}_agg_MBps", f"{what}: aggregate read rate, 4 x object / wall time",
                   "MB/s", 0, summary=True),
            *[Metric(f"{p}_MBps_h{i}", f"{what}: host {i} read rate", "MB/s", 0)
              for i in range(HOSTS)],
            Metric(f"{p}_wall_s", f"{what}: wall time of the phase's reads", "s", 1),
            Metric(f"{p}_cpu_s", f"{what}: CPU of the 4 daemons during the reads", "s", 1),
        ]
    out.append(Metric("peer_sendfile_share", "peer runs: share of bytes served to peers that "
                      "went out with sendfile (zero-copy)", "ratio", 2))
    return out


class ClusterWorkload(Workload):
    name = "cluster"
    full_runs = 1
    modes = ("loopback", "emulated")
    default_modes = ("emulated",)
    description = ("objfs peer cache (issue 11): 4 daemons read the same 1 GiB object cold, at "
                   "once and one after the other, with and without the peer cache: origin "
                   "bytes per host, aggregate and per-host MB/s.")
    metrics = _metrics()

    def __init__(self, ctx):
        super().__init__(ctx)
        size = self.sizes.seq_size  # 1 GiB (128 MiB with --smoke)
        self.dataset = BlobDataset(f"cluster-v1-1x{_h(size)}", 1, size)
        # One client per host: a client's cleanup stops every daemon it has seen.
        self.clients = [ObjfsClient(ctx.origin.endpoint, extra_args=ctx.args.mount_arg,
                                    mount_timeout=self.sizes.step_timeout,
                                    work_dir=ctx.work_dir) for _ in range(HOSTS)]
        self.client = self.clients[0]

    def settings(self) -> dict:
        return {"hosts": HOSTS, "dataset": self.dataset.name,
                "object_bytes": self.dataset.size, "objfs": self.client.settings(),
                "peer_flags": "--peer-listen 127.0.0.1:PORT --peers (all four) "
                              "--cluster-secret-file (0600)",
                "reader": "cat FILE > /dev/null on each host",
                "phases": [f"{p}_{q}" for p, q in PHASES]}

    def setup(self) -> dict:
        ok, note = self.client.available()
        if not ok:
            raise StepError(note)
        return {"dataset": self.ctx.origin.ensure_dataset(self.dataset,
                                                          self.ctx.args.repopulate)}

    def run_once(self, rec: RunRecord) -> None:
        sent = served = 0.0
        for peer, pattern in PHASES:
            s, z = self._phase(rec, peer, pattern)
            sent, served = sent + s, served + z
        if served:
            rec.metrics["peer_sendfile_share"] = sent / served

    # ---- one phase ----------------------------------------------------------------------------

    def _phase(self, rec: RunRecord, peer: str, pattern: str) -> tuple[float, float]:
        p, m, size = f"{peer}_{pattern}", rec.metrics, self.dataset.size
        key = self.dataset.key(0)
        with contextlib.ExitStack() as stack:
            run_dir = self.new_run_dir(rec, f"{p}-secret")
            stack.callback(shutil.rmtree, run_dir, True)
            secret = run_dir / "cluster.secret"
            secret.write_bytes(os.urandom(32).hex().encode())
            os.chmod(secret, 0o600)
            ids = [f"127.0.0.1:{_free_port()}" for _ in range(HOSTS)]
            mounts = []
            for i in range(HOSTS):
                extra = ["--peer-listen", ids[i], "--peers", ",".join(ids),
                         "--cluster-secret-file", str(secret)] if peer == "peer" else []
                mounts.append(stack.enter_context(
                    self.mounted(self.clients[i], self.dataset.name, rec, f"{p}-h{i}", extra)))
            paths = [mnt.mp / key for mnt in mounts]
            for path in paths:
                path.stat()  # lookups outside the timed reads
            rec.extra[f"{p}_drop_s"] = drop_caches()
            rec.extra[f"{p}_rewarm_s"] = self.ctx.origin.rewarm([self.dataset.prefix + key])
            before = [self.client.stats(mnt.mp) for mnt in mounts]
            cpu0 = [proc_cpu_s(mnt.pid) for mnt in mounts]
            t0 = time.perf_counter()
            if pattern == "concurrent":
                secs = self._cat_all(paths)
            else:
                secs = [self.cat([path], f"{p} cat host {i}") for i, path in enumerate(paths)]
            wall = time.perf_counter() - t0
            cpu = sum(proc_cpu_s(mnt.pid) for mnt in mounts) - sum(cpu0)
            time.sleep(1.0)  # readahead still being stored shows up in the counters
            after = [self.client.stats(mnt.mp) for mnt in mounts]
            for path in paths:
                self.dataset.verify_file(0, path, samples=4)
        d = [{k: float(a.get(k, 0)) - float(b.get(k, 0)) for k in a}
             for b, a in zip(before, after)]
        origin = [x.get("read_origin_bytes", 0) for x in d]
        for i in range(HOSTS):
            m[f"{p}_origin_mib_h{i}"] = origin[i] / MiB
            m[f"{p}_MBps_h{i}"] = mbps(size, secs[i])
        m[f"{p}_origin_x"] = sum(origin) / size
        m[f"{p}_peer_mib"] = sum(x.get("read_peer_bytes", 0) for x in d) / MiB
        m[f"{p}_fallbacks"] = sum(x.get("peer_fallbacks_total", 0) for x in d)
        m[f"{p}_agg_MBps"] = mbps(HOSTS * size, wall)
        m[f"{p}_wall_s"] = wall
        m[f"{p}_cpu_s"] = cpu
        rec.extra[f"{p}_counters"] = [
            {k: v for k, v in x.items() if k.startswith(("peer_", "read_", "origin_get"))}
            for x in d]
        self.log(f"  {p}: origin {sum(origin) / MiB:.0f} MiB ({m[f'{p}_origin_x']:.2f} x), "
                 f"per host {[round(o / MiB) for o in origin]} MiB, from peers "
                 f"{m[f'{p}_peer_mib']:.0f} MiB, fallbacks {m[f'{p}_fallbacks']:.0f}; "
                 f"aggregate {m[f'{p}_agg_MBps']:.0f} MB/s, per host "
                 f"{[round(m[f'{p}_MBps_h{i}']) for i in range(HOSTS)]} MB/s, CPU {cpu:.1f} s")
        return (sum(x.get("peer_out_sendfile_bytes", 0) for x in d),
                sum(x.get("peer_out_bytes", 0) for x in d))

    def _cat_all(self, paths) -> list[float]:
        """``cat`` every path at once; returns each one's seconds."""
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["cat", str(p)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for p in paths]
        secs: list[float] = [0.0] * len(procs)
        pending = dict(enumerate(procs))
        deadline = t0 + self.sizes.step_timeout
        errors = []
        while pending:
            for i, proc in list(pending.items()):
                if proc.poll() is not None:
                    secs[i] = time.perf_counter() - t0
                    if proc.returncode:
                        errors.append(proc.stderr.read().decode("utf-8", "replace")[-300:])
                    del pending[i]
            if time.perf_counter() > deadline:
                for proc in pending.values():
                    proc.kill()
                raise StepError(f"concurrent cat timed out after {self.sizes.step_timeout} s")
            time.sleep(0.01)
        if errors:
            raise StepError(f"concurrent cat failed: {errors}")
        return secs
