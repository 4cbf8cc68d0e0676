#!/usr/bin/env python3
"""Read many files whole with N threads, like a data loader walking an index of samples.

    python bench/scripts/readfiles.py --threads 16 --list FILE   (one path per line)
    python bench/scripts/readfiles.py --threads 8 --shuffle 1 --list FILE

Each thread takes the next path, opens it, reads it to EOF in 1 MiB reads and closes it
(``os.read`` releases the GIL, so the threads overlap their I/O). ``--shuffle SEED`` reads
the paths in a random order drawn from SEED (a DataLoader with ``shuffle=True``: the next
sample is anywhere in the dataset) instead of the listed order. Prints one JSON line:
files, bytes, seconds, files_per_s, MBps, errors (first few, with errno names).
Exit status 1 if any file failed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import sys
import threading
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--list", required=True, help="file with one path per line ('-': stdin)")
    p.add_argument("--shuffle", type=int, metavar="SEED",
                   help="read the paths in a random order drawn from SEED")
    a = p.parse_args()
    src = sys.stdin if a.list == "-" else open(a.list)
    paths = [line.rstrip("\n") for line in src if line.strip()]
    if a.shuffle is not None:
        random.Random(a.shuffle).shuffle(paths)
    lock = threading.Lock()
    state = {"next": 0, "bytes": 0, "files": 0}
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                i = state["next"]
                state["next"] = i + 1
            if i >= len(paths):
                return
            n = 0
            try:
                fd = os.open(paths[i], os.O_RDONLY)
                try:
                    while True:
                        chunk = os.read(fd, 1 << 20)
                        if not chunk:
                            break
                        n += len(chunk)
                finally:
                    os.close(fd)
            except OSError as e:
                with lock:
                    if len(errors) < 5:
                        errors.append(f"{paths[i]}: {errno.errorcode.get(e.errno, e.errno)} "
                                      f"{e.strerror}")
                    state.setdefault("failed", 0)
                    state["failed"] += 1
                continue
            with lock:
                state["bytes"] += n
                state["files"] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    out = {"files": state["files"], "bytes": state["bytes"], "seconds": secs,
           "files_per_s": state["files"] / secs, "MBps": state["bytes"] / 1e6 / secs,
           "failed": state.get("failed", 0), "errors": errors, "threads": a.threads,
           "shuffle": a.shuffle}
    print(json.dumps(out))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
