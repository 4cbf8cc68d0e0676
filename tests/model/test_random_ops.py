"""fsx-style random operations on a real mount, every byte checked against a model.

One file at a time takes a seeded stream of operations (write at random offsets, appends,
ftruncate, writes through a shared mmap, copy_file_range from another file, reads, relists),
and after every close and reopen its whole content is compared with the model, through the
mount and at the origin. Fixed seeds, so a failure replays; one seed writes files of tens of
MiB so streaming uploads (parts already sent), local copies and the fall back to staging all
take turns. This is what found the truncate/release race of issue 13 (item 4) in outside
fsx runs.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import uuid
from pathlib import Path

import boto3
import pytest

from tests.conftest import OBJFS, Mounter

MiB = 1024 * 1024


class FileModel:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, offset: int, payload: bytes) -> None:
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset:offset + len(payload)] = payload

    def truncate(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))


def describe(got: bytes, want: bytes) -> str:
    """Where two contents part."""
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                 min(len(got), len(want)))
    return f"{len(got)} bytes, expected {len(want)}, first difference at {first}"


def pread_all(fd: int, size: int) -> bytes:
    chunks, pos = [], 0
    while pos < size:
        chunk = os.pread(fd, min(4 * MiB, size - pos), pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


def run_ops(seed: int, mount: Path, s3, bucket: str, steps: int, max_size: int) -> None:
    rng = random.Random(seed)
    name = f"f{seed}"
    path = mount / name
    model = FileModel()
    donor = mount / f"donor{seed}"
    donor_bytes = rng.randbytes(256 * 1024)
    donor.write_bytes(donor_bytes)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    history: list[str] = []

    def check(where: str) -> None:
        got = pread_all(fd, len(model.data) + 10)
        assert got == bytes(model.data), f"seed {seed} after {history[-5:]} ({where})"

    try:
        for step in range(steps):
            op = rng.choices(["write", "append", "truncate", "mmap", "copy", "read",
                              "reopen", "relist"], [30, 10, 8, 8, 6, 15, 10, 3])[0]
            size = len(model.data)
            if op == "write":
                offset = rng.randrange(0, min(max_size, size + 64 * 1024) + 1)
                length = rng.randrange(1, min(max_size // 4, 2 * MiB) + 1)
                payload = rng.randbytes(length)
                os.pwrite(fd, payload, offset)
                model.write(offset, payload)
                history.append(f"write({offset},{length})")
            elif op == "append":
                payload = rng.randbytes(rng.randrange(1, min(max_size // 4, 4 * MiB) + 1))
                os.pwrite(fd, payload, size)
                model.write(size, payload)
                history.append(f"append({len(payload)})")
            elif op == "truncate":
                new = rng.randrange(0, max_size + 1)
                os.ftruncate(fd, new)
                model.truncate(new)
                history.append(f"truncate({new})")
            elif op == "mmap" and size > 0:
                with mmap.mmap(fd, size) as mapped:
                    offset = rng.randrange(0, size)
                    length = rng.randrange(1, min(size - offset, 64 * 1024) + 1)
                    payload = rng.randbytes(length)
                    mapped[offset:offset + length] = payload
                    mapped.flush()
                model.write(offset, payload)
                history.append(f"mmap({offset},{length})")
            elif op == "copy":
                src = os.open(donor, os.O_RDONLY)
                try:
                    src_off = rng.randrange(0, len(donor_bytes))
                    length = rng.randrange(1, len(donor_bytes) - src_off + 1)
                    offset = rng.randrange(0, size + 1)
                    done = 0
                    while done < length:
                        n = os.copy_file_range(src, fd, length - done, src_off + done,
                                               offset + done)
                        assert n > 0
                        done += n
                finally:
                    os.close(src)
                model.write(offset, donor_bytes[src_off:src_off + length])
                history.append(f"copy({src_off},{length},{offset})")
            elif op == "read":
                offset = rng.randrange(0, size + 1)
                length = rng.randrange(0, 512 * 1024)
                got = os.pread(fd, length, offset)
                assert got == bytes(model.data[offset:offset + length]), \
                    f"seed {seed} step {step}: read({offset},{length}) after {history[-5:]}"
                history.append(f"read({offset},{length})")
            elif op == "reopen":
                check("before close")
                os.close(fd)
                fd = -1
                obj = s3.get_object(Bucket=bucket, Key=name)["Body"].read()
                assert obj == bytes(model.data), \
                    f"seed {seed} step {step}: the origin differs after close " \
                    f"{history[-8:]}: {describe(obj, bytes(model.data))}"
                fd = os.open(path, os.O_RDWR)
                check("after reopen")
                history.append("reopen")
            elif op == "relist":
                result = subprocess.run([OBJFS, "refresh", str(mount)], capture_output=True,
                                        text=True, timeout=60)
                assert result.returncode == 0, result.stderr
                history.append("relist")
        check("at the end")
    finally:
        if fd >= 0:
            os.close(fd)
    obj = s3.get_object(Bucket=bucket, Key=name)["Body"].read()
    assert obj == bytes(model.data), f"seed {seed}: the origin differs at the end"
    assert path.read_bytes() == bytes(model.data)


@pytest.fixture
def random_mount(s3_endpoint: str, tmp_path: Path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"fsx-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    mounter = Mounter(tmp_path, s3_endpoint)
    try:
        yield mounter(f"s3://{bucket}"), s3, bucket
    finally:
        mounter.cleanup()


@pytest.mark.parametrize("seed,steps,max_size", [(1, 150, 3 * MiB), (2, 150, 3 * MiB),
                                                 (3, 150, 512 * 1024), (4, 40, 24 * MiB)])
def test_random_operations_keep_every_byte(random_mount, seed: int, steps: int,
                                            max_size: int) -> None:
    mount, s3, bucket = random_mount
    run_ops(seed, mount.path, s3, bucket, steps, max_size)
