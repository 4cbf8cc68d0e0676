"""Real mounts over a real S3 server: tree shape, names, reads, remount, TTL refresh."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from datetime import timezone
from pathlib import Path

import pytest

from tests.conftest import mount_type, process_alive, put_many, run_objfs

MiB = 1024 * 1024


def walk(root: Path) -> dict[str, tuple[str, int]]:
    """relpath -> ('d', 0) | ('f', size), via os.walk through the mount."""
    out: dict[str, tuple[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = ("d", 0)
        for f in filenames:
            out[os.path.normpath(os.path.join(rel, f))] = ("f", os.stat(os.path.join(dirpath, f)).st_size)
    return out


def test_tree_of_nested_keys_markers_and_odd_names(s3, bucket, mounter):
    objects = {
        "ds/train/a/0001.jpg": b"x" * 10,
        "ds/train/a/0002.jpg": b"y" * 20,
        "ds/train/b/deep/er/0003.jpg": b"z" * 30,
        "ds/empty/": b"",                       # marker of an otherwise empty dir
        "ds/train/": b"",                       # marker of a dir that also has children
        "ds/name with spaces.txt": b"spaces",
        "ds/ünïcødé/数据.bin": b"unicode",
        "ds/conflict": b"file-and-dir",         # both an object and a prefix: dir wins
        "ds/conflict/child": b"child",
        "ds/bad//empty-segment": b"skip",
        "ds/bad/./dot": b"skip",
        "ds/bad/../dotdot": b"skip",
        "ds/" + "n" * 256: b"skip",             # 256-byte name
        "ds/ok/" + "m" * 255: b"max",           # 255-byte name is fine
        "outside-prefix.txt": b"not mounted",
    }
    put_many(s3, bucket, objects)
    mount = mounter(f"s3://{bucket}/ds")
    tree = walk(mount.path)
    assert tree == {
        "train": ("d", 0), "train/a": ("d", 0), "train/a/0001.jpg": ("f", 10),
        "train/a/0002.jpg": ("f", 20), "train/b": ("d", 0), "train/b/deep": ("d", 0),
        "train/b/deep/er": ("d", 0), "train/b/deep/er/0003.jpg": ("f", 30),
        "empty": ("d", 0), "name with spaces.txt": ("f", 6), "ünïcødé": ("d", 0),
        "ünïcødé/数据.bin": ("f", 7), "conflict": ("d", 0), "conflict/child": ("f", 5),
        "ok": ("d", 0), "ok/" + "m" * 255: ("f", 3),
    }
    assert (mount.path / "ünïcødé" / "数据.bin").read_bytes() == b"unicode"
    assert (mount.path / "name with spaces.txt").read_bytes() == b"spaces"
    # Invalid keys are logged once each.
    log = (mount.cache_dir / "objfs.log").read_text()
    assert log.count("not a valid file name") == 4
    # find and ls agree with os.walk.
    found = subprocess.run(["find", str(mount.path), "-type", "f"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert len(found) == sum(1 for kind, _ in tree.values() if kind == "f")


def test_attributes_sizes_mtimes_and_xattrs(s3, bucket, mounter):
    s3.put_object(Bucket=bucket, Key="f.bin", Body=b"a" * 12345)
    head = s3.head_object(Bucket=bucket, Key="f.bin")
    mount = mounter(f"s3://{bucket}")
    st = os.stat(mount.path / "f.bin")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 12345
    assert st.st_mtime == head["LastModified"].replace(tzinfo=timezone.utc).timestamp()
    assert st.st_nlink == 1 and st.st_blocks == (12345 + 511) // 512
    assert os.getxattr(mount.path / "f.bin", "user.objfs.etag").decode() == head["ETag"]
    assert os.getxattr(mount.path, "user.objfs.source").decode() == f"s3://{bucket}"
    assert stat.S_ISDIR(os.stat(mount.path).st_mode)


def test_5000_keys_in_one_directory(s3, bucket, mounter):
    names = [f"item-{i:05d}.txt" for i in range(5000)]
    put_many(s3, bucket, {f"big/{n}": n.encode() for n in names}, workers=32)
    mount = mounter(f"s3://{bucket}")
    listed = os.listdir(mount.path / "big")
    assert sorted(listed) == names            # no entry lost or repeated across readdir calls
    out = subprocess.run(["ls", "-la", str(mount.path / "big")], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 5000 + 3               # total line, '.', '..'
    assert (mount.path / "big" / "item-04999.txt").read_text() == "item-04999.txt"


@pytest.fixture
def big_object(s3, bucket):
    data = random.Random(1234).randbytes(32 * MiB)
    s3.put_object(Bucket=bucket, Key="blob/model.bin", Body=data)
    return data


def test_byte_exact_reads_at_random_offsets(big_object, bucket, mounter):
    mount = mounter(f"s3://{bucket}")
    path = mount.path / "blob" / "model.bin"
    rng = random.Random(99)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(60):
            offset = rng.randrange(0, len(big_object) + 100)
            size = rng.choice([1, 100, 4096, 128 * 1024, MiB - 1, MiB + 1, 3 * MiB + 17])
            assert os.pread(fd, size, offset) == big_object[offset:offset + size], (offset, size)
    finally:
        os.close(fd)
    assert hashlib.md5(path.read_bytes()).hexdigest() == hashlib.md5(big_object).hexdigest()


def test_shell_tools_mmap_and_fio_read(big_object, bucket, mounter, tmp_path):
    mount = mounter(f"s3://{bucket}")
    path = mount.path / "blob" / "model.bin"
    md5 = subprocess.run(["md5sum", str(path)], capture_output=True, text=True, check=True)
    assert md5.stdout.split()[0] == hashlib.md5(big_object).hexdigest()
    shutil.copy(path, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == big_object
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[5 * MiB:5 * MiB + 1000] == big_object[5 * MiB:5 * MiB + 1000]
        assert m[-10:] == big_object[-10:]
    fio = subprocess.run(["fio", "--name=r", f"--filename={path}", "--rw=randread", "--bs=64k",
                          "--size=32M", "--io_size=8M", "--readonly", "--output-format=terse",
                          "--terse-version=3"], capture_output=True, text=True, timeout=120)
    assert fio.returncode == 0, fio.stderr
    read_kib = int(fio.stdout.split(";")[5])  # terse v3: field 6 is read KiB
    assert read_kib == 8 * 1024


def test_parallel_readers_see_the_same_bytes(big_object, bucket, mounter):
    mount = mounter(f"s3://{bucket}")
    path = mount.path / "blob" / "model.bin"
    digests: list[str] = []
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                rng = random.Random(seed)
                chunks = list(range(0, len(big_object), MiB))
                rng.shuffle(chunks)
                buf = bytearray(len(big_object))
                for off in chunks:
                    f.seek(off)
                    buf[off:off + MiB] = f.read(MiB)
                digests.append(hashlib.md5(buf).hexdigest())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert digests == [hashlib.md5(big_object).hexdigest()] * 8


def test_remount_serves_from_the_persisted_tree(s3, bucket, mounter, proxy):
    put_many(s3, bucket, {f"d{i}/f{j}": b"x" * j for i in range(5) for j in range(20)})
    mount = mounter(f"s3://{bucket}", "--ttl", "3600", endpoint=proxy.endpoint)
    first = walk(mount.path)
    assert len(first) == 5 + 100 and proxy.requests["list"] >= 1
    ino_before = os.stat(mount.path / "d3" / "f7").st_ino
    proxy.reset()
    mounter.remount(mount)
    assert walk(mount.path) == first
    assert os.stat(mount.path / "d3" / "f7").st_ino == ino_before   # stable inode numbers
    assert proxy.requests["list"] == 0   # only the one-key access probe, no listing
    assert proxy.requests["list_probe"] == 1


def test_ttl_refresh_sees_added_changed_and_deleted_objects(s3, bucket, mounter):
    s3.put_object(Bucket=bucket, Key="keep.txt", Body=b"keep")
    s3.put_object(Bucket=bucket, Key="change.txt", Body=b"old version")
    s3.put_object(Bucket=bucket, Key="gone/deleted.txt", Body=b"bye")
    mount = mounter(f"s3://{bucket}", "--ttl", "1")
    assert (mount.path / "change.txt").read_bytes() == b"old version"  # now in the kernel cache
    s3.put_object(Bucket=bucket, Key="change.txt", Body=b"NEW VERSION!!")
    s3.put_object(Bucket=bucket, Key="added/new.txt", Body=b"new")
    s3.delete_object(Bucket=bucket, Key="gone/deleted.txt")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (mount.path / "added").exists() and not (mount.path / "gone").exists() \
                and os.stat(mount.path / "change.txt").st_size == 13:
            break
        time.sleep(0.2)
    assert sorted(os.listdir(mount.path)) == ["added", "change.txt", "keep.txt"]
    assert (mount.path / "added" / "new.txt").read_bytes() == b"new"
    assert (mount.path / "change.txt").read_bytes() == b"NEW VERSION!!"


def test_handle_of_a_replaced_object_gets_estale_not_mixed_bytes(s3, bucket, mounter):
    old = random.Random(1).randbytes(4 * MiB)
    s3.put_object(Bucket=bucket, Key="x.bin", Body=old)
    mount = mounter(f"s3://{bucket}", "--ttl", "3600")
    with open(mount.path / "x.bin", "rb", buffering=0) as f:
        assert f.read(1000) == old[:1000]
        s3.put_object(Bucket=bucket, Key="x.bin", Body=random.Random(2).randbytes(4 * MiB))
        f.seek(3 * MiB)
        with pytest.raises(OSError) as info:
            f.read(1000)
        assert info.value.errno == errno.ESTALE


def test_read_only_mount_refuses_writes(s3, bucket, mounter):
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    mount = mounter(f"s3://{bucket}", "--read-only")
    for action in (lambda: open(mount.path / "a.txt", "wb"),
                   lambda: open(mount.path / "new.txt", "w"),
                   lambda: os.mkdir(mount.path / "d"),
                   lambda: os.unlink(mount.path / "a.txt"),
                   lambda: os.rename(mount.path / "a.txt", mount.path / "b.txt")):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    return subprocess.run(list(cmd), capture_output=True, text=True, preexec_fn=drop, timeout=30)


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="objfs-public-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ownership_modes_and_allow_other(s3, bucket, mounter, public_dir):
    s3.put_object(Bucket=bucket, Key="d/f.txt", Body=b"shared")
    control = public_dir / "plain"
    control.mkdir()
    (control / "f.txt").write_text("local")
    assert _as_nobody("cat", str(control / "f.txt")).stdout == "local"  # the path is reachable
    private = mounter(f"s3://{bucket}", path=public_dir / "private")
    refused = _as_nobody("cat", str(private.path / "d" / "f.txt"))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr  # no allow_other
    shared = mounter(f"s3://{bucket}", "--allow-other", "--uid", "1234", "--gid", "2345",
                     "--file-mode", "0640", "--dir-mode", "0755", path=public_dir / "shared")
    st = os.stat(shared.path / "d" / "f.txt")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o640)
    assert stat.S_IMODE(os.stat(shared.path / "d").st_mode) == 0o755
    assert _as_nobody("ls", str(shared.path / "d")).stdout == "f.txt\n"
    denied = _as_nobody("cat", str(shared.path / "d" / "f.txt"))   # 0640: other has no bits
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    readable = mounter(f"s3://{bucket}", "--allow-other", "--file-mode", "0644",
                       path=public_dir / "readable")
    ok = _as_nobody("cat", str(readable.path / "d" / "f.txt"))
    assert ok.returncode == 0 and ok.stdout == "shared"


def test_sigterm_unmounts_and_the_daemon_exits(s3, bucket, mounter):
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    mount = mounter(f"s3://{bucket}")
    pid = mount.pid
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (mount_type(mount.path) or process_alive(pid)):
        time.sleep(0.05)
    assert mount_type(mount.path) is None
    assert not process_alive(pid)


def test_umount_waits_for_the_daemon(s3, bucket, mounter):
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    mount = mounter(f"s3://{bucket}")
    pid = mount.pid
    result = run_objfs("umount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert mount_type(mount.path) is None and not process_alive(pid)
    again = run_objfs("umount", str(mount.path))
    assert again.returncode != 0 and "not mounted" in again.stderr


def test_mount_helper_for_fstab(s3, bucket, s3_endpoint, tmp_path):
    s3.put_object(Bucket=bucket, Key="p/x.txt", Body=b"via fstab")
    mp = tmp_path / "fstab-mnt"
    mp.mkdir()
    helper = str(Path(run_objfs.__globals__["OBJFS"]).parent / "mount.objfs")
    result = subprocess.run(
        [helper, f"s3://{bucket}/p", str(mp), "-o",
         f"_netdev,defaults,endpoint={s3_endpoint},cache_dir={tmp_path / 'c'},file_mode=0600"],
        capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert (mp / "x.txt").read_bytes() == b"via fstab"
        assert stat.S_IMODE(os.stat(mp / "x.txt").st_mode) == 0o600
    finally:
        run_objfs("umount", str(mp))
    assert mount_type(mp) is None
