"""Real mounts: errnos, counters and permissions that outside suites and a review found wrong
(issue 13: items 13-16 and 19), checked from the outside with plain system calls."""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from tests.fuse.test_stats import cli_stats


def oserror(call) -> int | None:
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


def test_setxattr_is_enotsup_whatever_its_flags(s3, bucket, mounter) -> None:
    s3.put_object(Bucket=bucket, Key="f", Body=b"x")
    mount = mounter(f"s3://{bucket}")
    path = mount.path / "f"
    for flags in (0, os.XATTR_CREATE, os.XATTR_REPLACE):
        assert oserror(lambda f=flags: os.setxattr(path, "user.test", b"v", f)) == errno.ENOTSUP
    assert os.getxattr(path, "user.objfs.key") == b"f"  # the daemon is still alive
    assert oserror(lambda: os.removexattr(path, "user.test")) == errno.ENOTSUP


def test_names_over_255_bytes_are_enametoolong_everywhere(s3, bucket, mounter) -> None:
    mount = mounter(f"s3://{bucket}")
    long = mount.path / ("n" * 256)
    for call in (lambda: os.stat(long), lambda: os.unlink(long), lambda: os.rmdir(long),
                 lambda: os.truncate(long, 0), lambda: os.rename(long, mount.path / "x"),
                 lambda: open(long, "wb")):
        assert oserror(call) == errno.ENAMETOOLONG


def test_truncate_to_an_impossible_size_is_efbig(s3, bucket, mounter) -> None:
    s3.put_object(Bucket=bucket, Key="f", Body=b"x")
    mount = mounter(f"s3://{bucket}")
    assert oserror(lambda: os.truncate(mount.path / "f", 1 << 62)) == errno.EFBIG
    assert (mount.path / "f").read_bytes() == b"x"


def test_browsing_counts_no_errors(s3, bucket, mounter) -> None:
    """ls -l (lookups of missing names, the kernel's ACL and security xattr probes, readdir
    ending because the buffer is full) is a filesystem doing its job, not errors."""
    for i in range(300):
        s3.put_object(Bucket=bucket, Key=f"d/file-{i:03d}", Body=b"x")
    mount = mounter(f"s3://{bucket}")
    subprocess.run(["ls", "-laR", str(mount.path)], capture_output=True, check=True)
    for name in ("missing", "d/also-missing"):
        assert not (mount.path / name).exists()
    for name in ("security.selinux", "system.posix_acl_access", "user.unset"):
        assert oserror(lambda n=name: os.getxattr(mount.path / "d" / "file-001", n)) in \
            (errno.ENODATA, errno.EOPNOTSUPP)
    metrics = cli_stats(mount)["metrics"]
    errors = {k: v for k, v in metrics.items() if k.startswith("fuse_") and
              k.endswith("_errors_total") and v}
    assert errors == {}
    assert metrics.get("fuse_lookup_refused_total", 0) >= 2


def test_directory_link_counts_and_times(s3, bucket, mounter) -> None:
    mount = mounter(f"s3://{bucket}")
    d = mount.path / "d"
    d.mkdir()
    (d / "a").mkdir()
    (d / "b").mkdir()
    before = os.stat(d)
    assert before.st_nlink == 4
    (d / "f").write_bytes(b"x")
    after = os.stat(d)
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns == after.st_mtime_ns
    os.rmdir(d / "a")
    assert os.stat(d).st_nlink == 3


def test_the_cache_dir_is_private(s3, bucket, mounter) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 5000)
    mount = mounter(f"s3://{bucket}")
    (mount.path / "k").read_bytes()
    (mount.path / "new").write_bytes(b"y")
    assert stat.S_IMODE(os.stat(mount.cache_dir).st_mode) == 0o700
    exposed = []
    for dirpath, dirnames, filenames in os.walk(mount.cache_dir):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                exposed.append((path, oct(mode)))
    assert exposed == []


@pytest.mark.parametrize("existing_mode", [0o755])
def test_an_existing_cache_dir_is_made_private(s3, bucket, mounter, tmp_path,
                                               existing_mode: int) -> None:
    cache = tmp_path / "old-cache"
    cache.mkdir(mode=existing_mode)
    os.chmod(cache, existing_mode)
    mounter(f"s3://{bucket}", cache_dir=cache)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
