"""The thin llfuse adapter: the ONLY module that imports llfuse.

Each handler converts arguments, calls the filesystem core with the llfuse global lock
released (the core has its own locks, and misses block on the event loop), and converts the
result. Errors are mapped in one place, ``_errors``: an ``ObjfsError`` becomes its errno; any
other exception is logged with its traceback and becomes EIO, because llfuse ends its main
loop on an exception that is not ``FUSEError``. Handlers accept ``ctx=None``: llfuse 1.5.2
calls some of them (getxattr from setxattr) without it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import llfuse

from objfs.errors import ObjfsError, ReadOnly
from objfs.fs import Attributes, Filesystem
from objfs.metrics import Metrics
from objfs.tree import Kind

log = logging.getLogger(__name__)


# Answers that are a filesystem doing its job, not something going wrong: a name that does
# not exist (every lookup of a new file), an attribute that is not set (the kernel's ACL and
# security probes), a refused operation. Counted as ``fuse_OP_refused_total``; everything
# else (EIO, ESTALE, ENOSPC, EACCES from the origin, ...) is ``fuse_OP_errors_total``, what
# ``objfs stats`` shows as errors.
_REFUSALS = frozenset({
    errno.ENOENT, errno.ENODATA, llfuse.ENOATTR, errno.EEXIST, errno.ENOTEMPTY,
    errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
    errno.ENAMETOOLONG, errno.EXDEV, errno.ELOOP, errno.EINVAL, errno.EILSEQ, errno.ERANGE,
    errno.EFBIG,
})


_OUR_XATTRS = b"user.objfs."  # the only extended attributes objfs has (Filesystem._xattrs)


class _errors:
    """The one per-operation hook: errno mapping, counts, errors and latency per op type.

    A class rather than ``@contextmanager`` and metric names built once per op: this runs on
    every FUSE request, and the generator-based version cost ~9 µs against ~3 µs for this.
    Counting is thread-local dict updates (``Metrics``), no lock.
    """

    __slots__ = ("_op", "_metrics", "_names", "_started")
    _NAMES: dict[str, tuple[str, str, str, str]] = {}

    def __init__(self, op: str, metrics: Metrics) -> None:
        self._op = op
        self._metrics = metrics
        names = self._NAMES.get(op)
        if names is None:
            names = self._NAMES[op] = (f"fuse_{op}_total", f"fuse_{op}_errors_total",
                                       f"fuse_{op}_seconds_total", f"fuse_{op}_refused_total")
        self._names = names

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        total, errors, seconds, refused = self._names
        inc = self._metrics.inc
        inc(total)
        inc(seconds, time.perf_counter() - self._started)
        if exc is None or isinstance(exc, GeneratorExit):
            return False  # GeneratorExit: the kernel's readdir buffer is full, not an error
        if isinstance(exc, llfuse.FUSEError):
            inc(refused if exc.errno in _REFUSALS else errors)
            return False
        if isinstance(exc, ObjfsError):
            if exc.errno in _REFUSALS:
                inc(refused)
                log.debug("%s: %s", self._op, exc)
            else:
                inc(errors)
                log.log(exc.log_level, "%s: %s", self._op, exc)
            raise llfuse.FUSEError(exc.errno) from None
        inc(errors)
        if isinstance(exc, Exception):
            log.exception("%s failed unexpectedly", self._op, exc_info=exc)
            raise llfuse.FUSEError(errno.EIO) from None
        return False


def _entry(attrs: Attributes) -> llfuse.EntryAttributes:
    entry = llfuse.EntryAttributes()
    entry.st_ino = attrs.ino
    entry.generation = 0
    entry.entry_timeout = attrs.timeout_s
    entry.attr_timeout = attrs.timeout_s
    entry.st_mode = attrs.mode
    entry.st_nlink = attrs.nlink
    entry.st_uid = attrs.uid
    entry.st_gid = attrs.gid
    entry.st_rdev = 0
    entry.st_size = attrs.size
    entry.st_blksize = attrs.blksize
    entry.st_blocks = attrs.blocks
    entry.st_atime_ns = attrs.mtime_ns
    entry.st_mtime_ns = attrs.mtime_ns
    entry.st_ctime_ns = attrs.mtime_ns
    return entry


# A notification written to /dev/fuse (include/uapi/linux/fuse.h): fuse_out_header
# {len, error = notify code, unique = 0} then fuse_notify_inval_inode_out {ino, off, len}
# (off < 0: attributes only) or fuse_notify_inval_entry_out {parent, namelen, padding} and
# the name with its NUL.
_FUSE_NOTIFY_INVAL_INODE = 2
_FUSE_NOTIFY_INVAL_ENTRY = 3
_INVAL_INODE = struct.Struct("=IiQQqq")
_INVAL_ENTRY = struct.Struct("=IiQQII")


def fuse_device_fds() -> set[int]:
    """Descriptors of /dev/fuse open in this process."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.add(int(name))
        except OSError:  # closed while we looked (the listing's own descriptor, for one)
            continue
    return fds


class KernelCacheNotifier:
    """Tells the kernel to drop the pages and attributes it caches of inodes.

    ``llfuse.invalidate_inode`` only queues the request for a thread of llfuse's: it returns
    before the kernel has dropped anything, so it cannot order "old pages gone" before "new
    version visible". ``invalidate_now`` writes the notification to the FUSE device itself:
    the kernel handles it inside the write(2), dropping the pages (and waiting for pages
    being read to be unlocked) before the write returns. It must not run in a FUSE handler,
    where a page lock held by a read that needs a worker could wait on us; handlers use
    ``invalidate`` (queued), as libfuse advises.
    """

    def __init__(self) -> None:
        self.device_fd: int | None = None  # set once mounted
        self._warned = threading.Event()

    def invalidate(self, inos: list[int]) -> None:
        for ino in inos:
            try:
                llfuse.invalidate_inode(ino, attr_only=False)
            except OSError as exc:  # ENOENT: the kernel does not know the inode
                if exc.errno != errno.ENOENT:
                    log.debug("invalidate_inode(%d): %s", ino, exc)

    def invalidate_now(self, inos: list[int], *, attrs_only: bool = False) -> None:
        fd = self.device_fd
        if fd is None:
            self._warn_async()
            for ino in inos:
                try:
                    llfuse.invalidate_inode(ino, attr_only=attrs_only)
                except OSError:
                    pass
            return
        offset = -1 if attrs_only else 0
        for ino in inos:
            try:
                os.write(fd, _INVAL_INODE.pack(_INVAL_INODE.size, _FUSE_NOTIFY_INVAL_INODE, 0,
                                               ino, offset, 0))
            except OSError as exc:  # ENOENT: the kernel does not know the inode
                if exc.errno != errno.ENOENT:
                    log.warning("dropping the kernel's cache of inode %d failed: %s", ino, exc)

    def invalidate_attrs_now(self, inos: list[int]) -> None:
        self.invalidate_now(inos, attrs_only=True)

    def invalidate_entries_now(self, entries: list[tuple[int, bytes]]) -> None:
        fd = self.device_fd
        if fd is None:
            self._warn_async()
            for parent, name in entries:
                try:
                    llfuse.invalidate_entry(parent, name)
                except OSError:
                    pass
            return
        for parent, name in entries:
            try:
                os.write(fd, _INVAL_ENTRY.pack(_INVAL_ENTRY.size + len(name) + 1,
                                               _FUSE_NOTIFY_INVAL_ENTRY, 0, parent, len(name),
                                               0) + name + b"\0")
            except OSError as exc:  # ENOENT: the kernel has no such entry cached
                if exc.errno != errno.ENOENT:
                    log.warning("dropping the kernel's entry %r in inode %d failed: %s",
                                name, parent, exc)

    def _warn_async(self) -> None:
        if not self._warned.is_set():
            self._warned.set()
            log.warning("no FUSE device descriptor found: kernel cache invalidation is "
                        "asynchronous, so a reader may briefly see the old version of a "
                        "file replaced at the origin")


class FuseOperations(llfuse.Operations):
    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self.notifier = KernelCacheNotifier()
        fs.invalidate_inodes = self.notifier.invalidate
        fs.invalidate_inodes_now = self.notifier.invalidate_now
        fs.invalidate_attrs_now = self.notifier.invalidate_attrs_now
        fs.invalidate_entries_now = self.notifier.invalidate_entries_now

    def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> llfuse.EntryAttributes:
        with _errors("lookup", self.fs.metrics), llfuse.lock_released:
            return _entry(self.fs.lookup(parent_inode, name))

    def getattr(self, inode: int, ctx: Any = None) -> llfuse.EntryAttributes:
        with _errors("getattr", self.fs.metrics), llfuse.lock_released:
            return _entry(self.fs.getattr(inode))

    def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        with _errors("access", self.fs.metrics), llfuse.lock_released:
            self.fs.access(inode, mode)
            return True

    def opendir(self, inode: int, ctx: Any = None) -> int:
        with _errors("opendir", self.fs.metrics), llfuse.lock_released:
            return self.fs.opendir(inode)

    def readdir(self, fh: int, off: int) -> Iterator[tuple[bytes, llfuse.EntryAttributes, int]]:
        # A generator: llfuse drives it with the lock held; each step is one LMDB cursor move.
        with _errors("readdir", self.fs.metrics):
            for name, ino, kind, next_off in self.fs.readdir(fh, off):
                entry = llfuse.EntryAttributes()
                entry.st_ino = ino
                entry.st_mode = stat.S_IFDIR if kind is Kind.DIR else stat.S_IFREG
                yield name, entry, next_off

    def releasedir(self, fh: int) -> None:
        with _errors("releasedir", self.fs.metrics):
            self.fs.releasedir(fh)

    def open(self, inode: int, flags: int, ctx: Any = None) -> int:
        with _errors("open", self.fs.metrics), llfuse.lock_released:
            return self.fs.open(inode, flags)

    def read(self, fh: int, off: int, size: int) -> bytes:
        with _errors("read", self.fs.metrics):
            # A hit that needs no waiting is served holding llfuse's lock: releasing and
            # taking it back cost more than the hit itself (a quarter of warm random IOPS).
            data = self.fs.read_cached(fh, off, size)
            if data is not None:
                return data
            with llfuse.lock_released:
                return self.fs.read(fh, off, size)

    def release(self, fh: int) -> None:
        with _errors("release", self.fs.metrics), llfuse.lock_released:
            self.fs.release(fh)  # may finish an upload whose flush never came

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Inode numbers are stable and never reused, so there is no lookup count to keep.
        return None

    def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if ctx is None:
            # llfuse's setxattr with XATTR_CREATE/XATTR_REPLACE asks getxattr first, and is
            # the only caller without a ctx: answer what setxattr itself answers.
            raise llfuse.FUSEError(ReadOnly.errno if self.fs.config.read_only
                                   else errno.ENOTSUP)
        with _errors("getxattr", self.fs.metrics):
            if not name.startswith(_OUR_XATTRS):
                # ls -l asks every entry for security.selinux and system.posix_acl_access:
                # answered here, holding llfuse's lock, without a lock hand-off or a tree read.
                raise llfuse.FUSEError(llfuse.ENOATTR)
        with _errors("getxattr", self.fs.metrics), llfuse.lock_released:
            try:
                return self.fs.getxattr(inode, name)
            except ObjfsError as exc:
                if exc.errno == errno.ENODATA:
                    raise llfuse.FUSEError(llfuse.ENOATTR) from None
                raise

    def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        with _errors("listxattr", self.fs.metrics), llfuse.lock_released:
            return self.fs.listxattr(inode)

    def statfs(self, ctx: Any = None) -> llfuse.StatvfsData:
        with _errors("statfs", self.fs.metrics), llfuse.lock_released:
            data = llfuse.StatvfsData()
            for name, value in self.fs.statfs().items():
                setattr(data, name, value)
            return data

    # ---- writing and the namespace ---------------------------------------------------------

    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: Any = None) -> tuple[int, llfuse.EntryAttributes]:
        with _errors("create", self.fs.metrics), llfuse.lock_released:
            uid, gid = _owner(ctx, self.fs)
            fh, attrs = self.fs.create(parent_inode, name, mode, flags, uid, gid)
            return fh, _entry(attrs)

    def write(self, fh: int, off: int, buf: bytes) -> int:
        with _errors("write", self.fs.metrics), llfuse.lock_released:
            return self.fs.write(fh, off, buf)

    def flush(self, fh: int) -> None:
        with _errors("flush", self.fs.metrics), llfuse.lock_released:
            self.fs.flush(fh)

    def fsync(self, fh: int, datasync: bool) -> None:
        with _errors("fsync", self.fs.metrics), llfuse.lock_released:
            self.fs.fsync(fh)

    def setattr(self, inode: int, attr: llfuse.EntryAttributes, fields: Any, fh: int | None,
                ctx: Any = None) -> llfuse.EntryAttributes:
        with _errors("setattr", self.fs.metrics), llfuse.lock_released:
            return _entry(self.fs.setattr(
                inode,
                size=attr.st_size if fields.update_size else None,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                fh=fh))

    def mkdir(self, parent_inode: int, name: bytes, mode: int,
              ctx: Any = None) -> llfuse.EntryAttributes:
        with _errors("mkdir", self.fs.metrics), llfuse.lock_released:
            uid, gid = _owner(ctx, self.fs)
            return _entry(self.fs.mkdir(parent_inode, name, mode, uid, gid))

    def rmdir(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        with _errors("rmdir", self.fs.metrics), llfuse.lock_released:
            self.fs.rmdir(parent_inode, name)

    def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        with _errors("unlink", self.fs.metrics), llfuse.lock_released:
            self.fs.unlink(parent_inode, name)

    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
               name_new: bytes, ctx: Any = None) -> None:
        with _errors("rename", self.fs.metrics), llfuse.lock_released:
            self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new)

    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: Any = None) -> llfuse.EntryAttributes:
        with _errors("symlink", self.fs.metrics), llfuse.lock_released:
            uid, gid = _owner(ctx, self.fs)
            return _entry(self.fs.symlink(parent_inode, name, target, uid, gid))

    def readlink(self, inode: int, ctx: Any = None) -> bytes:
        with _errors("readlink", self.fs.metrics), llfuse.lock_released:
            return self.fs.readlink(inode)

    def link(self, inode: int, new_parent_inode: int, new_name: bytes,
             ctx: Any = None) -> llfuse.EntryAttributes:
        # Hard links have no object-store equivalent.
        raise llfuse.FUSEError(ReadOnly.errno if self.fs.config.read_only else errno.EPERM)

    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: Any = None) -> llfuse.EntryAttributes:
        if self.fs.config.read_only:
            raise llfuse.FUSEError(ReadOnly.errno)
        if not stat.S_ISREG(mode):  # devices, fifos, sockets: nothing to store them as
            raise llfuse.FUSEError(errno.EPERM)
        with _errors("mknod", self.fs.metrics), llfuse.lock_released:
            uid, gid = _owner(ctx, self.fs)
            fh, attrs = self.fs.create(parent_inode, name, mode, os.O_WRONLY | os.O_EXCL,
                                       uid, gid)
            self.fs.flush(fh)
            self.fs.release(fh)
            return _entry(self.fs.getattr(attrs.ino))

    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        raise llfuse.FUSEError(ReadOnly.errno if self.fs.config.read_only else errno.ENOTSUP)

    def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        raise llfuse.FUSEError(ReadOnly.errno if self.fs.config.read_only else errno.ENOTSUP)


def _owner(ctx: Any, fs: Filesystem) -> tuple[int, int]:
    """Owner of a new entry: the caller's (as a local filesystem does)."""
    if ctx is None:
        return fs.config.uid, fs.config.gid
    return ctx.uid, ctx.gid


def mount_options(*, fsname: str, allow_other: bool, read_only: bool, extra: tuple[str, ...]) -> set[str]:
    options = set(llfuse.default_options)
    options.add(f"fsname={fsname}")
    options.add("subtype=objfs")
    options.add("default_permissions")
    if read_only:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    options.update(extra)
    return options


def serve(fs: Filesystem, mountpoint: str, options: set[str], workers: int,
          on_mounted: Any = None) -> int | None:
    """Mount, call ``on_mounted()``, run the FUSE loop until unmount or signal; then clean up.

    Returns the signal number that stopped the loop, or None if it was unmounted.
    """
    ops = FuseOperations(fs)
    before = fuse_device_fds()
    llfuse.init(ops, mountpoint, options)
    ours = fuse_device_fds() - before
    if len(ours) == 1:
        ops.notifier.device_fd = ours.pop()
    unmount = True
    try:
        if on_mounted is not None:
            on_mounted()
        result = llfuse.main(workers=workers)
        unmount = result is not None  # unmounted from outside: nothing left to unmount
        return result
    finally:
        llfuse.close(unmount=unmount)
