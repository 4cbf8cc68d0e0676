"""An emulated object-store network between the clients and the origin, on one machine.

Real object stores give each connection ~30-60 MB/s and answer ~10-30 ms after a request; they
scale by many connections. This kernel has no ``netem``/``fq`` qdiscs and cannot load modules,
so (see shared/BENCH-NOTES.md) the emulation is built from what it has, for the origin's
address and S3 port only (the origin listens on 127.0.0.2; nothing else on loopback is touched):

**Per-connection bandwidth** — an HTB qdisc on ``lo`` with 2 x 256 leaf classes at ``rate``
(400 mbit = 50 MB/s by default). ``u32`` hash filters spread the packets over the classes by
the client's port: server->client packets (``src ADDR sport PORT``) by bits 1-8 of the
destination port, client->server packets by bits 1-8 of the source port (Linux hands out even
ports for connect(), so bit 0 carries no information). Each connection is capped at ``rate`` in
each direction; two connections whose ports share those bits (a 1-in-256 chance per pair)
share a class. Unclassified traffic (everything else on loopback) bypasses HTB.

**Latency** — an iptables-legacy rule sends client->server packets that carry a SYN or a
payload (IP length >= 81: more than any bare ACK with options) to NFQUEUE; ``bench.netem_delay``
holds each one ``delay_ms`` and releases them in order. A request thus reaches the server
``delay_ms`` later (time to first byte), a new connection costs ``delay_ms`` more, and uploads
are delayed but not slowed (their rate is capped by HTB). ``--queue-bypass`` lets packets pass
if the delay process dies, so a crash cannot cut the origin off.

Own overhead: the delay process's CPU is reported (``delay_cpu_s``); the netcal workload measures
what a client actually gets (one stream, 16 streams, time to first byte) in both modes.

Everything is removed in ``stop()`` (also on the harness's exit paths); a stale setup left by a
killed run is recognised by its qdisc handle / chain name and removed before a new one starts.
Needs root, ``tc``, ``iptables-legacy`` and the netfilterqueue package (bench/setup.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import REPO, StepError, proc_status, run

QDISC_HANDLE = "b3"      # hex; "b3:" identifies our qdisc on lo
CHAIN = "OBJFSBENCH"
QUEUE = 7
BUCKETS = 256
DEV = "lo"


def _iptables() -> str | None:
    return shutil.which("iptables-legacy")


def _nfq_ok() -> bool:
    try:
        import netfilterqueue  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def requirements() -> list[str]:
    """What is missing for the emulation (empty list: all there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not shutil.which("tc"):
        missing.append("tc (iproute2)")
    if not _iptables():
        missing.append("iptables-legacy (Debian iptables)")
    if not _nfq_ok():
        missing.append("python netfilterqueue (pip; needs libnetfilter-queue-dev)")
    return missing


class EmulatedNetwork:
    def __init__(self, addr: str, port: int, rate_mbit: float = 400, delay_ms: float = 20,
                 log=print):
        self.addr = addr
        self.port = port
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.log = log
        self.delay_proc: subprocess.Popen | None = None
        self.active = False
        self._cpu0 = 0.0

    def describe(self) -> dict:
        return {"origin": f"{self.addr}:{self.port}", "per_connection_rate_mbit": self.rate_mbit,
                "per_connection_rate_MBps": self.rate_mbit / 8, "request_delay_ms": self.delay_ms,
                "classes_per_direction": BUCKETS, "qdisc": f"htb {QDISC_HANDLE}: on {DEV}",
                "iptables": f"iptables-legacy chain {CHAIN} -> NFQUEUE {QUEUE} (bypass)",
                "delay_process": "python -m bench.netem_delay"}

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> "EmulatedNetwork":
        missing = requirements()
        if missing:
            raise StepError("emulated network unavailable, missing: " + ", ".join(missing))
        self.remove_stale(self.log)
        try:
            self._tc_setup()
            self._delay_setup()
        except BaseException:
            self.stop()
            raise
        self.active = True
        self.log(f"netem: on for {self.addr}:{self.port}: {self.rate_mbit:g} mbit per "
                 f"connection each way, +{self.delay_ms:g} ms per request/SYN")
        return self

    def stop(self) -> None:
        ipt = _iptables()
        if ipt:
            for cmd in ([ipt, "-w", "-D", "OUTPUT", "-j", CHAIN], [ipt, "-w", "-F", CHAIN],
                        [ipt, "-w", "-X", CHAIN]):
                subprocess.run(cmd, capture_output=True, timeout=30)
        if self.delay_proc is not None:
            if self.delay_proc.poll() is None:
                self.delay_proc.terminate()
                try:
                    self.delay_proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.delay_proc.kill()
                    self.delay_proc.wait(10)
            self.delay_proc = None
        if shutil.which("tc") and self._our_qdisc():
            subprocess.run(["tc", "qdisc", "del", "dev", DEV, "root"], capture_output=True,
                           timeout=30)
        if self.active:
            self.log("netem: off")
        self.active = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @staticmethod
    def _our_qdisc() -> bool:
        cp = subprocess.run(["tc", "qdisc", "show", "dev", DEV], capture_output=True,
                            timeout=30, text=True)
        return any(line.startswith(f"qdisc htb {QDISC_HANDLE}: root")
                   for line in cp.stdout.splitlines())

    @classmethod
    def remove_stale(cls, log=print) -> None:
        """Remove a setup left behind by a killed run (recognised by our names only)."""
        ipt = _iptables()
        if ipt:
            cp = subprocess.run([ipt, "-w", "-S", "OUTPUT"], capture_output=True, text=True,
                                timeout=30)
            if f"-j {CHAIN}" in cp.stdout:
                log("netem: removing a stale iptables chain of an earlier run")
            for cmd in ([ipt, "-w", "-D", "OUTPUT", "-j", CHAIN], [ipt, "-w", "-F", CHAIN],
                        [ipt, "-w", "-X", CHAIN]):
                subprocess.run(cmd, capture_output=True, timeout=30)
        if shutil.which("tc") and cls._our_qdisc():
            log("netem: removing a stale qdisc of an earlier run")
            subprocess.run(["tc", "qdisc", "del", "dev", DEV, "root"], capture_output=True,
                           timeout=30)

    # ---- pieces -----------------------------------------------------------------------------

    def _tc_setup(self) -> None:
        h = QDISC_HANDLE
        rate = f"{self.rate_mbit:g}mbit"
        # burst: a few of lo's 64 KiB packets, so HTB can keep a class busy at this rate
        cls_opts = f"rate {rate} ceil {rate} burst 256k cburst 256k quantum 65536"
        lines = [f"qdisc add dev {DEV} root handle {h}: htb default 0 r2q 1000"]
        for i in range(BUCKETS):
            lines.append(f"class add dev {DEV} parent {h}: classid {h}:{0x100 + i:x} htb "
                         f"{cls_opts}")
            lines.append(f"class add dev {DEV} parent {h}: classid {h}:{0x200 + i:x} htb "
                         f"{cls_opts}")
        lines += [
            f"filter add dev {DEV} parent {h}: prio 1 protocol ip u32",
            f"filter add dev {DEV} parent {h}: prio 1 handle 2: protocol ip u32 divisor {BUCKETS}",
            f"filter add dev {DEV} parent {h}: prio 1 handle 3: protocol ip u32 divisor {BUCKETS}",
            # server -> client: hash on bits 1-8 of the destination (client) port
            f"filter add dev {DEV} parent {h}: prio 1 protocol ip u32 ht 800:: "
            f"match ip src {self.addr}/32 match ip sport {self.port} 0xffff "
            f"hashkey mask 0x000001fe at 20 link 2:",
            # client -> server: hash on bits 1-8 of the source (client) port
            f"filter add dev {DEV} parent {h}: prio 1 protocol ip u32 ht 800:: "
            f"match ip dst {self.addr}/32 match ip dport {self.port} 0xffff "
            f"hashkey mask 0x01fe0000 at 20 link 3:",
        ]
        for i in range(BUCKETS):
            lines.append(f"filter add dev {DEV} parent {h}: prio 1 protocol ip u32 "
                         f"ht 2:{i:x}: match u32 0 0 flowid {h}:{0x100 + i:x}")
            lines.append(f"filter add dev {DEV} parent {h}: prio 1 protocol ip u32 "
                         f"ht 3:{i:x}: match u32 0 0 flowid {h}:{0x200 + i:x}")
        with tempfile.NamedTemporaryFile("w", suffix=".tc", delete=False) as f:
            f.write("\n".join(lines) + "\n")
            batch = f.name
        try:
            run(["tc", "-batch", batch], timeout=120, what="tc -batch (netem classes)")
        finally:
            os.unlink(batch)

    def _delay_setup(self) -> None:
        ipt = _iptables()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.delay_proc = subprocess.Popen(
            [sys.executable, "-m", "bench.netem_delay", "--queue", str(QUEUE),
             "--delay-ms", str(self.delay_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(REPO))
        line = self.delay_proc.stdout.readline().decode().strip()
        if line != "ready":
            err = self.delay_proc.stderr.read().decode()[-1500:] if self.delay_proc.poll() \
                is not None else ""
            raise StepError(f"netem delay process did not start: {line!r} {err}")
        self._cpu0 = self.delay_cpu_s()
        base = ["-p", "tcp", "-d", self.addr, "--dport", str(self.port)]
        target = ["-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass"]
        for cmd in ([ipt, "-w", "-N", CHAIN],
                    [ipt, "-w", "-A", CHAIN, *base, "--syn", *target],
                    [ipt, "-w", "-A", CHAIN, *base, "-m", "length", "--length", "81:65535",
                     *target],
                    [ipt, "-w", "-I", "OUTPUT", "1", "-j", CHAIN]):
            run(cmd, timeout=30, what=" ".join(cmd[:4]))

    def delay_cpu_s(self) -> float:
        """CPU seconds (user+sys) the delay process used so far."""
        if self.delay_proc is None or self.delay_proc.poll() is not None:
            return 0.0
        try:
            st = proc_status(self.delay_proc.pid)
        except OSError:
            return 0.0
        return st["cpu_ticks"] / st["clk_tck"]

    def alive(self) -> bool:
        return self.delay_proc is not None and self.delay_proc.poll() is None


def wait_port(addr: str, port: int, timeout: float = 10) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
