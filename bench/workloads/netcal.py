"""Workload ``netcal``: what the network itself gives a client, in each network mode.

Run first in each mode, with plain unsigned HTTP GETs on raw connections (``http.client``, no
S3 client in the way), against the 1 GiB object of the seq dataset:

- **1 stream**: one GET of 256 MiB on one connection (the per-connection cap: ~50 MB/s
  emulated);
- **16 streams**: 16 connections, each one GET of a different 64 MiB range, at once (the
  aggregate: what parallel ranged GETs can reach);
- **time to first byte**: 30 GETs of 1 byte on one kept-alive connection, median and p90 (the
  request delay emulated);
- **new connection + first byte**: 10 fresh connections, each one 1-byte GET (adds the SYN
  delay);
- **delay process CPU**: the emulation's own CPU time during this workload, per GB moved
  (emulated mode only: HTB itself runs in the kernel's softirq and is not separated out; the
  loopback column of the same figures shows what the emulation changes).
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time

from bench.common import StepError
from bench.datasets import MiB, seq_objects
from bench.report import Metric, RunRecord
from bench.workloads.base import Workload, mbps


class NetcalWorkload(Workload):
    name = "netcal"
    modes = ("loopback", "emulated")
    default_modes = ("loopback", "emulated")
    description = ("The network as a client sees it (raw HTTP GETs to the origin): one stream, "
                   "16 streams, time to first byte; and the emulation's own CPU.")
    metrics = [
        Metric("one_stream_MBps", "1 connection, one GET of 256 MiB (less with --smoke)",
               "MB/s", 1),
        Metric("streams16_MBps", "16 connections at once, one GET of 64 MiB each (less with "
               "--smoke)", "MB/s", 0),
        Metric("ttfb_ms", "time to first byte, kept-alive connection (median of 30)", "ms", 2),
        Metric("ttfb_p90_ms", "time to first byte, p90 of 30", "ms", 2),
        Metric("connect_ttfb_ms", "new connection + first byte (median of 10)", "ms", 2),
        Metric("delay_cpu_s_per_GB", "delay process CPU per GB moved (emulated only)", "s", 3),
    ]

    def __init__(self, ctx):
        super().__init__(ctx)
        self.ds = seq_objects(self.sizes.seq_size, self.sizes.seq_count)
        self.path = f"/{ctx.origin.bucket}/{self.ds.prefix}{self.ds.key(0)}"
        self.one = min(256 * MiB, self.ds.size)
        self.part = min(64 * MiB, self.ds.size // 16)

    def setup(self) -> dict:
        info = self.ctx.origin.ensure_dataset(self.ds, self.ctx.args.repopulate)
        self.ctx.origin.rewarm([self.ds.prefix + self.ds.key(0)])
        return {"dataset": info["dataset"], "one_stream_bytes": self.one,
                "per_stream_bytes": self.part}

    def settings(self) -> dict:
        return {"object": self.path, "client": "http.client, unsigned GET with Range",
                "netem": self.ctx.netem.describe() if self.ctx.netem else None}

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.ctx.origin.host, self.ctx.origin.port,
                                          timeout=120)

    def _get(self, conn, lo: int, n: int) -> tuple[float, int]:
        """GET [lo, lo+n) on ``conn``: (seconds to the status line, bytes read)."""
        t0 = time.perf_counter()
        conn.request("GET", self.path, headers={"Range": f"bytes={lo}-{lo + n - 1}"})
        resp = conn.getresponse()
        ttfb = time.perf_counter() - t0
        if resp.status not in (200, 206):
            raise StepError(f"GET {self.path}: HTTP {resp.status}")
        buf = bytearray(1 << 20)
        got = 0
        while True:
            k = resp.readinto(buf)
            if not k:
                break
            got += k
        return ttfb, got

    def run_once(self, rec: RunRecord) -> None:
        m = rec.metrics
        netem = self.ctx.netem
        cpu0 = netem.delay_cpu_s() if netem else 0.0
        moved = 0
        # one stream
        c = self._conn()
        t0 = time.perf_counter()
        _, got = self._get(c, 0, self.one)
        m["one_stream_MBps"] = mbps(got, time.perf_counter() - t0)
        c.close()
        moved += got
        # 16 streams
        results: list[int] = []
        errors: list[str] = []

        def stream(i: int) -> None:
            try:
                cc = self._conn()
                _, n = self._get(cc, i * self.part, self.part)
                cc.close()
                results.append(n)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs = time.perf_counter() - t0
        if errors:
            raise StepError(f"16 streams: {errors[:3]}")
        m["streams16_MBps"] = mbps(sum(results), secs)
        moved += sum(results)
        # time to first byte, kept alive
        c = self._conn()
        self._get(c, 0, 1)  # connect outside the samples
        samples = [self._get(c, (k * 7919) % self.ds.size, 1)[0] * 1000 for k in range(30)]
        c.close()
        m["ttfb_ms"] = statistics.median(samples)
        m["ttfb_p90_ms"] = sorted(samples)[int(0.9 * len(samples))]
        # new connection each time
        samples = []
        for k in range(10):
            t0 = time.perf_counter()
            c = self._conn()
            self._get(c, k * 4096, 1)
            samples.append((time.perf_counter() - t0) * 1000)
            c.close()
        m["connect_ttfb_ms"] = statistics.median(samples)
        if netem:
            m["delay_cpu_s_per_GB"] = (netem.delay_cpu_s() - cpu0) / (moved / 1e9)
        self.log(f"  1 stream {m['one_stream_MBps']:.1f} MB/s, 16 streams "
                 f"{m['streams16_MBps']:.0f} MB/s, TTFB {m['ttfb_ms']:.2f} ms (p90 "
                 f"{m['ttfb_p90_ms']:.2f}), new connection {m['connect_ttfb_ms']:.2f} ms")
