"""The filesystem core: POSIX semantics over the metadata tree and the read path.

Knows nothing about FUSE: the adapter (``fuse_adapter``) converts arguments and results, and
tests drive this class directly. Every method may raise an ``ObjfsError`` carrying its errno.
Inode numbers are the tree's (stable across restarts); file handles pin the object version
seen at open, so a handle never mixes bytes of two versions (a remote change is ESTALE).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import stat
import threading
from collections.abc import Callable, Iterator

import cachetools

from objfs.cache.pagecache import PageCache
from objfs.cache.pages import PAGE_SIZE, ObjectVersion
from objfs.cache.readahead import ReadStream
from objfs.config import MountConfig
from objfs.errors import InvalidArgument, ObjfsError, ReadOnly
from objfs.metrics import Metrics
from objfs.tree import ROOT_INO, Inode, Kind, MetadataTree

DIR_SIZE = 4096
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


@dataclasses.dataclass(frozen=True, slots=True)
class Attributes:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    blksize: int
    timeout_s: float

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclasses.dataclass
class FileHandle:
    inode: Inode
    version: ObjectVersion
    stream: ReadStream


@dataclasses.dataclass
class DirHandle:
    ino: int
    # Offsets handed out by the last readdir call -> the entry name at that offset, so the next
    # call resumes with one cursor seek. Bounded by what one kernel buffer holds.
    resume: dict[int, bytes] = dataclasses.field(default_factory=dict)


class Filesystem:
    """Thread-safe: handles are in dicts guarded by ``_handles_lock``; the tree and the page
    cache are thread-safe themselves."""

    def __init__(self, config: MountConfig, tree: MetadataTree, cache: PageCache, *,
                 metrics: Metrics, xattrs: dict[str, str] | None = None) -> None:
        self.config = config
        self.tree = tree
        self.cache = cache
        self.metrics = metrics
        self._root_xattrs = {k: v.encode() for k, v in (xattrs or {}).items()}
        self._handles_lock = threading.Lock()
        self._files: dict[int, FileHandle] = {}  # guarded by _handles_lock
        self._dirs: dict[int, DirHandle] = {}    # guarded by _handles_lock
        self._next_fh = itertools.count(1)
        # ino -> ETag last opened: a re-open of the same version is served from the kernel's
        # page cache (llfuse replies keep_cache), which the daemon never sees; count those.
        self._opened: cachetools.LRUCache[int, str] = cachetools.LRUCache(65536)  # _handles_lock
        metrics.gauge("readahead_window_pages_max", self._largest_readahead_window)
        metrics.gauge("fuse_open_files", lambda: len(self._files))
        # Set by the adapter: tell the kernel to drop cached pages/attrs of these inodes.
        self.invalidate_inodes: Callable[[list[int]], None] = lambda inos: None

    # ---- attributes ------------------------------------------------------------------------

    def attributes(self, inode: Inode) -> Attributes:
        c = self.config
        if inode.kind is Kind.DIR:
            return Attributes(inode.ino, stat.S_IFDIR | c.dir_mode, 2, c.uid, c.gid, DIR_SIZE,
                              inode.mtime_ns, PAGE_SIZE, c.attr_timeout_s)
        return Attributes(inode.ino, stat.S_IFREG | c.file_mode, 1, c.uid, c.gid, inode.size,
                          inode.mtime_ns, PAGE_SIZE, c.attr_timeout_s)

    def lookup(self, parent: int, name: bytes) -> Attributes:
        return self.attributes(self.tree.lookup(parent, name))

    def getattr(self, ino: int) -> Attributes:
        return self.attributes(self.tree.get(ino))

    def access(self, ino: int, mode: int) -> None:
        self.tree.get(ino)
        if mode & os.W_OK:
            raise ReadOnly("read-only mount")

    # ---- directories -----------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        inode = self.tree.get(ino)
        if not inode.is_dir:
            raise ObjfsError("not a directory", errno_value=errno.ENOTDIR)
        fh = next(self._next_fh)
        with self._handles_lock:
            self._dirs[fh] = DirHandle(ino)
        return fh

    def readdir(self, fh: int, offset: int) -> Iterator[tuple[bytes, int, Kind, int]]:
        """Yield (name, ino, kind, next_offset) from ``offset`` on.

        Offsets: 1 is '.', 2 is '..', then 3, 4, ... for children in name order. A resume
        offset from the previous call is one cursor seek; any other offset (seekdir) is a
        counted walk, correct but linear.
        """
        with self._handles_lock:
            handle = self._dirs.get(fh)
        if handle is None:
            raise ObjfsError("bad directory handle", errno_value=errno.EBADF)
        resume, handle.resume = handle.resume, {}
        if offset < 1:
            yield b".", handle.ino, Kind.DIR, 1
        if offset < 2:
            parent = self.tree.get(handle.ino).parent
            yield b"..", parent, Kind.DIR, 2
        position = max(offset, 2)
        after = resume.get(offset) if offset > 2 else None
        entries = self.tree.readdir(handle.ino, after)
        if offset > 2 and after is None:
            entries = itertools.islice(entries, offset - 2, None)
        for entry in entries:
            position += 1
            handle.resume[position] = entry.name
            yield entry.name, entry.ino, entry.kind, position

    def releasedir(self, fh: int) -> None:
        with self._handles_lock:
            self._dirs.pop(fh, None)

    # ---- files -----------------------------------------------------------------------------

    def open(self, ino: int, flags: int) -> int:
        inode = self.tree.get(ino)
        if inode.is_dir:
            raise ObjfsError("is a directory", errno_value=errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise ReadOnly("read-only mount")
        version = self.version_of(inode)
        fh = next(self._next_fh)
        with self._handles_lock:
            if self._opened.get(ino) == inode.etag:
                self.metrics.inc("read_kernel_cache_reopens_total")
            self._opened[ino] = inode.etag
            self._files[fh] = FileHandle(inode, version, self.cache.new_stream())
        return fh

    def _largest_readahead_window(self) -> int:
        with self._handles_lock:
            handles = list(self._files.values())
        return max((h.stream.window_pages for h in handles), default=0)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        with self._handles_lock:
            handle = self._files.get(fh)
        if handle is None:
            raise ObjfsError("bad file handle", errno_value=errno.EBADF)
        if offset < 0 or size < 0:
            raise InvalidArgument("negative offset or size")
        data = self.cache.read(handle.version, offset, size, handle.stream)
        self.metrics.inc("fuse_read_bytes", len(data))
        return data

    def release(self, fh: int) -> None:
        with self._handles_lock:
            self._files.pop(fh, None)

    # ---- extended attributes ---------------------------------------------------------------

    def _xattrs(self, ino: int) -> dict[str, bytes]:
        inode = self.tree.get(ino)
        attrs: dict[str, bytes] = {}
        if ino == ROOT_INO:
            attrs.update(self._root_xattrs)
        if not inode.is_dir:
            attrs["user.objfs.etag"] = inode.etag.encode()
        attrs["user.objfs.key"] = (self.config.store.prefix + inode.relpath).encode()
        return attrs

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self._xattrs(ino).get(name.decode(errors="replace"))
        if value is None:
            raise ObjfsError("no such attribute", errno_value=errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return [k.encode() for k in self._xattrs(ino)]

    def statfs(self) -> dict[str, int]:
        files = self.tree.count()
        blocks = 1 << 40  # an object store has no meaningful capacity: report 1 EiB of 1 MiB blocks
        return {"f_bsize": PAGE_SIZE, "f_frsize": PAGE_SIZE, "f_blocks": blocks,
                "f_bfree": blocks, "f_bavail": blocks, "f_files": files + (1 << 20),
                "f_ffree": 1 << 20, "f_favail": 1 << 20, "f_namemax": 255}

    # ---- control commands ------------------------------------------------------------------

    def resolve(self, relpath: str) -> Inode:
        """The inode at ``relpath`` (relative to the mount root; '' is the root)."""
        inode = self.tree.get(ROOT_INO)
        for name in (p for p in relpath.strip("/").split("/") if p):
            inode = self.tree.lookup(inode.ino, name.encode())
        return inode

    def version_of(self, inode: Inode) -> ObjectVersion:
        return ObjectVersion(self.config.store.bucket, self.config.store.prefix + inode.relpath,
                             inode.etag, inode.size)

    def drop_cached(self, relpath: str) -> dict[str, int]:
        """Remove the cached pages of a file, or of every file under a directory."""
        files = pages = 0
        pending = [self.resolve(relpath)]
        while pending:
            inode = pending.pop()
            if inode.is_dir:
                pending.extend(self.tree.get(e.ino) for e in self.tree.readdir(inode.ino))
                continue
            files += 1
            pages += self.cache.drop(self.version_of(inode))
        return {"files": files, "pages_dropped": pages}

    def changed(self, inos: list[int]) -> None:
        """The tree saw these inodes change or disappear at the origin."""
        self.invalidate_inodes(inos)
