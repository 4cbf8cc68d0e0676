"""The on-disk page cache through real mounts: every GET goes through the fault proxy, so the
tests assert what reached the origin (requests and body bytes), not just the bytes read.

What each test pins (ARCHITECTURE.md "Read path", issue 3 "Tests"):
- concurrent readers of a cold file fetch each page exactly once;
- a restarted daemon serves a cached file with zero origin bytes;
- a damaged page file (flipped data or header bytes, truncated, deleted) is refetched, one
  page per damaged file, never EIO (a file deleted while the daemon holds it open is read
  from the open descriptor until the next start);
- an object replaced at the origin shows its new bytes after the TTL, no whole-file read ever
  mixes the two versions, and a handle of the old version cannot feed old bytes to new opens;
- the bytes on disk never exceed ``--cache-size`` (measured with statvfs on a tmpfs of the
  cache's own: one atomic number), files and index agree after concurrent evictions, and
  ``uniform`` keeps its resident set;
- a page the cache does not keep is read through once per read, not once per kernel request;
- cache-disk trouble (ENOSPC, an unusable data dir) degrades to reading through, with a warning;
- sequential reads are coalesced into few large GETs, random reads fetch only what they touch.

The kernel's page cache would hide reads from the daemon (llfuse opens with ``keep_cache``), so
phases that need the daemon to see reads drop it first: a remount, or ``POSIX_FADV_DONTNEED``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from objfs.cache.format import CHUNK_SIZE, HEADER_SIZE
from objfs.cache.index import PageIndex
from objfs.cache.pages import ObjectVersion, page_id
from tests.conftest import mount_type, put_many, run_objfs

MiB = 1024 * 1024
PAGE_FILE_BYTES = HEADER_SIZE + MiB  # a full page on disk, header included


# ---- helpers ---------------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_dir(cache_dir: Path) -> Path:
    return cache_dir / "pages" / "data"


def page_files(cache_dir: Path) -> dict[str, int]:
    """Every file under the page data dir (temp files included) -> its size in bytes."""
    out: dict[str, int] = {}
    try:
        subdirs = list(os.scandir(data_dir(cache_dir)))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for sub in subdirs:
        try:
            entries = list(os.scandir(sub.path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                out[entry.name] = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # evicted or renamed while we looked
                continue
    return out


def disk_usage(cache_dir: Path) -> int:
    return sum(page_files(cache_dir).values())


def page_path(mount, relpath: str, size: int, index: int) -> Path:
    """The page file of page ``index`` of the version the mount shows for ``relpath``."""
    bucket = mount.url.removeprefix("s3://").split("/")[0]
    etag = os.getxattr(mount.path / relpath, "user.objfs.etag").decode()
    key = os.getxattr(mount.path / relpath, "user.objfs.key").decode()
    name = page_id(ObjectVersion(bucket, key, etag, size), index).hex()
    return data_dir(mount.cache_dir) / name[:2] / name


def mount_again(mount) -> None:
    """Mount an unmounted ``Mount`` again with the same arguments (and cache dir)."""
    result = run_objfs(*mount.args)
    assert result.returncode == 0, f"mount failed: {result.stderr}"
    assert mount_type(mount.path) == "fuse.objfs"


def drop_kernel_cache(path: Path) -> None:
    """Forget the kernel's cached pages of one file, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path, chunk: int | None = None) -> bytes:
    with open(path, "rb", buffering=0) as f:
        if chunk is None:
            return f.read()
        parts = []
        while piece := f.read(chunk):
            parts.append(piece)
        return b"".join(parts)


def settle(proxy, quiet_s: float = 0.15, timeout_s: float = 10.0) -> None:
    """Wait until the proxy's counters stop moving (background readahead, last body bytes)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        now = (sorted(proxy.requests.items()), sorted(proxy.body_bytes.items()))
        if now == last:
            return
        last = now
        time.sleep(quiet_s)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def get_ranges(proxy) -> list[tuple[int, int]]:
    """[first, last] byte ranges of the GETs the proxy saw, in arrival order."""
    out = []
    for kind, _path, headers in list(proxy.log):
        if kind == "get":
            first, last = headers["Range"].removeprefix("bytes=").split("-")
            out.append((int(first), int(last)))
    return out


def fetched_pages(proxy) -> list[int]:
    """Page indexes fetched by the GETs, with repetitions, sorted. Ranges are whole pages."""
    pages = []
    for first, last in get_ranges(proxy):
        assert first % MiB == 0, f"GET not page-aligned: {first}-{last}"
        pages.extend(range(first // MiB, last // MiB + 1))
    return sorted(pages)


def log_text(mount) -> str:
    return (mount.cache_dir / "objfs.log").read_text()


def flip(path: Path, offset: int, count: int = 8) -> None:
    """Invert ``count`` bytes of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def runs(items: list[str]) -> str:
    """'old x3, MIXED x2, new x1': a long list of results, run-length encoded."""
    out: list[list] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1][1] += 1
        else:
            out.append([item, 1])
    return ", ".join(f"{item} x{n}" for item, n in out)


def mount_tmpfs(path: Path, options: str, mounted: list[Path]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    mounted.append(path)


def fs_used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem at ``path``: one atomic number (statvfs), where a walk
    of several directories could count a page in one and its victim in another."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class UsageWatcher:
    """Samples the bytes used on the cache's data filesystem (a tmpfs of its own) as fast as
    it can, in a thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stop = threading.Event()
        self.peak = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, fs_used_bytes(self._path))
            self.samples += 1
            time.sleep(0.0005)

    def __enter__(self) -> "UsageWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def tmpfs_mounts() -> Iterator[list[Path]]:
    """Mount points of tmpfs mounts made by a test, lazily unmounted afterwards. Tests ask
    for it before ``mounter``, so their objfs mounts go first."""
    mounted: list[Path] = []
    try:
        yield mounted
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def big(s3_endpoint) -> tuple[str, bytes]:
    """(bucket, bytes) of one 32 MiB object "model.bin", uploaded once for the module. Every
    test mounts it with a cache dir of its own, so each starts cold."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"test-big-{uuid.uuid4().hex[:8]}"
    data = random.Random(1).randbytes(32 * MiB)
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="model.bin", Body=data)
    return name, data


# ---- 1. parallel readers of a cold file ------------------------------------------------------

def test_32_parallel_readers_fetch_each_page_once(big, mounter, proxy):
    bucket, data = big
    mount = mounter(f"s3://{bucket}", endpoint=proxy.endpoint)
    path = mount.path / "model.bin"
    proxy.reset()
    start = threading.Barrier(32)
    verified: dict[int, int] = {}                    # reader -> bytes it read and checked
    errors: list[BaseException] = []
    pages = list(range(0, len(data), MiB))

    def check(off: int, piece: bytes) -> int:
        assert piece == data[off:off + len(piece)], f"wrong bytes at {off}"
        return len(piece)

    def whole(i: int) -> int:                        # one read() call of everything
        return check(0, read_file(path))

    def chunked(i: int) -> int:                      # sequential, odd chunk sizes
        size, done = [4096, 65536, 3 * MiB + 17, MiB - 1][i % 4], 0
        with open(path, "rb", buffering=0) as f:
            while piece := f.read(size):
                done += check(done, piece)
        return done

    def shuffled(i: int) -> int:                     # pages in a random order, pread
        order = pages[:]
        random.Random(i).shuffle(order)
        fd = os.open(path, os.O_RDONLY)
        try:
            return sum(check(off, os.pread(fd, MiB, off)) for off in order)
        finally:
            os.close(fd)

    def direct_backwards(i: int) -> int:             # O_DIRECT: every read reaches the daemon
        aligned = mmap.mmap(-1, MiB)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            done = 0
            for off in reversed(pages):
                n = os.preadv(fd, [aligned], off)
                done += check(off, aligned[:n])
            return done
        finally:
            os.close(fd)
            aligned.close()

    modes = [whole, chunked, shuffled, direct_backwards]

    def reader(i: int) -> None:
        try:
            start.wait(30)
            verified[i] = modes[i % len(modes)](i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert verified == {i: len(data) for i in range(32)}
    settle(proxy)
    assert fetched_pages(proxy) == list(range(32)), "each page must be fetched exactly once"
    assert proxy.body_bytes["get"] == 32 * MiB
    # ... and every page was stored (the writes finish after the readers got the bytes).
    wait_for(lambda: disk_usage(mount.cache_dir) == 32 * PAGE_FILE_BYTES, what="32 page files")


# ---- 2. persistence across a restart ---------------------------------------------------------

def test_remount_reads_cached_files_with_zero_origin_bytes(s3, bucket, mounter, proxy):
    files = {
        "a/model.bin": random.Random(2).randbytes(8 * MiB),
        "a/short-tail.bin": random.Random(3).randbytes(3 * MiB + 123),  # short last page
        "b/tiny.txt": b"tiny but cached",
        "b/empty": b"",
    }
    put_many(s3, bucket, files)
    mount = mounter(f"s3://{bucket}", endpoint=proxy.endpoint)
    proxy.reset()
    for rel, body in files.items():
        assert read_file(mount.path / rel) == body
    settle(proxy)
    assert proxy.body_bytes["get"] == sum(len(b) for b in files.values())
    pages = sum((len(b) + MiB - 1) // MiB for b in files.values())
    wait_for(lambda: len(page_files(mount.cache_dir)) == pages, what=f"{pages} page files")

    mounter.remount(mount)      # a new daemon; unmounting also emptied the kernel's cache
    proxy.reset()
    for rel, body in files.items():
        assert read_file(mount.path / rel, 128 * 1024) == body
    settle(proxy)
    assert proxy.requests["get"] == 0
    assert proxy.body_bytes["get"] == 0


# ---- 3. damaged page files -------------------------------------------------------------------

def test_damaged_page_files_are_refetched_never_eio(s3, bucket, mounter, proxy):
    data = random.Random(4).randbytes(8 * MiB)
    s3.put_object(Bucket=bucket, Key="d/x.bin", Body=data)
    mount = mounter(f"s3://{bucket}", "--ttl", "3600", endpoint=proxy.endpoint)
    rel, size = "d/x.bin", len(data)
    path = mount.path / rel
    assert read_file(path) == data
    pages = {i: page_path(mount, rel, size, i) for i in range(8)}
    # (Counting files under the page dir is not enough: that count includes a page's temp
    # file before its rename.)
    wait_for(lambda: all(p.exists() for p in pages.values()), what="the 8 page files")

    # Unmounted: flip bytes in the data area of page 5 (its third 128 KiB chunk) and inside
    # the header of page 3 (the key's bytes); delete page 7's file (still indexed).
    mounter.unmount(mount)
    flip(pages[5], HEADER_SIZE + 300_000)
    flip(pages[3], 200)
    os.unlink(pages[7])
    mount_again(mount)
    proxy.reset()
    assert read_file(path) == data
    settle(proxy)
    assert get_ranges(proxy) == [(3 * MiB, 4 * MiB - 1), (5 * MiB, 6 * MiB - 1),
                                 (7 * MiB, 8 * MiB - 1)], "exactly pages 3, 5 and 7 refetched"
    assert proxy.body_bytes["get"] == 3 * MiB
    assert "corrupt cached page" in log_text(mount)

    # Mounted: damage two more pages in two ways, with the kernel's copy dropped. (A header
    # damaged while mounted goes unnoticed until the next start: the daemon keeps the
    # verified headers of pages in use, and still checks every chunk it serves against them.)
    # The daemon keeps page files open between reads, so damage in place is seen at once.
    # A file deleted while open is still read (its bytes verified as ever) until its
    # descriptor is closed; the next start finds it missing and refetches it.
    drop_kernel_cache(path)
    flip(pages[1], HEADER_SIZE + MiB - 8)            # the last bytes of the data
    os.truncate(pages[6], HEADER_SIZE + 2 * CHUNK_SIZE)  # torn at a chunk boundary
    os.unlink(pages[2])                              # open in the daemon: still served
    proxy.reset()
    assert read_file(path, 128 * 1024) == data
    settle(proxy)
    assert fetched_pages(proxy) == [1, 6]
    assert proxy.body_bytes["get"] == 2 * MiB

    # The refetched pages were stored again: a third read costs nothing.
    kept = {i: p for i, p in pages.items() if i != 2}
    wait_for(lambda: all(p.exists() and p.stat().st_size == PAGE_FILE_BYTES
                         for p in kept.values()), what="the damaged pages rewritten")
    drop_kernel_cache(path)
    proxy.reset()
    assert read_file(path) == data
    settle(proxy)
    assert proxy.requests["get"] == 0

    # Page 2's file went while open: the next start finds it missing and refetches it alone.
    mounter.unmount(mount)
    mount_again(mount)
    proxy.reset()
    assert read_file(path) == data
    settle(proxy)
    assert get_ranges(proxy) == [(2 * MiB, 3 * MiB - 1)]


# ---- 4. an object replaced at the origin ------------------------------------------------------

def test_replaced_object_shows_new_bytes_after_ttl_never_mixed(s3, bucket, mounter, proxy):
    old = random.Random(5).randbytes(8 * MiB)
    new = random.Random(6).randbytes(8 * MiB)
    s3.put_object(Bucket=bucket, Key="ckpt.bin", Body=old)
    mount = mounter(f"s3://{bucket}", "--ttl", "2", endpoint=proxy.endpoint)
    path = mount.path / "ckpt.bin"
    assert read_file(path) == old                    # cached on disk and in the kernel
    digests = {sha(old): "old", sha(new): "new"}
    seen: dict[int, list[str]] = {i: [] for i in range(3)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll(i: int) -> None:
        # Whole-file reads, 1 MiB at a time with pauses, so some reads span the refresh.
        try:
            while not stop.is_set():
                parts = []
                try:
                    with open(path, "rb", buffering=0) as f:
                        while piece := f.read(MiB):
                            parts.append(piece)
                            time.sleep(0.005 * (i + 1))
                except OSError as exc:
                    if exc.errno != errno.ESTALE:    # a handle of a replaced version
                        raise
                    seen[i].append("estale")
                    continue
                seen[i].append(digests.get(sha(b"".join(parts)), "MIXED"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def settled() -> bool:
        return any("MIXED" in s for s in seen.values()) or \
            all(s and s[-1] == "new" for s in seen.values())

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        s3.put_object(Bucket=bucket, Key="ckpt.bin", Body=new)
        changed_at = time.monotonic()
        wait_for(settled, timeout_s=15, what="the pollers to see the new bytes")
        seen_new_after = time.monotonic() - changed_at
        time.sleep(1.0)                              # keep polling after the switch
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    mixed = {i: runs(kinds) for i, kinds in seen.items() if "MIXED" in kinds}
    assert not mixed, f"whole-file reads that mixed old and new bytes, per poller: {mixed}"
    for i, kinds in seen.items():
        reads = [k for k in kinds if k != "estale"]
        assert "old" not in reads[reads.index("new"):], f"poller {i}: old after new: {runs(kinds)}"
    assert seen_new_after < 2 + 10                   # the TTL, plus a relist and some slack
    assert read_file(path) == new
    assert "no FUSE device descriptor" not in log_text(mount)  # invalidation is synchronous


def test_old_handle_reading_after_a_refresh_does_not_feed_old_bytes_to_new_opens(
        s3, bucket, mounter, proxy):
    """The cause of the mixes above, step by step: a handle opened on the old version keeps
    reading it from the page cache after the refresh invalidated the kernel's pages; the
    kernel caches those old bytes under the inode again, and a new open of the new version
    (llfuse replies keep_cache) is served them."""
    old = random.Random(12).randbytes(4 * MiB)
    new = random.Random(13).randbytes(4 * MiB)
    s3.put_object(Bucket=bucket, Key="w.bin", Body=old)
    mount = mounter(f"s3://{bucket}", "--ttl", "1", endpoint=proxy.endpoint)
    path = mount.path / "w.bin"
    old_etag = os.getxattr(path, "user.objfs.etag")
    assert read_file(path) == old                    # all pages Ready on disk
    fd = os.open(path, os.O_RDONLY)                  # a handle of the old version
    try:
        s3.put_object(Bucket=bucket, Key="w.bin", Body=new)
        wait_for(lambda: os.getxattr(path, "user.objfs.etag") != old_etag, timeout_s=15,
                 what="the refresh to see the new version")
        wait_for(lambda: "1 changed" in log_text(mount), what="the refresh to finish")
        try:
            stale_read = os.pread(fd, len(old), 0)
        except OSError as exc:
            assert exc.errno == errno.ESTALE         # refusing the old handle is fine too
        else:
            assert stale_read == old                 # or its own version, whole
    finally:
        os.close(fd)
    got = read_file(path)
    assert len(got) == len(new)
    stale_pages = [i for i in range(4) if got[i * MiB:(i + 1) * MiB] == old[i * MiB:(i + 1) * MiB]]
    if got != new:
        drop_kernel_cache(path)
        from_daemon = read_file(path) == new
        raise AssertionError(
            f"a new open after the refresh read old pages {stale_pages}; with the kernel's "
            f"page cache dropped, the daemon serves the new bytes: {from_daemon}")


def test_an_open_during_the_refresh_waits_for_the_old_kernel_pages_to_go(
        s3, bucket, mounter, proxy):
    """The window the poller test above hits only now and then, held open on purpose: a read
    of the old version is stuck at the origin, with the kernel's pages it is filling locked.
    The kernel drops an inode's pages in order and waits on locked ones, so the old pages
    cached after the stuck ones stay while the read is stuck. An open arriving after the tree
    shows the new version must wait for them to go, not be served them."""
    old = random.Random(14).randbytes(24 * MiB)
    new = random.Random(15).randbytes(24 * MiB)
    tail = slice(20 * MiB, 22 * MiB)
    s3.put_object(Bucket=bucket, Key="slow.bin", Body=old)
    mount = mounter(f"s3://{bucket}", "--ttl", "1", "--readahead", "1M",
                    endpoint=proxy.endpoint)
    path = mount.path / "slow.bin"
    old_etag = os.getxattr(path, "user.objfs.etag")
    fd = os.open(path, os.O_RDONLY)                  # a handle of the old version
    assert os.pread(fd, 2 * MiB, tail.start) == old[tail]  # now in the kernel's cache
    stuck: list[object] = []

    def read_head() -> None:
        try:
            stuck.append(os.pread(fd, MiB, 2 * MiB))
        except OSError as exc:
            stuck.append(exc.errno)

    time.sleep(0.2)                                  # the daemon's readahead of the tail
    wait_for(lambda: proxy.inflight["get"] == 0, what="the tail's GETs to end")
    proxy.delay_next("get", 1, 4.0)
    reader = threading.Thread(target=read_head)
    reader.start()
    try:
        time.sleep(0.3)                              # its GET is being held at the proxy
        s3.put_object(Bucket=bucket, Key="slow.bin", Body=new)
        wait_for(lambda: os.getxattr(path, "user.objfs.etag") != old_etag, timeout_s=15,
                 what="the tree to show the new version")
        assert reader.is_alive(), "the old handle's read ended before the window opened"
        with open(path, "rb", buffering=0) as f:     # in the window
            f.seek(tail.start)
            got = f.read(tail.stop - tail.start)
    finally:
        reader.join(30)
        os.close(fd)
    assert stuck and stuck[0] in (errno.ESTALE, old[2 * MiB:3 * MiB]), stuck
    assert got == new[tail], \
        "an open after the refresh was served the old version's pages from the kernel"
    waits = json.loads(run_objfs("stats", str(mount.path), "--json").stdout)["metrics"]
    assert waits.get("fuse_open_waits_for_change_total", 0) >= 1


# ---- 5. capacity -----------------------------------------------------------------------------

CAPACITY = 8 * MiB
FITS = CAPACITY // PAGE_FILE_BYTES                   # 7 page files of 1 MiB + header


@pytest.fixture
def dataset(s3, bucket) -> dict[str, bytes]:
    """Six 4 MiB files: 3x the 8 MiB cache of the capacity tests."""
    files = {f"ds/part-{i}.bin": random.Random(100 + i).randbytes(4 * MiB) for i in range(6)}
    put_many(s3, bucket, files)
    return files


def test_lru_never_exceeds_the_cache_size(tmpfs_mounts, bucket, dataset, mounter, proxy,
                                          tmp_path):
    cache_dir = tmp_path / "cache-lru"
    mount_tmpfs(data_dir(cache_dir), "size=64m", tmpfs_mounts)
    mount = mounter(f"s3://{bucket}", "--cache-size", "8M", "--cache-free-floor", "0",
                    endpoint=proxy.endpoint, cache_dir=cache_dir)
    proxy.reset()
    with UsageWatcher(data_dir(cache_dir)) as watcher:
        for rel, body in dataset.items():
            assert read_file(mount.path / rel) == body
        # Two readers at once, on files read long ago (evicted): more eviction under pressure.
        results: dict[str, bool] = {}
        first_two = list(dataset)[:2]
        threads = [threading.Thread(target=lambda r=r: results.update(
            {r: read_file(mount.path / r, 64 * 1024) == dataset[r]})) for r in first_two]
        for rel in first_two:
            drop_kernel_cache(mount.path / rel)
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {r: True for r in first_two}
        settle(proxy)
        time.sleep(0.3)
    assert watcher.samples > 50, "the watcher must have sampled while reading"
    assert watcher.peak <= CAPACITY, f"{watcher.peak} bytes on disk > {CAPACITY}"
    final = page_files(mount.cache_dir)
    assert sum(final.values()) == fs_used_bytes(data_dir(cache_dir)) == FITS * PAGE_FILE_BYTES
    assert all(len(name) == 40 for name in final), f"temp files left: {sorted(final)}"
    # LRU: the two files read first were evicted, so their re-read went to the origin.
    assert proxy.body_bytes["get"] >= 24 * MiB + 8 * MiB


def test_capacity_holds_under_concurrent_readers(tmpfs_mounts, bucket, dataset, mounter, proxy,
                                                 tmp_path):
    """Six readers at once through a 2-page cache: the two writer threads admit and evict
    concurrently, often a page another thread is still writing. Such a page must leave
    neither its file nor an index entry behind: files, index and policy agree."""
    cache_dir = tmp_path / "cache-tiny"
    mount_tmpfs(data_dir(cache_dir), "size=64m", tmpfs_mounts)
    capacity = 2 * PAGE_FILE_BYTES
    mount = mounter(f"s3://{bucket}", "--cache-size", str(capacity), "--cache-free-floor", "0",
                    endpoint=proxy.endpoint, cache_dir=cache_dir)
    results: dict[str, bool] = {}

    def reader(rel: str) -> None:
        results[rel] = read_file(mount.path / rel) == dataset[rel]

    threads = [threading.Thread(target=reader, args=(rel,)) for rel in dataset]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {rel: True for rel in dataset}
    settle(proxy)
    time.sleep(0.3)
    stats = json.loads(run_objfs("stats", str(mount.path), "--json").stdout)["metrics"]
    assert stats["cache_used_bytes"] <= capacity          # what the policy believes
    on_disk = page_files(cache_dir)
    mounter.unmount(mount)
    index = PageIndex(cache_dir / "pages" / "index")
    try:
        indexed = {pid.hex() for pid, _size, _seq in index.entries()}
    finally:
        index.close()
    assert sum(on_disk.values()) <= capacity, (
        f"{len(on_disk)} page files on disk, the policy holds "
        f"{stats['cache_pages_ready']:.0f}: pages evicted while being written stay behind")
    assert indexed == set(on_disk), (
        f"index of {len(indexed)} pages vs {len(on_disk)} files on disk")


def test_uniform_keeps_its_resident_set_and_reads_the_rest_through(tmpfs_mounts, bucket,
                                                                   dataset, mounter, proxy,
                                                                   tmp_path):
    cache_dir = tmp_path / "cache-uniform"
    mount_tmpfs(data_dir(cache_dir), "size=64m", tmpfs_mounts)
    mount = mounter(f"s3://{bucket}", "--cache-size", "8M", "--cache-free-floor", "0",
                    "--cache-policy", "uniform", endpoint=proxy.endpoint, cache_dir=cache_dir)
    names = list(dataset)
    with UsageWatcher(data_dir(cache_dir)) as watcher:
        assert read_file(mount.path / names[0]) == dataset[names[0]]
        wait_for(lambda: len(page_files(mount.cache_dir)) == 4, what="4 page files")
        assert read_file(mount.path / names[1]) == dataset[names[1]]
        wait_for(lambda: len(page_files(mount.cache_dir)) == FITS, what="a full cache")
        time.sleep(0.3)
        resident = page_files(mount.cache_dir)
        proxy.reset()
        for rel in names[2:]:
            assert read_file(mount.path / rel) == dataset[rel]
        settle(proxy)
        assert proxy.body_bytes["get"] >= 16 * MiB
        # Read again: a later file is not cached on disk (at most fetched once more; recent
        # refused pages may still be in the small in-memory buffer), the first one is.
        proxy.reset()
        drop_kernel_cache(mount.path / names[2])
        assert read_file(mount.path / names[2]) == dataset[names[2]]
        settle(proxy)
        assert proxy.body_bytes["get"] <= len(dataset[names[2]])
        proxy.reset()
        drop_kernel_cache(mount.path / names[0])
        assert read_file(mount.path / names[0]) == dataset[names[0]]
        settle(proxy)
        assert proxy.requests["get"] == 0
        time.sleep(0.3)
    assert page_files(mount.cache_dir) == resident
    assert watcher.peak <= CAPACITY, f"{watcher.peak} bytes on disk > {CAPACITY}"


def test_pages_read_through_are_fetched_once_per_pass(s3, bucket, mounter, proxy):
    """A page the cache does not keep (uniform and full here; the same path serves a refused
    admission or a failed disk write) must still be fetched once per sequential read, not
    once per 128 KiB kernel request."""
    files = {"fill.bin": random.Random(14).randbytes(2 * MiB),
             "through.bin": random.Random(15).randbytes(4 * MiB)}
    put_many(s3, bucket, files)
    mount = mounter(f"s3://{bucket}", "--cache-size", str(2 * PAGE_FILE_BYTES),
                    "--cache-free-floor", "0", "--cache-policy", "uniform",
                    endpoint=proxy.endpoint)
    assert read_file(mount.path / "fill.bin") == files["fill.bin"]
    wait_for(lambda: len(page_files(mount.cache_dir)) == 2, what="a full cache")
    proxy.reset()
    assert read_file(mount.path / "through.bin") == files["through.bin"]
    settle(proxy)
    assert fetched_pages(proxy) == [0, 1, 2, 3], (
        f"{proxy.body_bytes['get'] / MiB:.0f} MiB fetched to read 4 MiB through: "
        f"{[(a // MiB, (b + 1) // MiB) for a, b in get_ranges(proxy)]}")


# ---- 6. cache-disk trouble -------------------------------------------------------------------

def test_full_cache_disk_reads_through_with_a_warning(tmpfs_mounts, s3, bucket, mounter, proxy,
                                                      tmp_path):
    data = random.Random(7).randbytes(2 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="f.bin", Body=data)
    cache_dir = tmp_path / "cache-enospc"
    # Plenty of bytes free (so the capacity check admits pages) but no inodes left after the
    # first sub-directory: every page file create fails with ENOSPC.
    mount_tmpfs(data_dir(cache_dir), "size=64m,nr_inodes=2", tmpfs_mounts)
    mount = mounter(f"s3://{bucket}", "--cache-free-floor", "0", endpoint=proxy.endpoint,
                    cache_dir=cache_dir)
    proxy.reset()
    for _ in range(2):
        drop_kernel_cache(mount.path / "f.bin")
        assert read_file(mount.path / "f.bin") == data
    settle(proxy)
    # Nothing could be kept: read through, but each page at most twice (the in-memory buffer
    # of refused pages spares a fetch per 128 KiB kernel request).
    assert len(data) <= proxy.body_bytes["get"] <= 2 * len(data)
    assert not page_files(cache_dir)
    text = log_text(mount)
    assert "page cache write failed" in text and "No space left on device" in text, text


def test_unusable_data_dir_after_mount_reads_through(s3, bucket, mounter, proxy):
    files = {"a.bin": random.Random(8).randbytes(2 * MiB), "b.bin": random.Random(9).randbytes(MiB)}
    put_many(s3, bucket, files)
    mount = mounter(f"s3://{bucket}", endpoint=proxy.endpoint)
    assert read_file(mount.path / "a.bin") == files["a.bin"]
    wait_for(lambda: len(page_files(mount.cache_dir)) == 2, what="2 page files")
    mounter.unmount(mount)      # a fresh daemon: a.bin's pages indexed, none of their files
    mount_again(mount)          # open (an open one would still be read, rightly)
    # The data dir becomes a regular file under the running daemon.
    moved = mount.cache_dir / "pages" / "data.moved"
    os.rename(data_dir(mount.cache_dir), moved)
    data_dir(mount.cache_dir).write_bytes(b"not a directory")
    proxy.reset()
    assert read_file(mount.path / "a.bin") == files["a.bin"]      # cached pages unreadable
    assert read_file(mount.path / "b.bin") == files["b.bin"]      # new pages unwritable
    settle(proxy)
    assert proxy.body_bytes["get"] >= 3 * MiB           # nothing came from the cache
    assert not page_files(mount.cache_dir)
    text = log_text(mount)
    assert "page cache open failed" in text, text
    assert "page cache write failed" in text, text
    assert "reading through from the origin" in text


# ---- 7. readahead coalescing vs random reads -------------------------------------------------

def test_sequential_reads_coalesce_and_random_reads_fetch_only_their_pages(big, mounter, proxy):
    bucket, data = big
    args = ("--readahead", "32M", "--read-request-size", "8M")

    seq = mounter(f"s3://{bucket}", *args, endpoint=proxy.endpoint)
    proxy.reset()
    assert read_file(seq.path / "model.bin", MiB) == data
    settle(proxy)
    sizes = [last - first + 1 for first, last in get_ranges(proxy)]
    assert fetched_pages(proxy) == list(range(32))   # each page once
    assert len(sizes) <= 32 // 3, f"{len(sizes)} GETs for 32 pages: {sizes}"
    assert max(sizes) == 8 * MiB                     # coalesced up to --read-request-size

    # Its own, empty cache; no whole-object prefetch (tests/core checks that one): the
    # pages a random reader touches, and only those.
    rnd = mounter(f"s3://{bucket}", *args, "--random-prefetch", "0", endpoint=proxy.endpoint)
    rng = random.Random(11)
    order: list[int] = []
    while len(order) < 10:                           # pages far apart: no sequential pattern
        p = rng.randrange(32)
        if p not in order and all(abs(p - q) > 2 for q in order[-1:]):
            order.append(p)
    proxy.reset()
    fd = os.open(rnd.path / "model.bin", os.O_RDONLY)
    try:
        for p in order:
            off = p * MiB + rng.randrange(0, MiB - 4096, 4096)
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
    finally:
        os.close(fd)
    settle(proxy)
    touched = len(order)
    # One page per touch; the slack admits one page of kernel readahead spilling over a page
    # end. A readahead window of even 2 pages per random read would fetch ~2x this.
    assert proxy.body_bytes["get"] <= (touched + 1) * MiB, (
        f"{proxy.body_bytes['get']} bytes fetched for {touched} pages touched: {get_ranges(proxy)}")
    assert proxy.requests["get"] <= touched + 1
    assert set(fetched_pages(proxy)) >= set(order)
