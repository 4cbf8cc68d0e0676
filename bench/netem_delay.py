"""The delay line of the emulated network: holds each packet of an NFQUEUE queue for a fixed time.

    python -m bench.netem_delay --queue 7 --delay-ms 20

bench/netem.py starts it (as root) after adding iptables rules that send the client->origin
packets carrying a SYN or a payload to queue 7; every such packet is accepted ``delay-ms``
after it was queued, in arrival order, so each request (and each new connection) reaches the
server that much later: the "tens of ms to first byte" of a real object store. Pure ACKs are not
queued, so the server's sending rate is not held back by delayed ACKs, and only the per-request
latency changes. Uses the netfilterqueue package (libnetfilter-queue) in metadata-only copy
mode, one thread: ~1% of a core at thousands of packets per second.

Prints ``ready`` once bound; exits on SIGTERM/SIGINT after releasing every held packet.
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    a = p.parse_args()
    from netfilterqueue import COPY_META, NetfilterQueue

    delay = a.delay_ms / 1000.0
    held: collections.deque = collections.deque()
    stop = False

    def on_packet(pkt) -> None:
        held.append((time.monotonic() + delay, pkt))

    def on_signal(signum, frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    nfq = NetfilterQueue()
    nfq.bind(a.queue, on_packet, max_len=50_000, mode=COPY_META)
    fd = nfq.get_fd()
    print("ready", flush=True)
    packets = 0
    try:
        while not stop:
            now = time.monotonic()
            while held and held[0][0] <= now:
                held.popleft()[1].accept()
                packets += 1
            timeout = max(0.0, held[0][0] - now) if held else 0.5
            try:
                r, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if r:
                nfq.run(block=False)
    finally:
        while held:
            held.popleft()[1].accept()
        nfq.unbind()
        print(f"released {packets} packets", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
