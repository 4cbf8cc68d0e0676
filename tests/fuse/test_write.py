"""Real mounts over moto (through the fault proxy): the write path and namespace operations.

Every check that matters is made at the origin (boto3 against the S3 server, and the requests
the proxy saw on the wire), and again through the mount, before and after a remount. moto
enforces S3's 5 MiB minimum part size, so a part schedule that broke it would fail here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.exceptions import ClientError

from tests.conftest import Mount, process_alive, run_objfs

MiB = 1024 * 1024
PART = 8 * MiB  # the default --part-size
SMALL_SIZES = [0, 1, 4 * MiB - 1, 4 * MiB, 4 * MiB + 1]
LARGE_SIZE = 8 * PART + 12345  # nine parts: eight of 8 MiB and a short last one


# ---- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def mount_rw(mounter, bucket, proxy) -> Callable[..., Mount]:
    """mount_rw(*flags): the test's bucket mounted read-write through the fault proxy."""
    def mount(*flags: str) -> Mount:
        return mounter(f"s3://{bucket}", *flags, endpoint=proxy.endpoint)
    return mount


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def origin(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def origin_missing(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in ("404", "NoSuchKey"), exc.response
        return True
    return False


def origin_keys(s3, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def open_uploads(s3, bucket: str) -> list[dict]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def read_through(path: Path) -> bytes:
    """The file's bytes through the mount, in 1 MiB reads on a fresh handle."""
    with open(path, "rb", buffering=0) as f:
        parts = []
        while piece := f.read(MiB):
            parts.append(piece)
        return b"".join(parts)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def requests_for(proxy, key: str, *kinds: str) -> list[tuple[str, dict[str, list[str]], int]]:
    """(kind, query, request body bytes) of the forwarded requests on ``key``."""
    out = []
    for kind, path_qs, size in list(proxy.sizes):
        url = urlsplit(path_qs)
        if url.path.split("/", 2)[-1] == key and (not kinds or kind in kinds):
            out.append((kind, parse_qs(url.query), size))
    return out


def part_sizes(proxy, key: str) -> list[int]:
    """Body sizes of the UploadParts of ``key`` in part-number order (each number once)."""
    parts = {int(q["partNumber"][0]): size for _, q, size in requests_for(proxy, key,
                                                                          "upload_part")}
    assert sorted(parts) == list(range(1, len(parts) + 1)), sorted(parts)
    return [parts[n] for n in sorted(parts)]


def write_dd(src: Path, dst: Path, *conv: str) -> None:
    cmd = ["dd", f"if={src}", f"of={dst}", "bs=1M", "status=none", *conv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def write_python(data: bytes, dst: Path, chunk: int = MiB + 4093) -> None:
    with open(dst, "wb") as f:
        for start in range(0, len(data), chunk):
            f.write(data[start:start + chunk])


WRITERS = ["dd", "dd-fsync", "python"]


def write_with(writer: str, data: bytes, dst: Path, scratch: Path) -> None:
    if writer == "python":
        write_python(data, dst)
        return
    src = scratch / f"src-{dst.name}"
    src.write_bytes(data)
    write_dd(src, dst, *(["conv=fsync"] if writer == "dd-fsync" else []))
    src.unlink()


def errno_of(action: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        action()
    return info.value.errno


# ---- 1. byte-exact round trips ---------------------------------------------------------------

def test_small_files_round_trip_as_one_put_each(s3, bucket, proxy, mount_rw, mounter,
                                                tmp_path):
    mount = mount_rw()
    files = {f"{writer}/{size}.bin": data_of(size, size)
             for writer in WRITERS for size in SMALL_SIZES}
    for writer in WRITERS:
        (mount.path / writer).mkdir()
    proxy.reset()
    for key, data in files.items():
        write_with(key.split("/")[0], data, mount.path / key, tmp_path)
    for key, data in files.items():
        assert origin(s3, bucket, key) == data, key
        assert os.stat(mount.path / key).st_size == len(data)
        assert read_through(mount.path / key) == data, key
    mounter.remount(mount)
    for key, data in files.items():
        assert os.stat(mount.path / key).st_size == len(data)
        assert read_through(mount.path / key) == data, key
    assert proxy.requests["create_multipart"] == proxy.requests["upload_part"] == 0
    for key, data in files.items():
        # A file smaller than one part is exactly one PUT of its bytes, nothing multipart
        # (dd closes a dup of its output descriptor before it writes anything).
        assert [(kind, size) for kind, _, size in requests_for(proxy, key, "put")] == \
            [("put", len(data))], key


def test_closing_a_duplicate_descriptor_publishes_nothing(s3, bucket, proxy, mount_rw):
    """What dd and every shell redirection do: open, dup2 onto stdout, close the original
    (a FUSE flush), then write. The object must appear once, with its data, at the last
    close; and an existing object must not be replaced by an empty one on the way."""
    old = b"the previous checkpoint"
    s3.put_object(Bucket=bucket, Key="old.bin", Body=old)
    mount = mount_rw()
    proxy.reset()
    data = data_of(PART + 5, 8)
    for name in ("new.bin", "old.bin"):
        fd = os.open(mount.path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        dup = os.dup(fd)
        os.close(fd)  # flush of a handle that stays open through ``dup``
        try:
            if name == "new.bin":
                assert origin_missing(s3, bucket, "new.bin")
            else:
                assert origin(s3, bucket, "old.bin") == old
            os.write(dup, data)
        finally:
            os.close(dup)
        assert origin(s3, bucket, name) == data
        assert read_through(mount.path / name) == data
    assert proxy.requests["put"] == 0


@pytest.mark.parametrize("writer", WRITERS)
def test_large_file_streams_out_as_8_MiB_parts(writer, s3, bucket, proxy, mount_rw, mounter,
                                               tmp_path):
    mount = mount_rw()
    data = data_of(LARGE_SIZE, 7)
    proxy.reset()
    write_with(writer, data, mount.path / "large.bin", tmp_path)
    assert md5(origin(s3, bucket, "large.bin")) == md5(data)
    assert open_uploads(s3, bucket) == []
    assert os.stat(mount.path / "large.bin").st_size == LARGE_SIZE
    assert md5(read_through(mount.path / "large.bin")) == md5(data)
    assert part_sizes(proxy, "large.bin") == [PART] * 8 + [12345]
    assert proxy.requests["create_multipart"] == 1
    assert proxy.requests["complete_multipart"] == 1
    assert proxy.requests["abort_multipart"] == 0
    # Nothing but the parts: no PUT (dd closes a dup of its output descriptor before writing).
    assert proxy.requests["put"] == 0
    if writer == "python":  # the read path after a remount does not depend on the writer
        mounter.remount(mount)
        assert md5(read_through(mount.path / "large.bin")) == md5(data)


def test_object_appears_only_at_close(s3, bucket, proxy, mount_rw):
    mount = mount_rw()
    data = data_of(3 * PART + 777, 11)
    path = mount.path / "ckpt" / "model.pt"
    path.parent.mkdir()
    proxy.reset()
    with open(path, "wb") as f:
        f.write(data[:2 * PART + 100])
        wait_for(lambda: len(requests_for(proxy, "ckpt/model.pt", "upload_part")) >= 2,
                 what="two parts uploaded while the file is open")
        # Two parts are at the origin, but no object: not by HEAD, not in a listing.
        assert origin_missing(s3, bucket, "ckpt/model.pt")
        assert origin_keys(s3, bucket) == ["ckpt/"]
        assert [u["Key"] for u in open_uploads(s3, bucket)] == ["ckpt/model.pt"]
        # This host sees the file being written, with its current size.
        assert os.stat(path).st_size == 2 * PART + 100
        f.write(data[2 * PART + 100:])
    assert origin(s3, bucket, "ckpt/model.pt") == data
    assert open_uploads(s3, bucket) == []
    assert part_sizes(proxy, "ckpt/model.pt") == [PART, PART, PART, 777]
    etag = s3.head_object(Bucket=bucket, Key="ckpt/model.pt")["ETag"]
    assert os.getxattr(path, "user.objfs.etag").decode() == etag


def test_truncating_overwrite_of_a_cached_object_shows_the_new_bytes(s3, bucket, proxy,
                                                                      mount_rw, tmp_path):
    old = data_of(2 * PART + 5, 1)
    s3.put_object(Bucket=bucket, Key="w.bin", Body=old)
    mount = mount_rw()
    assert read_through(mount.path / "w.bin") == old  # now in the page cache and the kernel's
    new = data_of(PART + 3, 2)
    proxy.reset()
    write_with("dd", new, mount.path / "w.bin", tmp_path)  # O_TRUNC: a sequential overwrite
    assert part_sizes(proxy, "w.bin") == [PART, 3]
    assert proxy.requests["get"] == 0  # nothing of the old object was downloaded
    assert origin(s3, bucket, "w.bin") == new
    assert os.stat(mount.path / "w.bin").st_size == len(new)
    assert read_through(mount.path / "w.bin") == new
    short = b"short now"
    (mount.path / "w.bin").write_bytes(short)
    assert origin(s3, bucket, "w.bin") == short
    assert read_through(mount.path / "w.bin") == short



def test_truncate_right_after_closing_an_unwritten_file_is_kept(s3, bucket, proxy, mount_rw):
    """`touch f; truncate -s 398 f`: the empty file is published by the release that follows
    its close (asynchronously: close(2) does not wait for it); a truncate arriving while
    that release is uploading must not be lost. The PUT is held for a second so the
    truncate always lands in that window."""
    mount = mount_rw()
    path = mount.path / "touched"
    proxy.delay_next("put", 1, 1.0)
    open(path, "ab").close()  # created, nothing written
    os.truncate(path, 398)
    assert os.stat(path).st_size == 398
    assert read_through(path) == b"\0" * 398
    wait_for(lambda: proxy.inflight["put"] == 0, what="the PUTs to finish")
    assert origin(s3, bucket, "touched") == b"\0" * 398


def test_unlink_right_after_closing_an_unwritten_file_leaves_no_object(s3, bucket, proxy,
                                                                       mount_rw, mounter):
    """`touch lock; rm lock`: the unlink arrives while the release that publishes the empty
    file is uploading it (held for a second); the object must not outlive the file."""
    mount = mount_rw()
    proxy.delay_next("put", 1, 1.0)
    open(mount.path / "lock", "ab").close()
    os.unlink(mount.path / "lock")
    assert os.listdir(mount.path) == []
    wait_for(lambda: proxy.inflight["put"] == 0, what="the PUTs to finish")
    assert origin_keys(s3, bucket) == []
    mounter.remount(mount)
    result = run_objfs("refresh", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert os.listdir(mount.path) == []


def test_chmod_right_after_closing_an_unwritten_file_reaches_the_object(s3, bucket, proxy,
                                                                        mount_rw):
    """`touch f; chmod 600 f`, the chmod arriving while the release publishes the empty
    file (PUT held for a second): the mode must end up on the object."""
    mount = mount_rw()
    path = mount.path / "private"
    proxy.delay_next("put", 1, 1.0)
    open(path, "ab").close()
    os.chmod(path, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    wait_for(lambda: proxy.inflight["put"] == 0 and proxy.inflight["copy"] == 0,
             what="the PUTs to finish")
    assert meta(s3, bucket, "private")["mode"] == str(stat.S_IFREG | 0o600)

# ---- 2. concurrent writers -------------------------------------------------------------------

def test_files_written_concurrently_are_all_correct(s3, bucket, proxy, mount_rw):
    mount = mount_rw("--upload-concurrency", "4")
    sizes = [PART + 1, 2 * PART, 3 * MiB, PART + 4 * MiB + 3, 0, 5 * MiB]
    files = {f"par/f{i}.bin": data_of(size, 100 + i) for i, size in enumerate(sizes)}
    (mount.path / "par").mkdir()
    errors: list[BaseException] = []
    start = threading.Barrier(len(files))

    def writer(i: int, key: str, data: bytes) -> None:
        try:
            start.wait(10)
            write_python(data, mount.path / key, chunk=[4096, 128 * 1024, MiB, 3 * MiB + 1,
                                                        777, 65536][i])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, key, data))
               for i, (key, data) in enumerate(files.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(os.listdir(mount.path / "par")) == sorted(k.split("/")[1] for k in files)
    for key, data in files.items():
        assert md5(origin(s3, bucket, key)) == md5(data), key
        assert md5(read_through(mount.path / key)) == md5(data), key
    assert open_uploads(s3, bucket) == []
    assert proxy.max_inflight["upload_part"] > 1  # the files' parts did overlap


# ---- 3. memory bound -------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_daemon_memory_stays_within_the_write_buffer(s3, bucket, mount_rw):
    budget = 16 * MiB
    size = 8 * budget
    mount = mount_rw("--write-buffer", "16M", "--upload-concurrency", "8")
    pid = mount.pid
    write_python(data_of(PART + 1, 5), mount.path / "warmup.bin")  # load the upload code paths
    idle = rss_bytes(pid)
    peak = idle
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    block = data_of(MiB, 6)
    digest = hashlib.md5()
    try:
        with open(mount.path / "big.bin", "wb") as f:
            for i in range(size // MiB):
                chunk = i.to_bytes(4, "big") + block[4:]
                digest.update(chunk)
                f.write(chunk)
    finally:
        stop.set()
        sampler.join()
    growth = peak - idle
    print(f"daemon RSS {idle / MiB:.0f} MiB idle, peak {peak / MiB:.0f} MiB writing "
          f"{size // MiB} MiB with a {budget // MiB} MiB write buffer")
    assert growth < budget + 64 * MiB, f"RSS grew by {growth / MiB:.0f} MiB writing " \
                                       f"{size // MiB} MiB with a {budget // MiB} MiB budget"
    result = run_objfs("stats", str(mount.path), "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["upload_budget_limit_bytes"] == budget
    assert metrics["upload_bytes"] >= size + PART + 1
    assert metrics["upload_parts_total"] >= size // PART
    assert metrics["upload_bytes_buffered"] == 0  # everything handed back after close
    body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"]
    got = hashlib.md5()
    for piece in body.iter_chunks(MiB):
        got.update(piece)
    assert got.hexdigest() == digest.hexdigest()
    assert os.stat(mount.path / "big.bin").st_size == size


# ---- 4. failures -----------------------------------------------------------------------------

def test_failing_upload_part_gives_eio_at_close_and_leaves_nothing(s3, bucket, proxy,
                                                                    mount_rw, mounter):
    mount = mount_rw()
    data = data_of(PART + 1, 3)
    proxy.reset()
    proxy.fail_next("upload_part", 10**6, 503, "SlowDown")  # every attempt, after retries too
    fd = os.open(mount.path / "fail.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == len(data)  # part 1 is shipped; its failure comes later
    finally:
        assert errno_of(lambda: os.close(fd)) == errno.EIO
    assert proxy.requests["upload_part"] > 2  # retried before giving up
    assert proxy.requests["abort_multipart"] >= 1
    assert proxy.requests["complete_multipart"] == 0
    assert origin_missing(s3, bucket, "fail.bin")
    assert open_uploads(s3, bucket) == []
    # Never shown with the bytes that were lost, here or after a remount.
    assert os.stat(mount.path / "fail.bin").st_size == 0
    mounter.remount(mount)
    names = os.listdir(mount.path)
    if "fail.bin" in names:
        assert os.stat(mount.path / "fail.bin").st_size == 0
        assert read_through(mount.path / "fail.bin") == b""
    assert origin_missing(s3, bucket, "fail.bin")
    result = run_objfs("refresh", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert "fail.bin" not in os.listdir(mount.path)


@pytest.mark.parametrize("writer", ["python", "dd"])
def test_failed_overwrite_keeps_the_previous_object(writer, s3, bucket, proxy, mount_rw,
                                                    tmp_path):
    old = data_of(PART + 10, 20)
    s3.put_object(Bucket=bucket, Key="keep.bin", Body=old)
    mount = mount_rw()
    proxy.fail_next("upload_part", 10**6, 500, "InternalError")
    new = data_of(2 * PART + 1, 21)
    if writer == "python":
        with pytest.raises(OSError) as info:
            with open(mount.path / "keep.bin", "wb") as f:
                f.write(new)
        assert info.value.errno == errno.EIO
    else:
        (tmp_path / "new.bin").write_bytes(new)
        result = subprocess.run(["dd", f"if={tmp_path / 'new.bin'}",
                                 f"of={mount.path / 'keep.bin'}", "bs=1M", "status=none"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Input/output error" in result.stderr
    assert open_uploads(s3, bucket) == []
    assert origin(s3, bucket, "keep.bin") == old
    proxy.reset()
    assert os.stat(mount.path / "keep.bin").st_size == len(old)
    assert read_through(mount.path / "keep.bin") == old


def test_failing_put_of_a_small_file_gives_eio_and_no_object(s3, bucket, proxy, mount_rw,
                                                            mounter):
    mount = mount_rw()
    proxy.fail_next("put", 10**6, 503, "SlowDown")
    fd = os.open(mount.path / "small.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"x" * 1000)
    finally:
        assert errno_of(lambda: os.close(fd)) == errno.EIO
    assert proxy.requests["put"] > 2
    assert origin_missing(s3, bucket, "small.txt")
    assert os.stat(mount.path / "small.txt").st_size == 0
    proxy.reset()
    # A transient failure is retried and the file published whole.
    proxy.fail_next("upload_part", 2, 503, "SlowDown")
    data = data_of(2 * PART + 9, 30)
    write_python(data, mount.path / "retried.bin")
    assert origin(s3, bucket, "retried.bin") == data
    assert open_uploads(s3, bucket) == []
    mounter.remount(mount)
    if "small.txt" in os.listdir(mount.path):
        assert read_through(mount.path / "small.txt") == b""
    assert read_through(mount.path / "retried.bin") == data


def test_a_daemon_killed_mid_write_publishes_nothing_and_the_next_start_aborts_its_upload(
        s3, bucket, mount_rw, mounter, proxy):
    """kill -9 while a checkpoint is half uploaded: nothing partial is published, objects
    published before are intact, and the multipart upload the dead daemon left (its parts are
    stored, and billed) is aborted by the next mount of the same cache dir."""
    earlier = data_of(3 * MiB, 40)
    s3.put_object(Bucket=bucket, Key="earlier.bin", Body=earlier)
    mount = mount_rw()
    closed = data_of(PART + 5, 41)
    (mount.path / "closed.bin").write_bytes(closed)   # published through the mount
    pid = mount.pid
    fd = os.open(mount.path / "ckpt.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data_of(3 * PART, 42))
        wait_for(lambda: proxy.requests["upload_part"] >= 2 + 2, what="parts of ckpt.bin")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), what="the daemon to die")
        with pytest.raises(OSError) as err:
            os.write(fd, b"more")
        assert err.value.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["ckpt.bin"]   # left behind by the dead daemon
    assert origin_missing(s3, bucket, "ckpt.bin")
    result = run_objfs("umount", str(mount.path))     # the dead mount
    assert result.returncode == 0, result.stderr
    result = run_objfs(*mount.args)                   # the same cache dir
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"),
             what="the leftover upload to be aborted")
    assert origin_missing(s3, bucket, "ckpt.bin")
    assert origin(s3, bucket, "earlier.bin") == earlier
    assert origin(s3, bucket, "closed.bin") == closed
    assert (mount.path / "closed.bin").read_bytes() == closed
    assert not (mount.path / "ckpt.bin").exists()
    log = (mount.cache_dir / "objfs.log").read_text()
    assert "1 multipart upload(s) left unfinished by a previous run" in log
    assert "did not stop cleanly" in log          # relisted: the unpublished file is swept
    assert list((mount.cache_dir / "uploads").iterdir()) == []


# ---- 6. random writes fall back to a staged file ---------------------------------------------

def mirror_random_ops(rng: random.Random, mfd: int, lfd: int, steps: int, max_size: int,
                      on_fsync: Callable[[], None]) -> None:
    """Apply the same seeded pwrite/ftruncate/pread/fsync sequence to a file on the mount
    (``mfd``) and a local one (``lfd``); every read and size must agree as it goes."""
    for step in range(steps):
        size = os.fstat(lfd).st_size
        assert os.fstat(mfd).st_size == size, step
        op = rng.choices(["write", "truncate", "read", "fsync"], weights=[50, 10, 38, 2])[0]
        if op == "write":
            n = rng.choice([1, 17, 4096, 65536 + 3, 200_000, MiB + 5])
            offset = min(rng.choice([rng.randrange(0, size + 1), rng.randrange(0, max_size)]),
                         max_size - n)
            data = rng.randbytes(n)
            assert os.pwrite(mfd, data, offset) == os.pwrite(lfd, data, offset) == n
        elif op == "truncate":
            length = rng.choice([0, rng.randrange(0, size + 1), rng.randrange(0, max_size)]) \
                if rng.random() < 0.2 else rng.randrange(size // 2, max(size, 1) * 3 // 2 + 1)
            length = min(length, max_size)
            os.ftruncate(mfd, length)
            os.ftruncate(lfd, length)
        elif op == "read":
            n = rng.choice([1, 100, 4096, 300_000, MiB, 3 * MiB])
            offset = rng.randrange(0, size + 100)
            assert os.pread(mfd, n, offset) == os.pread(lfd, n, offset), (step, offset, n)
        else:
            os.fsync(mfd)  # publishes what is written so far; writing goes on afterwards
            on_fsync()


def test_random_writes_match_a_local_file(s3, bucket, proxy, mount_rw, mounter, tmp_path):
    existing = data_of(PART + MiB + 3, 40)
    s3.put_object(Bucket=bucket, Key="existing.bin", Body=existing)
    s3.put_object(Bucket=bucket, Key="append.txt", Body=b"first line\n")
    mount = mount_rw()
    max_size = 10 * MiB
    expected: dict[str, bytes] = {}
    for seed, name in enumerate(["new.bin", "existing.bin", "streamed.bin"]):
        local = tmp_path / name
        if name == "existing.bin":
            local.write_bytes(existing)
            flags = os.O_RDWR
        else:
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        mfd = os.open(mount.path / name, flags, 0o644)
        lfd = os.open(local, flags, 0o644)

        def local_bytes(local: Path = local) -> bytes:
            return local.read_bytes()

        def check_origin(name: str = name, local_bytes: Callable[[], bytes] = local_bytes) \
                -> None:
            assert origin(s3, bucket, name) == local_bytes(), f"{name} after fsync"

        try:
            if name == "streamed.bin":
                # Two parts leave as a multipart upload before the first seek back.
                head = data_of(2 * PART + 100, 41)
                assert os.write(mfd, head) == os.write(lfd, head)
            mirror_random_ops(random.Random(seed), mfd, lfd, steps=120, max_size=max_size,
                              on_fsync=check_origin)
        finally:
            os.close(lfd)
            os.close(mfd)
        expected[name] = local.read_bytes()
    with open(mount.path / "append.txt", "ab") as f:
        f.write(b"second line\n")
    expected["append.txt"] = b"first line\nsecond line\n"
    for name, data in expected.items():
        assert md5(origin(s3, bucket, name)) == md5(data), name
        assert os.stat(mount.path / name).st_size == len(data), name
        assert md5(read_through(mount.path / name)) == md5(data), name
    assert open_uploads(s3, bucket) == []
    mounter.remount(mount)
    for name, data in expected.items():
        assert md5(read_through(mount.path / name)) == md5(data), name


# ---- 7. namespace operations -----------------------------------------------------------------

def meta(s3, bucket: str, key: str) -> dict[str, str]:
    return s3.head_object(Bucket=bucket, Key=key)["Metadata"]


def test_mkdir_rmdir_unlink_and_their_errors(s3, bucket, mount_rw, mounter):
    mount = mount_rw()
    root = mount.path
    os.mkdir(root / "d", 0o750)
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o750
    assert meta(s3, bucket, "d/")["mode"] == str(stat.S_IFDIR | 0o750)
    assert errno_of(lambda: os.mkdir(root / "d")) == errno.EEXIST
    (root / "d" / "f.txt").write_bytes(b"hi")
    assert errno_of(lambda: os.rmdir(root / "d")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rmdir(root / "d" / "f.txt")) == errno.ENOTDIR
    assert errno_of(lambda: os.rmdir(root / "missing")) == errno.ENOENT
    assert errno_of(lambda: os.unlink(root / "d")) == errno.EISDIR
    assert errno_of(lambda: os.unlink(root / "d" / "missing")) == errno.ENOENT
    assert errno_of(lambda: os.mkdir(root / "d" / "f.txt" / "x")) == errno.ENOTDIR
    assert origin_keys(s3, bucket) == ["d/", "d/f.txt"]
    os.unlink(root / "d" / "f.txt")
    assert os.listdir(root / "d") == []
    assert origin_keys(s3, bucket) == ["d/"]
    os.rmdir(root / "d")
    assert not (root / "d").exists()
    assert origin_keys(s3, bucket) == []
    os.makedirs(root / "a" / "b" / "c")
    (root / "a" / "b" / "c" / "leaf").write_bytes(b"leaf")
    assert origin_keys(s3, bucket) == ["a/", "a/b/", "a/b/c/", "a/b/c/leaf"]
    # A file unlinked while open for writing is not resurrected by its close.
    with open(root / "a" / "gone.bin", "wb") as f:
        f.write(b"x" * 1000)
        os.unlink(root / "a" / "gone.bin")
        f.write(b"y" * 1000)
    assert sorted(os.listdir(root / "a")) == ["b"]
    assert origin_keys(s3, bucket) == ["a/", "a/b/", "a/b/c/", "a/b/c/leaf"]
    mounter.remount(mount)
    assert sorted(os.listdir(root / "a")) == ["b"]
    assert stat.S_ISDIR(os.stat(root / "a" / "b" / "c").st_mode)
    assert (root / "a" / "b" / "c" / "leaf").read_bytes() == b"leaf"


def test_rename_of_files_and_directories(s3, bucket, mount_rw, mounter):
    mount = mount_rw()
    root = mount.path
    (root / "a.txt").write_bytes(b"AAA")
    (root / "b.txt").write_bytes(b"BB")
    os.rename(root / "a.txt", root / "b.txt")  # replaces the target file
    assert sorted(os.listdir(root)) == ["b.txt"]
    assert (root / "b.txt").read_bytes() == b"AAA"
    assert origin_keys(s3, bucket) == ["b.txt"] and origin(s3, bucket, "b.txt") == b"AAA"
    os.mkdir(root / "dir")
    assert errno_of(lambda: os.rename(root / "b.txt", root / "dir")) == errno.EISDIR
    assert errno_of(lambda: os.rename(root / "dir", root / "b.txt")) == errno.ENOTDIR
    assert errno_of(lambda: os.rename(root / "nope", root / "x")) == errno.ENOENT
    os.rename(root / "b.txt", root / "dir" / "c.txt")
    assert origin_keys(s3, bucket) == ["dir/", "dir/c.txt"]
    # A file renamed while it is being written ends up whole under its new name.
    with open(root / "dir" / "w.bin", "wb") as f:
        f.write(b"1" * 100)
        os.rename(root / "dir" / "w.bin", root / "dir" / "moved.bin")
        f.write(b"2" * 100)
    assert (root / "dir" / "moved.bin").read_bytes() == b"1" * 100 + b"2" * 100
    assert origin(s3, bucket, "dir/moved.bin") == b"1" * 100 + b"2" * 100
    # Directories: everything below moves at the origin.
    os.makedirs(root / "src" / "sub")
    (root / "src" / "x").write_bytes(b"x")
    (root / "src" / "sub" / "y").write_bytes(b"y")
    os.mkdir(root / "full")
    (root / "full" / "z").write_bytes(b"z")
    assert errno_of(lambda: os.rename(root / "src", root / "full")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rename(root / "src", root / "src" / "sub" / "in")) == \
        errno.EINVAL
    os.mkdir(root / "empty")
    os.rename(root / "src", root / "empty")  # replaces an empty directory
    assert sorted(os.listdir(root)) == ["dir", "empty", "full"]
    assert sorted(os.listdir(root / "empty")) == ["sub", "x"]
    assert (root / "empty" / "sub" / "y").read_bytes() == b"y"
    assert origin_keys(s3, bucket) == ["dir/", "dir/c.txt", "dir/moved.bin", "empty/",
                                       "empty/sub/", "empty/sub/y", "empty/x", "full/",
                                       "full/z"]
    mounter.remount(mount)
    assert sorted(os.listdir(root / "empty")) == ["sub", "x"]
    assert (root / "empty" / "x").read_bytes() == b"x"
    # A file being written inside a directory that is renamed goes on under the new name.
    os.mkdir(root / "open")
    with open(root / "open" / "f.bin", "wb", buffering=0) as f:
        f.write(b"1" * 100)
        os.rename(root / "open", root / "renamed")
        f.write(b"2" * 100)
    assert sorted(os.listdir(root / "renamed")) == ["f.bin"]
    assert not (root / "open").exists()
    assert (root / "renamed" / "f.bin").read_bytes() == b"1" * 100 + b"2" * 100
    assert origin(s3, bucket, "renamed/f.bin") == b"1" * 100 + b"2" * 100
    assert not [k for k in origin_keys(s3, bucket) if k.startswith("open/")]


def test_directory_rename_over_the_limit_is_exdev_and_mv_copies(s3, bucket, mount_rw):
    mount = mount_rw("--rename-dir-limit", "2")
    root = mount.path
    os.mkdir(root / "small")
    (root / "small" / "1").write_bytes(b"1")  # two objects: small/ and small/1
    os.rename(root / "small", root / "small2")
    assert origin_keys(s3, bucket) == ["small2/", "small2/1"]
    os.mkdir(root / "big")
    (root / "big" / "1").write_bytes(b"one")
    (root / "big" / "2").write_bytes(b"two")  # three objects
    assert errno_of(lambda: os.rename(root / "big", root / "moved")) == errno.EXDEV
    assert sorted(os.listdir(root / "big")) == ["1", "2"]
    result = subprocess.run(["mv", str(root / "big"), str(root / "moved")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(root)) == ["moved", "small2"]
    assert (root / "moved" / "2").read_bytes() == b"two"
    assert origin_keys(s3, bucket) == ["moved/", "moved/1", "moved/2", "small2/", "small2/1"]
    assert origin(s3, bucket, "moved/1") == b"one"


def test_symlinks_links_and_special_files(s3, bucket, mount_rw, mounter):
    mount = mount_rw()
    root = mount.path
    os.mkdir(root / "data")
    (root / "data" / "target.txt").write_bytes(b"through the link")
    os.symlink("data/target.txt", root / "link")
    os.symlink("../nowhere", root / "data" / "dangling")
    assert os.readlink(root / "link") == "data/target.txt"
    assert stat.S_ISLNK(os.lstat(root / "link").st_mode)
    assert (root / "link").read_bytes() == b"through the link"
    assert os.readlink(root / "data" / "dangling") == "../nowhere"
    assert not (root / "data" / "dangling").exists()
    assert origin(s3, bucket, "link") == b"data/target.txt"
    assert meta(s3, bucket, "link")["mode"] == str(stat.S_IFLNK | 0o777)
    assert errno_of(lambda: os.symlink("x", root / "link")) == errno.EEXIST
    assert errno_of(lambda: os.readlink(root / "data" / "target.txt")) == errno.EINVAL
    assert errno_of(lambda: os.link(root / "data" / "target.txt", root / "hard")) == \
        errno.EPERM
    assert errno_of(lambda: os.mkfifo(root / "fifo")) == errno.EPERM
    assert errno_of(lambda: os.mknod(root / "sock", stat.S_IFSOCK | 0o600)) == errno.EPERM
    assert errno_of(lambda: os.setxattr(root / "data" / "target.txt", "user.x", b"1")) == \
        errno.ENOTSUP
    assert sorted(os.listdir(root)) == ["data", "link"]
    mounter.remount(mount)
    assert os.readlink(root / "link") == "data/target.txt"
    assert (root / "link").read_bytes() == b"through the link"


T1 = 1_600_000_000_500_000_000  # ns
T2 = 1_500_000_000_000_000_000


def test_chmod_chown_utime_and_truncate_are_kept(s3, bucket, mount_rw, mounter):
    s3.put_object(Bucket=bucket, Key="listed.bin", Body=b"0123456789")
    mount = mount_rw()
    root = mount.path
    path = root / "f.bin"
    path.write_bytes(b"content")
    os.chmod(path, 0o600)
    os.chown(path, 1234, 5678)
    os.utime(path, ns=(T1, T1))
    os.mkdir(root / "d")
    os.chmod(root / "d", 0o700)
    os.utime(root / "d", ns=(T2, T2))
    os.chmod(root / "listed.bin", 0o604)
    # What tar and cp -a do: write, then fchown, fchmod and futimens on the descriptor,
    # then close. The file is still being written (its single PUT is pending).
    with open(root / "w.bin", "wb", buffering=0) as f:
        f.write(b"w" * 100)
        os.fchown(f.fileno(), 42, 43)
        os.fchmod(f.fileno(), 0o640)
        os.utime(f.fileno(), ns=(T2, T2))

    def check() -> None:
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1234, 5678)
        assert st.st_mtime_ns == T1
        dst = os.stat(root / "d")
        assert stat.S_IMODE(dst.st_mode) == 0o700 and stat.S_ISDIR(dst.st_mode)
        assert dst.st_mtime_ns == T2
        wst = os.stat(root / "w.bin")
        assert (stat.S_IMODE(wst.st_mode), wst.st_uid, wst.st_gid, wst.st_mtime_ns) == \
            (0o640, 42, 43, T2)
        assert stat.S_IMODE(os.stat(root / "listed.bin").st_mode) == 0o604

    check()
    m = meta(s3, bucket, "f.bin")
    assert (m["mode"], m["uid"], m["gid"]) == (str(stat.S_IFREG | 0o600), "1234", "5678")
    assert float(m["mtime"]) == T1 / 1e9
    assert origin(s3, bucket, "f.bin") == b"content"
    assert meta(s3, bucket, "d/")["mode"] == str(stat.S_IFDIR | 0o700)
    assert float(meta(s3, bucket, "d/")["mtime"]) == T2 / 1e9
    assert meta(s3, bucket, "listed.bin")["mode"] == str(stat.S_IFREG | 0o604)
    assert origin(s3, bucket, "listed.bin") == b"0123456789"
    # truncate(2) on a path publishes at once; growing it pads with zeros.
    os.truncate(root / "listed.bin", 4)
    assert origin(s3, bucket, "listed.bin") == b"0123"
    os.truncate(root / "listed.bin", 6)
    assert origin(s3, bucket, "listed.bin") == b"0123\0\0"
    assert (root / "listed.bin").read_bytes() == b"0123\0\0"
    mounter.remount(mount)
    check()
    assert (root / "listed.bin").read_bytes() == b"0123\0\0"
    # The attributes set on the descriptor went out with the file's upload.
    m = meta(s3, bucket, "w.bin")
    assert (m["mode"], m["uid"], m["gid"], float(m["mtime"])) == \
        (str(stat.S_IFREG | 0o640), "42", "43", T2 / 1e9)


def test_writing_after_utime_moves_mtime_on(s3, bucket, mount_rw):
    """A file whose mtime was set (touch -d, rsync, tar) and is then written again gets the
    time of that write, as on any filesystem: make and rsync's quick check depend on it."""
    mount = mount_rw()
    path = mount.path / "f.txt"
    path.write_bytes(b"one")
    os.utime(path, ns=(T1, T1))
    assert os.stat(path).st_mtime_ns == T1
    before = time.time_ns()
    path.write_bytes(b"two!")
    with open(path, "ab") as f:
        f.write(b" and more")
    assert origin(s3, bucket, "f.txt") == b"two! and more"
    assert os.stat(path).st_mtime_ns >= before - 10**9
    assert float(meta(s3, bucket, "f.txt")["mtime"]) >= before / 1e9 - 1


def test_read_only_mount_still_refuses_every_change(s3, bucket, mount_rw):
    s3.put_object(Bucket=bucket, Key="d/a.txt", Body=b"a")
    mount = mount_rw("--read-only")
    root = mount.path
    for what, action in [
            ("open wb", lambda: open(root / "d" / "a.txt", "wb")),
            ("open r+", lambda: open(root / "d" / "a.txt", "r+b")),
            ("create", lambda: open(root / "new.txt", "w")),
            ("mkdir", lambda: os.mkdir(root / "e")),
            ("rmdir", lambda: os.rmdir(root / "d")),
            ("unlink", lambda: os.unlink(root / "d" / "a.txt")),
            ("rename", lambda: os.rename(root / "d" / "a.txt", root / "d" / "b.txt")),
            ("chmod", lambda: os.chmod(root / "d" / "a.txt", 0o600)),
            ("chown", lambda: os.chown(root / "d" / "a.txt", 1, 1)),
            ("utime", lambda: os.utime(root / "d" / "a.txt", (1, 1))),
            ("truncate", lambda: os.truncate(root / "d" / "a.txt", 0)),
            ("symlink", lambda: os.symlink("a.txt", root / "d" / "l")),
            ("link", lambda: os.link(root / "d" / "a.txt", root / "d" / "h")),
            ("mkfifo", lambda: os.mkfifo(root / "d" / "p"))]:
        assert errno_of(action) == errno.EROFS, what
    assert origin_keys(s3, bucket) == ["d/a.txt"]
    assert (root / "d" / "a.txt").read_bytes() == b"a"
