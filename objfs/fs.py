"""The filesystem core: POSIX semantics over the metadata tree and the read path.

Knows nothing about FUSE: the adapter (``fuse_adapter``) converts arguments and results, and
tests drive this class directly. Every method may raise an ``ObjfsError`` carrying its errno.
Inode numbers are the tree's (stable across restarts); file handles pin the object version
seen at open, so a handle never mixes bytes of two versions (a remote change is ESTALE).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cachetools

from objfs.cache.pagecache import PageCache
from objfs.cache.pages import PAGE_SIZE, ObjectVersion
from objfs.cache.readahead import ReadStream
from objfs.config import SMALL_OBJECT_BYTES, MiB, MountConfig
from objfs.errors import (InvalidArgument, NotFound, ObjfsError, ReadOnly,
                          StaleObject, from_oserror)
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from objfs.store import ObjectInfo, ObjectStore
from objfs.tree import ROOT_INO, Attrs, Inode, Kind, MetadataTree, invalid_reason
from objfs.writer import (NotSequential, PartSchedule, SequentialUpload, StagedFile,
                          UploadFailed, UploadSettings, WriteBudget)

log = logging.getLogger(__name__)

DIR_SIZE = 4096
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_BLOCK_SIZE = 4 * MiB
# An open waits at most this long for the kernel's pages of a replaced version to be dropped.
_CHANGE_GATE_TIMEOUT_S = 30.0
# How long ``changed`` lets reads of a replaced version finish before dropping its pages.
_READS_DRAIN_TIMEOUT_S = 5.0
_NAME_MAX = 255
# Directory renames copy this many objects at once (server-side copies: no data passes here).
_RENAME_COPY_CONCURRENCY = 16


def _mtime_text(mtime_ns: int) -> str:
    """Seconds with up to 9 decimals, as s3fs writes ``x-amz-meta-mtime``."""
    return f"{mtime_ns // 10**9}.{mtime_ns % 10**9:09d}".rstrip("0").rstrip(".")


def _attrs_from_metadata(metadata: dict[str, str] | Any) -> Attrs:
    """``x-amz-meta-mode/uid/gid/mtime`` as s3fs (and objfs) write them; what does not parse
    is left out."""
    def number(name: str) -> int | None:
        try:
            return int(metadata[name])
        except (KeyError, ValueError):
            return None
    mtime = None
    try:
        mtime = int(round(float(metadata["mtime"]) * 1e9))
    except (KeyError, ValueError):
        pass
    mode = number("mode")
    if mode is not None and not 0 <= mode < 1 << 32:
        mode = None
    elif mode is not None and stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFLNK):
        mode = stat.S_IMODE(mode)  # an object is a file or a symlink, nothing else
    return Attrs(mode=mode, uid=number("uid"), gid=number("gid"), mtime_ns=mtime)


def _merge_attrs(base: Attrs, over: Attrs | None) -> Attrs:
    """``base`` with every field ``over`` sets replacing it (attributes set here win)."""
    if over is None:
        return base
    return Attrs(*(o if o is not None else b for b, o in
                   zip((base.mode, base.uid, base.gid, base.mtime_ns),
                       (over.mode, over.uid, over.gid, over.mtime_ns))))


def _error(message: str, code: int) -> ObjfsError:
    return ObjfsError(message, errno_value=code)


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
class WriteState:
    """One file being written on this host, shared by all its write handles.

    The content is in exactly one place: ``upload`` (sequential writes streaming out as
    multipart parts), ``staged`` (a local file, for any other write pattern, uploaded at
    flush), or, when both are None, the object version ``etag``/``size`` at the origin (or
    nothing at all after a truncate to 0, ``dirty`` then says it must be published).
    ``lock`` guards every field but ``handles`` (guarded by ``Filesystem._handles_lock``);
    sequential appends run without it (``SequentialUpload`` orders them itself).
    """

    ino: int
    key: str
    relpath: str
    etag: str
    size: int
    mtime_ns: int
    metadata: dict[str, str]
    upload: SequentialUpload | None = None
    staged: StagedFile | None = None
    dirty: bool = False
    wrote: bool = False     # write() called since the last publish: a flush publishes
    mtime_explicit: bool = False  # utimens after the last write: its time is the mtime
    upload_metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    unlinked: bool = False
    error: ObjfsError | None = None  # a failure close/fsync must still report
    handles: int = 0
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)


@dataclasses.dataclass
class FileHandle:
    """One open file. ``version`` is what it reads, pinned at open (and moved along by a
    rename, whose copy has the same bytes). ``write`` is the file's write state for a handle
    open for writing; ``follow`` is the write state a read handle saw at open (a publish by
    the last writer's release may still be coming): while it exists, reads go through it,
    and afterwards they read the version it published."""

    inode: Inode
    version: ObjectVersion
    stream: ReadStream
    write: WriteState | None = None
    follow: WriteState | None = None
    stale: bool = False  # the object changed at the origin: reads are ESTALE


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
                 metrics: Metrics, store: ObjectStore | None = None,
                 loop: EventLoopThread | None = None,
                 xattrs: dict[str, str] | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.config = config
        self.tree = tree
        self.cache = cache
        self.metrics = metrics
        self.store = store
        self.loop = loop
        self._clock = clock
        self._writes: dict[int, WriteState] = {}  # ino -> state; guarded by _handles_lock
        metrics.updown("upload_parts_inflight")
        if not config.read_only:
            if store is None or loop is None:
                raise ValueError("a writable filesystem needs the store and the loop")
            self._staging_dir = config.cache_dir / "staging"
            self._staging_dir.mkdir(parents=True, exist_ok=True)
            self._uploads = UploadSettings(
                store, loop, WriteBudget(config.write_buffer_bytes, metrics=metrics),
                PartSchedule(block_size=_BLOCK_SIZE,
                             blocks_per_part=config.part_size_bytes // _BLOCK_SIZE,
                             min_part_bytes=min(5 * MiB, config.part_size_bytes)),
                concurrency=config.upload_concurrency, metrics=metrics,
                staging_dir=str(self._staging_dir),
                spool_floor_bytes=config.cache_free_floor_bytes)
        self._root_xattrs = {k: v.encode() for k, v in (xattrs or {}).items()}
        self._handles_lock = threading.Lock()
        self._files: dict[int, FileHandle] = {}  # guarded by _handles_lock
        self._dirs: dict[int, DirHandle] = {}    # guarded by _handles_lock
        # ino -> open file handles / reads in progress (guarded by _handles_lock);
        # ``_reads_done`` is notified when an inode's reads in progress drop to 0.
        self._opens: dict[int, int] = {}
        self._reading: dict[int, int] = {}
        self._reads_done = threading.Condition(self._handles_lock)
        # Entries gone from the tree (unlink, rename over them) that handles still have open:
        # ino -> (last record, attributes set here); their cached pages are dropped when the
        # last handle closes (``_drop_at_close``). Both guarded by _handles_lock.
        self._orphans: dict[int, tuple[Inode, Attrs | None]] = {}
        self._drop_at_close: dict[int, ObjectVersion] = {}
        # Write states dropped so far (guarded by _handles_lock): a tree record read while
        # it did not change is not older than any publish of this host (see _write_state).
        self._forgotten = 0
        self._next_fh = itertools.count(1)
        # ino -> ETag last opened: a re-open of the same version is served from the kernel's
        # page cache (llfuse replies keep_cache), which the daemon never sees; count those.
        self._opened: cachetools.LRUCache[int, str] = cachetools.LRUCache(65536)  # _handles_lock
        # ino -> set once the kernel no longer holds pages of its replaced version (changing).
        self._changing: dict[int, threading.Event] = {}  # guarded by _handles_lock
        metrics.gauge("readahead_window_pages_max", self._largest_readahead_window)
        metrics.gauge("fuse_open_files", lambda: len(self._files))
        # Set by the adapter: tell the kernel to drop cached pages/attrs of these inodes,
        # queued (safe inside a FUSE handler), or done by the time it returns (never call
        # that one from a handler).
        self.invalidate_inodes: Callable[[list[int]], None] = lambda inos: None
        self.invalidate_inodes_now: Callable[[list[int]], None] = lambda inos: None
        # ... and names (parent inode, name) and attributes only, done by the time they
        # return (refresher thread).
        self.invalidate_entries_now: Callable[[list[tuple[int, bytes]]], None] = \
            lambda entries: None
        self.invalidate_attrs_now: Callable[[list[int]], None] = lambda inos: None

    # ---- attributes ------------------------------------------------------------------------

    def attributes(self, inode: Inode, set_here: Attrs | None = None) -> Attributes:
        """Defaults from the config, overridden by what was set here (chmod, chown, utimens,
        symlink; ``set_here`` for an entry no longer in the tree) and, for a file being
        written, by its current size."""
        c = self.config
        mtime = inode.mtime_ns
        state = self._writes.get(inode.ino)
        pending = state is not None and state.dirty  # unpublished writes: their size and time
        if inode.kind is Kind.DIR:
            # A directory's record counts its subdirectories: link count 2 + that, as on disk.
            mode, uid, gid, size, nlink = (stat.S_IFDIR | c.dir_mode, c.uid, c.gid, DIR_SIZE,
                                           2 + inode.size)
        else:
            mode, uid, gid, size, nlink = stat.S_IFREG | c.file_mode, c.uid, c.gid, inode.size, 1
            if pending:
                size, mtime = state.size, state.mtime_ns
        if set_here is None:
            set_here = self.tree.attrs(inode.ino)
        if c.object_metadata != "off" and inode.kind is Kind.FILE and inode.etag:
            from_object = self._object_attrs(inode)
            if from_object is not None:
                set_here = _merge_attrs(from_object, set_here)
        if set_here is not None:
            if set_here.mode is not None:
                mode = set_here.mode if stat.S_IFMT(set_here.mode) else \
                    stat.S_IFMT(mode) | set_here.mode
            uid = uid if set_here.uid is None else set_here.uid
            gid = gid if set_here.gid is None else set_here.gid
            if set_here.mtime_ns is not None and not pending:
                mtime = set_here.mtime_ns
        return Attributes(inode.ino, mode, nlink, uid, gid, size, mtime, PAGE_SIZE,
                          c.attr_timeout_s)

    def _object_attrs(self, inode: Inode) -> Attrs | None:
        """What the object's own metadata says of its mode and owner (``--object-metadata``):
        one HEAD per version, the first time it is needed, remembered in the tree. A listing
        carries no metadata, so without this a symlink or a chmod made through another host
        (or before a fresh cache dir) shows as a plain file with the default mode."""
        if self.config.object_metadata == "small" and inode.size > SMALL_OBJECT_BYTES:
            return None
        known = self.tree.object_attrs(inode)
        if known is not None:
            return known
        if self.store is None or self.loop is None:
            return None
        key = self.config.store.prefix + inode.relpath
        try:
            meta = self.loop.run(self.store.head_object(key))
        except ObjfsError as exc:
            log.debug("no metadata for %s: %s", key, exc)
            return None
        self.metrics.inc("tree_object_metadata_fetched_total")
        attrs = _attrs_from_metadata(meta.metadata) if meta.info.etag == inode.etag else None
        if attrs is not None:
            self.tree.set_object_attrs(inode, attrs)
        return attrs

    def lookup(self, parent: int, name: bytes) -> Attributes:
        if len(name) > _NAME_MAX:
            raise _error("name too long", errno.ENAMETOOLONG)
        return self.attributes(self.tree.lookup(parent, name))

    def getattr(self, ino: int) -> Attributes:
        try:
            return self.attributes(self.tree.get(ino))
        except NotFound:
            with self._handles_lock:
                orphan = self._orphans.get(ino)
            if orphan is None:
                raise
            return self.attributes(*orphan)  # unlinked, still open: fstat works

    def _inode(self, ino: int) -> Inode:
        """The tree's record of ``ino``, or the last one of an unlinked entry still open."""
        try:
            return self.tree.get(ino)
        except NotFound:
            with self._handles_lock:
                orphan = self._orphans.get(ino)
            if orphan is None:
                raise
            return orphan[0]

    def access(self, ino: int, mode: int) -> None:
        self.tree.get(ino)
        if mode & os.W_OK and self.config.read_only:
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
            try:
                parent = self._inode(handle.ino).parent
            except NotFound:  # removed while open: it lists nothing
                parent = handle.ino
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
        deadline = time.monotonic() + _CHANGE_GATE_TIMEOUT_S
        writing = bool(flags & _WRITE_FLAGS)
        while True:
            self._wait_for_change(ino, deadline)
            with self._handles_lock:
                forgotten = self._forgotten
            inode = self.tree.get(ino)
            if inode.is_dir:
                raise _error("is a directory", errno.EISDIR)
            if stat.S_ISLNK(self.attributes(inode).mode):
                raise _error("a symlink (objfs does not follow it in open)", errno.ELOOP)
            write = None
            if writing:
                if self.config.read_only:
                    raise ReadOnly("read-only mount")
                write = self._write_state(ino)
                if flags & os.O_TRUNC:
                    self._truncate(write, 0)
            with self._handles_lock:
                if write is None and ino in self._changing:
                    continue  # the version read above is being replaced: wait, read again
                # A read handle of a file whose write state exists (its last writer's
                # release may still be publishing) follows that state, whose outcome is the
                # version it will read. If a state was dropped since the tree was read, a
                # publish may have replaced that record: read it again (see _write_state).
                follow = self._writes.get(ino) if write is None else None
                if write is None and follow is None and self._forgotten != forgotten:
                    continue
                previous = self._opened.get(ino)
                if write is None and follow is None and previous == inode.etag:
                    self.metrics.inc("read_kernel_cache_reopens_total")
                self._opened[ino] = inode.etag
                fh = next(self._next_fh)
                self._files[fh] = FileHandle(inode, self.version_of(inode),
                                             self.cache.new_stream(), write, follow)
                self._opens[ino] = self._opens.get(ino, 0) + 1
                if write is not None:
                    write.handles += 1
            return fh

    def _wait_for_change(self, ino: int, deadline: float) -> None:
        """Hold an open while the refresher replaces the version of ``ino``: until the kernel's
        pages of the old version are gone, keep_cache would serve them to the new handle next
        to new bytes from the daemon."""
        with self._handles_lock:
            gate = self._changing.get(ino)
        if gate is None:
            return
        self.metrics.inc("fuse_open_waits_for_change_total")
        if not gate.wait(max(0.0, deadline - time.monotonic())):
            raise _error(f"inode {ino} is still being replaced by a newer version after "
                         f"{_CHANGE_GATE_TIMEOUT_S:.0f}s", errno.EIO)

    def _largest_readahead_window(self) -> int:
        with self._handles_lock:
            handles = list(self._files.values())
        return max((h.stream.window_pages for h in handles), default=0)

    def _handle(self, fh: int) -> FileHandle:
        with self._handles_lock:
            handle = self._files.get(fh)
        if handle is None:
            raise _error("bad file handle", errno.EBADF)
        return handle

    def _begin_read(self, fh: int, offset: int, size: int) -> tuple[FileHandle,
                                                                     WriteState | None]:
        """Check a read and count it in progress (``changed`` waits for those); pair with
        ``_end_read``. Returns the handle and the write state its bytes come from, if the
        file is being written here (or was, when the handle opened)."""
        handle = self._handle(fh)
        if offset < 0 or size < 0:
            raise InvalidArgument("negative offset or size")
        ino = handle.inode.ino
        with self._handles_lock:
            if handle.stale:
                raise StaleObject(f"{handle.version.key} changed at the origin; reopen it")
            self._reading[ino] = self._reading.get(ino, 0) + 1
            return handle, self._writes.get(ino) or handle.follow

    def _end_read(self, handle: FileHandle) -> None:
        ino = handle.inode.ino
        with self._handles_lock:
            left = self._reading[ino] - 1
            if left:
                self._reading[ino] = left
            else:
                del self._reading[ino]
                self._reads_done.notify_all()

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle, state = self._begin_read(fh, offset, size)
        try:
            if state is not None:
                data = self._read_pending(state, offset, size)
                if data is None:
                    data = self.cache.read(
                        ObjectVersion(handle.version.bucket, state.key, state.etag, state.size),
                        offset, size, handle.stream)
            else:
                data = self.cache.read(handle.version, offset, size, handle.stream)
        finally:
            self._end_read(handle)
        self.metrics.inc("fuse_read_bytes", len(data))
        return data

    def read_cached(self, fh: int, offset: int, size: int) -> bytes | None:
        """``read`` when it can be served without waiting (every page READY and in memory),
        else None: the adapter calls this without releasing llfuse's lock, and ``read``
        with it released only when this returns None."""
        handle, state = self._begin_read(fh, offset, size)
        try:
            if state is not None:
                return None  # being written here: pending bytes, locks; the slow path
            data = self.cache.read_if_ready(handle.version, offset, size, handle.stream)
        finally:
            self._end_read(handle)
        if data is not None:
            self.metrics.inc("fuse_read_bytes", len(data))
        return data

    def release(self, fh: int) -> None:
        drop = None
        with self._handles_lock:
            handle = self._files.pop(fh, None)
            state = handle.write if handle is not None else None
            last = False
            if handle is not None:
                ino = handle.inode.ino
                opens = self._opens.get(ino, 1) - 1
                if opens:
                    self._opens[ino] = opens
                else:
                    self._opens.pop(ino, None)
                    self._orphans.pop(ino, None)
                    drop = self._drop_at_close.pop(ino, None)
            if state is not None:
                state.handles -= 1
                last = state.handles == 0
        if drop is not None:  # an unlinked file's pages, kept while it was open
            self.cache.drop(drop)
        if state is not None and last:
            try:
                self._commit(state)  # normally flush did it; this catches a missed flush
            except ObjfsError as exc:
                log.error("upload of %s at release failed: %s", state.key, exc)
            finally:
                self._forget_write(state)

    # ---- writing ---------------------------------------------------------------------------

    def _metadata(self, mode: int, uid: int, gid: int, mtime_ns: int) -> dict[str, str]:
        """POSIX attributes as object metadata, named as s3fs names them."""
        return {"mode": str(mode), "uid": str(uid), "gid": str(gid),
                "mtime": _mtime_text(mtime_ns)}

    def _metadata_of(self, inode: Inode, mtime_ns: int | None = None) -> dict[str, str]:
        a = self.attributes(inode)
        return self._metadata(a.mode, a.uid, a.gid, a.mtime_ns if mtime_ns is None else mtime_ns)

    def _write_state(self, ino: int) -> WriteState:
        """The shared write state of a file (created on first open for writing).

        A new state starts from a tree record that no publish of this host postdates: the
        previous state of a file is dropped (``_forget_write``) only after its publish has
        updated the tree, and each drop bumps ``_forgotten``; a record read while no state
        was dropped is current. (Without the check, an open racing the last writer's release
        would stage the old version and fail on it with ESTALE.) The tree is read outside
        the handles lock, which every read takes."""
        while True:
            with self._handles_lock:
                state = self._writes.get(ino)
                if state is not None:
                    return state
                forgotten = self._forgotten
            inode = self.tree.get(ino)
            metadata = self._metadata_of(inode)
            with self._handles_lock:
                state = self._writes.get(ino)
                if state is not None:
                    return state  # another opener made it meanwhile
                if self._forgotten != forgotten:
                    continue  # a publish may have replaced the record read above
                state = self._writes[ino] = WriteState(
                    ino, self.config.store.prefix + inode.relpath, inode.relpath,
                    inode.etag, inode.size, inode.mtime_ns, metadata)
                self.tree.pin(ino)
                return state

    def _forget_write(self, state: WriteState) -> None:
        """Drop the state of a file nobody has open any more. A state that became dirty
        again (a truncate racing the last release) stays for whoever made it dirty."""
        with state.lock, self._handles_lock:
            if state.handles > 0 or state.dirty or self._writes.get(state.ino) is not state:
                return
            del self._writes[state.ino]
            self._forgotten += 1
        with state.lock:
            if state.upload is not None:
                state.upload.abort()
                state.upload = None
            if state.staged is not None:
                state.staged.close()
                state.staged = None
        self.tree.unpin(state.ino)

    def _new_upload(self, state: WriteState) -> SequentialUpload:
        state.upload_metadata = dict(state.metadata)
        try:
            return self._uploads.upload(state.key, state.metadata, spooled=True)
        except OSError as exc:
            raise from_oserror(exc, f"{state.key}: cannot create its local copy") from None

    def _new_staged(self, state: WriteState) -> StagedFile:
        try:
            return StagedFile(self._staging_dir, state.key, self._uploads,
                              metadata=state.metadata)
        except OSError as exc:
            raise from_oserror(exc, f"{state.key}: cannot stage it on the cache disk") from None

    def _stage(self, state: WriteState) -> StagedFile:
        """Make the content local (caller holds ``state.lock``): a streaming upload hands
        over its local copy (nothing published, nothing downloaded); an unchanged object
        is downloaded into a staged file."""
        if state.staged is not None:
            return state.staged
        if state.upload is not None:
            try:
                staged = state.upload.spill()
            except UploadFailed as exc:  # its local copy was lost: the file cannot go on
                self._fail_write(state, exc)
                state.error = exc  # close/fsync report it too
                raise
            state.upload, state.staged = None, staged
            return staged
        staged = self._new_staged(state)
        try:
            if state.size and not state.dirty:
                staged.init_from(ObjectInfo(state.key, state.size, state.etag, state.mtime_ns))
            elif state.size:
                staged.truncate(state.size)
        except OSError as exc:
            staged.close()
            raise from_oserror(exc, f"{state.key}: staging it failed") from None
        except BaseException:
            staged.close()
            raise
        state.staged = staged
        return staged

    def write(self, fh: int, offset: int, data: bytes) -> int:
        self.metrics.inc("fuse_write_bytes", len(data))
        handle = self._handle(fh)
        state = handle.write
        if state is None:
            raise _error("file not open for writing", errno.EBADF)
        upload = state.upload
        if upload is not None:  # the streaming fast path: no lock, the upload orders writes
            try:
                upload.write(offset, data)
            except NotSequential:
                self.metrics.inc("write_fallback_to_staged_total")
            except ObjfsError:
                if state.upload is upload:
                    raise
            else:
                self._written(state, offset + len(data))
                return len(data)
        with state.lock:
            if state.upload is not None:
                try:
                    state.upload.write(offset, data)
                    self._written(state, offset + len(data))
                    return len(data)
                except NotSequential:
                    pass
            elif state.staged is None and offset == 0 and state.size == 0 \
                    and not state.unlinked:
                state.upload = self._new_upload(state)
                state.upload.write(0, data)
                self._written(state, len(data))
                return len(data)
            try:
                self._stage(state).pwrite(offset, data)
            except OSError as exc:
                raise from_oserror(exc, f"{state.key}: writing its staged copy failed") \
                    from None
            self._written(state, offset + len(data))
        return len(data)

    def _written(self, state: WriteState, end: int) -> None:
        # Racy without state.lock on the streaming path: size only grows there, and a lost
        # update of a larger value is repaired by the next write (writes are in order).
        state.dirty = True
        state.wrote = True
        state.mtime_explicit = False
        state.mtime_ns = self._clock()
        if end > state.size:
            state.size = end

    def _read_pending(self, state: WriteState, offset: int, size: int) -> bytes | None:
        """Bytes of a file being written, or None to read its origin version."""
        with state.lock:
            try:
                if state.upload is not None:
                    return state.upload.read(offset, size)  # its local copy: no publish
                if state.staged is not None:
                    return state.staged.pread(offset, max(0, min(size, state.size - offset)))
            except OSError as exc:
                raise from_oserror(exc, f"{state.key}: reading its local copy failed") \
                    from None
            if state.dirty:  # truncated to 0 and not written since
                return b""
        return None

    def _truncate(self, state: WriteState, size: int) -> None:
        if size > self._uploads.schedule.max_object_bytes:
            raise _error(f"{state.key}: {size} bytes is more than an object can hold "
                         f"({self._uploads.schedule.max_object_bytes})", errno.EFBIG)
        with state.lock:
            if size == state.size and (state.upload is None or state.upload.written == size):
                return  # ftruncate to the current size changes nothing
            if size == 0:
                if state.upload is not None:
                    state.upload.abort()
                    state.upload = None
                if state.staged is not None:
                    state.staged.close()
                    state.staged = None
            else:
                try:
                    self._stage(state).truncate(size)
                except OSError as exc:
                    raise from_oserror(exc, f"{state.key}: truncating its staged copy "
                                       "failed") from None
            state.size = size
            state.dirty = True
            state.mtime_ns = self._clock()

    def flush(self, fh: int) -> None:
        """close(2): publish the file if this is its last open write handle and data was
        written. The only place an upload failure can reach the application (release's
        errors are not delivered), so a file with data is published here.

        close(2) of every descriptor sends a flush, including the original descriptor that
        dd and shell redirections close right after dup2-ing it, before writing anything.
        Publishing then would put an empty object at the origin, replacing the previous
        checkpoint for a while; so a handle that has not written anything since its last
        publish leaves the (empty or truncated) file to ``release``, which comes when the
        last descriptor is gone."""
        handle = self._handle(fh)
        state = handle.write
        if state is None:
            return
        with self._handles_lock:
            last = state.handles <= 1
        if last and state.wrote:
            self._commit(state)

    def fsync(self, fh: int) -> None:
        """Publish the file now (S3 has no other durability point); writing may go on."""
        state = self._handle(fh).write
        if state is not None:
            self._commit(state)

    def _commit(self, state: WriteState) -> None:
        """Upload the pending content and make it the object; then record it in the tree.
        Raises ``UploadFailed`` (EIO; ENOSPC etc. for a local disk failure) if the upload
        fails or had failed (``state.error``): nothing is published, and the state is clean
        again (the file shows the object the origin still has)."""
        with state.lock:
            if state.error is not None:
                error, state.error = state.error, None
                raise UploadFailed(f"upload of {state.key} failed, nothing was published: "
                                   f"{error}", errno_value=error.errno)
            if not state.dirty:
                return
            if state.unlinked:
                self._discard_pending(state)
                return
            with self.tree.local_change(state.key):
                self._publish(state)

    def _publish(self, state: WriteState) -> None:
        """The body of ``_commit`` (caller holds ``state.lock`` and the key's local change)."""
        # As set at create/open, updated by chmod/chown/utimens meanwhile (the object's own
        # LastModified is the write time).
        metadata = dict(state.metadata)
        wrote = state.wrote
        if wrote and not state.mtime_explicit:
            metadata["mtime"] = _mtime_text(state.mtime_ns)
        stale_metadata = False
        try:
            if state.upload is not None:
                if not state.upload.set_metadata(metadata):
                    # The multipart upload was created with older metadata: a changed
                    # attribute is worth a self-copy, the write time alone is not.
                    def essential(m: dict[str, str]) -> dict[str, str]:
                        return m if state.mtime_explicit else \
                            {k: v for k, v in m.items() if k != "mtime"}
                    stale_metadata = essential(metadata) != essential(state.upload_metadata)
                info = state.upload.finish()
            elif state.staged is not None:
                info = state.staged.upload(metadata)
            else:
                info = self.loop.run(self.store.put_object(state.key, b"", metadata))
        except (ObjfsError, OSError) as exc:
            failure = exc if isinstance(exc, ObjfsError) else \
                from_oserror(exc, f"{state.key}: reading its local copy failed")
            self._fail_write(state, failure)
            raise UploadFailed(f"upload of {state.key} failed, nothing was published: "
                               f"{failure}", errno_value=failure.errno) from None
        except BaseException:
            self._fail_write(state, None)
            raise
        state.upload = state.staged = None
        state.dirty = state.wrote = False
        if stale_metadata:
            # The multipart upload was created before a chmod/chown/utimens: put the
            # attributes on the object now (server-side self-copy).
            try:
                info = self.loop.run(self.store.copy_object(
                    state.key, state.key, info.size, metadata, src_etag=info.etag))
                self.metrics.inc("write_metadata_copies_total")
            except ObjfsError as exc:
                log.warning("%s: data published, attributes not stored in its metadata: %s",
                            state.key, exc)
        state.etag, state.size = info.etag, info.size
        state.metadata = metadata
        self.tree.upsert(state.relpath, size=info.size, etag=info.etag,
                         mtime_ns=state.mtime_ns)
        if wrote and not state.mtime_explicit:
            self.tree.set_attrs(state.ino, clear_mtime=True)
        self.metrics.inc("write_commits_total")

    def _discard_pending(self, state: WriteState) -> None:
        """Drop unpublished content (caller holds ``state.lock``)."""
        if state.upload is not None:
            state.upload.abort()
        if state.staged is not None:
            state.staged.close()
        state.upload = state.staged = None
        state.dirty = state.wrote = False

    def _fail_write(self, state: WriteState, error: ObjfsError | None) -> None:
        """An upload of ``state`` failed: nothing is or will be published of what was
        written. Free what it held, show the origin's version again, and drop the kernel's
        cached pages, which hold the unpublished bytes. ``error`` is latched for the next
        close/fsync if it did not come from one. Caller holds ``state.lock``."""
        self.metrics.inc("write_commit_errors_total")
        self._discard_pending(state)
        state.size, state.etag = self._origin_size_etag(state)
        self.invalidate_inodes([state.ino])

    def _origin_size_etag(self, state: WriteState) -> tuple[int, str]:
        """What the origin still holds for a file whose upload failed (per the tree)."""
        try:
            inode = self.tree.get(state.ino)
        except NotFound:
            return 0, ""
        return inode.size, inode.etag

    def setattr(self, ino: int, *, size: int | None = None, mode: int | None = None,
                uid: int | None = None, gid: int | None = None,
                mtime_ns: int | None = None, fh: int | None = None) -> Attributes:
        """truncate, chmod, chown, utimens. Attributes are kept in the tree and in the
        object's metadata (a server-side self-copy, or the pending upload's metadata)."""
        if self.config.read_only:
            raise ReadOnly("read-only mount")
        inode = self._inode(ino)
        if size is not None:
            if inode.is_dir:
                raise _error("is a directory", errno.EISDIR)
            state = self._write_state(inode.ino)
            try:
                self._truncate(state, size)
                if fh is not None:
                    # ftruncate(2): a change made through a descriptor, published at its close
                    # like a write. (The kernel's truncate for open(O_TRUNC) carries no
                    # handle: that one waits for a write or the last release, see flush.)
                    with state.lock:
                        state.wrote = state.wrote or state.dirty
                with self._handles_lock:
                    unopened = state.handles == 0
                if unopened:  # truncate(2) with no descriptor open: publish now
                    self._commit(state)
            finally:
                self._forget_write(state)
        if mode is None and uid is None and gid is None and mtime_ns is None:
            return self.getattr(ino)
        if mode is not None:
            mode = stat.S_IFMT(self.attributes(inode).mode) | (mode & 0o7777)
        try:
            self.tree.set_attrs(ino, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns)
        except NotFound:
            return self._set_orphan_attrs(ino, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns)
        inode = self.tree.get(ino)
        metadata = self._metadata_of(inode)
        with self._handles_lock:
            state = self._writes.get(ino)
        if state is not None:
            # Decided under the state's lock: a publish in progress (a release racing this
            # call) holds it, and afterwards the file is clean and takes the path below.
            with state.lock:
                if state.dirty:  # goes out with the pending upload
                    state.metadata.update(metadata)
                    if mtime_ns is not None:
                        state.mtime_ns = mtime_ns
                        state.mtime_explicit = True
                        state.metadata["mtime"] = _mtime_text(mtime_ns)
                    return self.attributes(inode)
            inode = self.tree.get(ino)
            metadata = self._metadata_of(inode)
        key = self.config.store.prefix + inode.relpath
        with self.tree.local_change(key):
            if inode.is_dir:
                if inode.ino != ROOT_INO:
                    info = self.loop.run(self.store.put_object(key, b"", metadata))
                    self.tree.upsert(inode.relpath, mtime_ns=info.mtime_ns, is_dir=True)
            elif inode.etag:
                info = self.loop.run(self.store.copy_object(key, key, inode.size, metadata,
                                                            src_etag=inode.etag))
                self.tree.upsert(inode.relpath, size=inode.size, etag=info.etag,
                                 mtime_ns=info.mtime_ns)
                self._moved({ino: info})  # a self-copy may change the ETag, not the bytes
                self.metrics.inc("write_metadata_copies_total")
        return self.attributes(self.tree.get(ino))

    def _set_orphan_attrs(self, ino: int, **changes: int | None) -> Attributes:
        """chmod/chown/utimens of an unlinked file still open: shown by fstat, stored
        nowhere (there is no object any more)."""
        with self._handles_lock:
            orphan = self._orphans.get(ino)
            if orphan is None:
                raise NotFound(f"inode {ino}")
            inode, attrs = orphan
            attrs = dataclasses.replace(attrs or Attrs(),
                                        **{k: v for k, v in changes.items() if v is not None})
            self._orphans[ino] = (inode, attrs)
        return self.attributes(inode, attrs)

    # ---- namespace -------------------------------------------------------------------------

    def _child_relpath(self, parent: int, name: bytes) -> tuple[Inode, str]:
        if self.config.read_only:
            raise ReadOnly("read-only mount")
        parent_inode = self.tree.get(parent)
        if not parent_inode.is_dir:
            raise _error("not a directory", errno.ENOTDIR)
        if len(name) > 255:
            raise _error("name too long", errno.ENAMETOOLONG)
        try:
            text = name.decode()
        except UnicodeDecodeError:
            raise _error("names must be UTF-8 (S3 keys are)", errno.EILSEQ) from None
        relpath = parent_inode.relpath + text
        if "/" in text or invalid_reason(relpath) is not None:
            raise InvalidArgument(f"{text!r} cannot be an object key")
        if len((self.config.store.prefix + relpath + "/").encode()) > 1024:
            raise _error("the object key would exceed 1024 bytes", errno.ENAMETOOLONG)
        return parent_inode, relpath

    def _exists(self, parent: int, name: bytes) -> Inode | None:
        try:
            return self.tree.lookup(parent, name)
        except NotFound:
            return None

    def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
               gid: int) -> tuple[int, Attributes]:
        """A new empty file, published at its first flush (an empty object if nothing is
        written). Until then it exists only in this host's tree."""
        _, relpath = self._child_relpath(parent, name)
        existing = self._exists(parent, name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise _error("file exists", errno.EEXIST)
            fh = self.open(existing.ino, flags | os.O_WRONLY)
            return fh, self.attributes(self.tree.get(existing.ino))
        now = self._clock()
        with self.tree.local_change(self.config.store.prefix + relpath):
            inode = self.tree.upsert(relpath, size=0, etag="", mtime_ns=now)
            self.tree.pin(inode.ino)  # before a relist that does not list it can sweep it
        self.tree.set_attrs(inode.ino, mode=stat.S_IFREG | (mode & 0o7777), uid=uid, gid=gid)
        state = self._write_state(inode.ino)
        with state.lock:
            state.metadata = self._metadata(stat.S_IFREG | (mode & 0o7777), uid, gid, now)
            state.dirty = True
            state.size = 0
        fh = next(self._next_fh)
        with self._handles_lock:
            self._files[fh] = FileHandle(inode, self.version_of(inode), self.cache.new_stream(),
                                         state)
            self._opens[inode.ino] = self._opens.get(inode.ino, 0) + 1
            state.handles += 1
        self.metrics.inc("fuse_files_created_total")
        return fh, self.attributes(inode)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attributes:
        """A directory is a marker object ``dir/`` carrying the mode, as s3fs writes it."""
        _, relpath = self._child_relpath(parent, name)
        if self._exists(parent, name) is not None:
            raise _error("file exists", errno.EEXIST)
        full_mode = stat.S_IFDIR | (mode & 0o7777)
        now = self._clock()
        key = self.config.store.prefix + relpath + "/"
        with self.tree.local_change(key):
            info = self.loop.run(self.store.put_object(
                key, b"", self._metadata(full_mode, uid, gid, now)))
            inode = self.tree.upsert(relpath, mtime_ns=info.mtime_ns or now, is_dir=True)
        self.tree.set_attrs(inode.ino, mode=full_mode, uid=uid, gid=gid)
        return self.attributes(inode)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._child_relpath(parent, name)
        inode = self.tree.lookup(parent, name)
        if not inode.is_dir:
            raise _error("not a directory", errno.ENOTDIR)
        if self.tree.has_children(inode.ino):
            raise _error("directory not empty", errno.ENOTEMPTY)
        key = self.config.store.prefix + inode.relpath
        with self.tree.local_change(key):
            self.loop.run(self.store.delete_object(key))
            self.tree.remove(inode.ino)
        self.invalidate_inodes([inode.ino])
        self._keep_directory(parent)

    def unlink(self, parent: int, name: bytes) -> None:
        self._child_relpath(parent, name)
        inode = self.tree.lookup(parent, name)
        if inode.is_dir:
            raise _error("is a directory", errno.EISDIR)
        key = self.config.store.prefix + inode.relpath
        with self.tree.local_change(key):
            inode = self._detach(inode)
            if inode.etag:
                self.loop.run(self.store.delete_object(key))
            self.tree.unpin(inode.ino)
            self.tree.remove(inode.ino)
        self._keep_directory(parent)

    def _detach(self, inode: Inode) -> Inode:
        """``inode`` (a file) is about to leave the namespace (unlink, or a rename over it).
        Its writers keep a local copy that is never published (an upload in flight is
        aborted); handles still open keep working (``_orphans``: fstat; reads of its cached
        pages, which are dropped only when the last handle closes, and of what was written).
        Returns its current record (a racing publish may have given it an ETag)."""
        with self._handles_lock:
            state = self._writes.get(inode.ino)
        if state is not None:
            with state.lock:  # waits for a publish in progress; none may follow
                state.unlinked = True
                if state.upload is not None:
                    try:
                        self._stage(state)  # stop uploading parts of a file nobody will see
                    except UploadFailed as exc:
                        log.warning("%s: unlinked while written, its local copy is lost: %s",
                                    state.key, exc)
            inode = self.tree.get(inode.ino)
        attrs = self.tree.attrs(inode.ino)
        with self._handles_lock:
            still_open = self._opens.get(inode.ino, 0) > 0
            if still_open:
                self._orphans[inode.ino] = (inode, attrs)
                if inode.etag:
                    self._drop_at_close[inode.ino] = self.version_of(inode)
        if inode.etag and not still_open:
            self.cache.drop(self.version_of(inode))
        return inode

    def _keep_directory(self, ino: int) -> None:
        """A directory that has just lost its last entry here stays a directory at the origin
        too, as it does on a local disk: without a marker object (an implicit directory, only
        named by the keys below it), the next listing would not show it. Best effort: one
        HEAD, and a PUT of the marker if it is missing."""
        if ino == ROOT_INO or self.tree.has_children(ino):
            return
        try:
            inode = self.tree.get(ino)
        except NotFound:
            return
        key = self.config.store.prefix + inode.relpath
        with self.tree.local_change(key):
            try:
                self.loop.run(self.store.head_object(key))
                return  # it has its marker
            except ObjfsError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot check the marker of the now empty directory %s: %s",
                                inode.relpath, exc)
                    return
            try:
                self.loop.run(self.store.put_object(key, b"", self._metadata_of(inode)))
                self.metrics.inc("write_dir_markers_kept_total")
            except ObjfsError as exc:
                log.warning("the now empty directory %s has no marker object and could not "
                            "get one (%s): it disappears at the next relist", inode.relpath, exc)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int,
                gid: int) -> Attributes:
        """A symlink is a small object holding its target, with mode S_IFLNK in metadata."""
        _, relpath = self._child_relpath(parent, name)
        if self._exists(parent, name) is not None:
            raise _error("file exists", errno.EEXIST)
        mode = stat.S_IFLNK | 0o777
        now = self._clock()
        key = self.config.store.prefix + relpath
        with self.tree.local_change(key):
            info = self.loop.run(self.store.put_object(key, target,
                                                       self._metadata(mode, uid, gid, now)))
            inode = self.tree.upsert(relpath, size=info.size, etag=info.etag, mtime_ns=now)
        self.tree.set_attrs(inode.ino, mode=mode, uid=uid, gid=gid)
        return self.attributes(inode)

    def readlink(self, ino: int) -> bytes:
        inode = self.tree.get(ino)
        if not stat.S_ISLNK(self.attributes(inode).mode):
            raise InvalidArgument("not a symlink")
        return self.cache.read(self.version_of(inode), 0, inode.size)

    def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes) -> None:
        """Files: server-side copy, then delete (multipart copy past 5 GiB). Directories:
        every object below is copied (``_RENAME_COPY_CONCURRENCY`` at a time) then deleted,
        up to ``--rename-dir-limit`` objects; beyond it EXDEV, so ``mv`` falls back to
        copying through the mount. Handles open on what moved keep reading it under its new
        name (the copies hold the same bytes)."""
        self._child_relpath(parent_old, name_old)
        _, new_rel = self._child_relpath(parent_new, name_new)
        src = self.tree.lookup(parent_old, name_old)
        if parent_old == parent_new and name_old == name_new:
            return
        target = self._exists(parent_new, name_new)
        if src.is_dir:
            if target is not None:
                if not target.is_dir:
                    raise _error("not a directory", errno.ENOTDIR)
                if self.tree.has_children(target.ino):
                    raise _error("directory not empty", errno.ENOTEMPTY)
            if (new_rel + "/").startswith(src.relpath):
                raise InvalidArgument("cannot move a directory into itself")
            self._rename_dir(src, target, parent_new, name_new, new_rel + "/")
        else:
            if target is not None and target.is_dir:
                raise _error("is a directory", errno.EISDIR)
            self._rename_file(src, target, parent_new, name_new, new_rel)
        if parent_old != parent_new:
            self._keep_directory(parent_old)

    def _rename_file(self, src: Inode, target: Inode | None, parent_new: int, name_new: bytes,
                     new_rel: str) -> None:
        prefix = self.config.store.prefix
        with self.tree.local_change(prefix + src.relpath, prefix + new_rel):
            with self._handles_lock:
                state = self._writes.get(src.ino)
            if state is not None:
                self._commit(state)
                src = self.tree.get(src.ino)
            if target is not None:
                # Its writers must not publish over the renamed file later (as after unlink).
                target = self._detach(target)
            info = None
            if src.etag:
                info = self.loop.run(self.store.copy_object(
                    prefix + src.relpath, prefix + new_rel, src.size, src_etag=src.etag))
                self.loop.run(self.store.delete_object(prefix + src.relpath))
            if target is not None:
                self.tree.unpin(target.ino)
                self.tree.remove(target.ino)
                self.invalidate_inodes([target.ino])
            self.tree.rename(src.ino, parent_new, name_new)
            if info is not None:
                self.tree.upsert(new_rel, size=src.size, etag=info.etag, mtime_ns=src.mtime_ns)
                self._moved({src.ino: info})
            if state is not None:
                with state.lock:
                    state.key, state.relpath = prefix + new_rel, new_rel
                    if info is not None:
                        state.etag = info.etag
        self.metrics.inc("write_file_renames_total")

    def _rename_dir(self, src: Inode, target: Inode | None, parent_new: int, name_new: bytes,
                    new_dir: str) -> None:
        prefix = self.config.store.prefix
        old_prefix, new_prefix = prefix + src.relpath, prefix + new_dir
        with self.tree.local_change(old_prefix, new_prefix):
            self._commit_under(src.relpath)
            objects = [obj for page in self.store.list_pages(old_prefix) for obj in page]
            if len(objects) > self.config.rename_dir_limit:
                raise _error(f"renaming {src.relpath} would copy {len(objects)} objects, over "
                             f"--rename-dir-limit {self.config.rename_dir_limit}", errno.EXDEV)
            if target is not None:
                self.loop.run(self.store.delete_object(prefix + target.relpath))
                self.tree.remove(target.ino)
            copies = self.loop.run(self._copy_objects(objects, old_prefix, new_prefix))
            self.loop.run(self.store.delete_objects([obj.key for obj in objects]))
            moved = self.tree.rename(src.ino, parent_new, name_new)
            moves: dict[int, ObjectInfo] = {}
            for ino in moved:
                inode = self.tree.get(ino)
                info = copies.get(prefix + inode.relpath)
                if info is not None and not inode.is_dir:
                    self.tree.upsert(inode.relpath, size=inode.size, etag=info.etag,
                                     mtime_ns=inode.mtime_ns)
                    moves[ino] = info
            self._moved(moves)
            with self._handles_lock:
                states = [st for st in self._writes.values()
                          if st.relpath.startswith(src.relpath)]
            for state in states:  # files still open below it now live under the new name
                with state.lock:
                    state.relpath = new_dir + state.relpath[len(src.relpath):]
                    state.key = prefix + state.relpath
                    info = copies.get(state.key)
                    if info is not None:
                        state.etag = info.etag
        self.metrics.inc("write_dir_renames_total")

    async def _copy_objects(self, objects: list[ObjectInfo], old_prefix: str,
                            new_prefix: str) -> dict[str, ObjectInfo]:
        """Server-side copies of ``objects`` from ``old_prefix`` to ``new_prefix``, several at
        once; returns new key -> new object. Directory markers are written anew (a PUT with
        their metadata): some stores (SeaweedFS) cannot copy a key ending with '/'. If a copy
        fails, the copies made so far are deleted (best effort) and the error raised."""
        limit = asyncio.Semaphore(_RENAME_COPY_CONCURRENCY)
        done: dict[str, ObjectInfo] = {}

        async def copy_one(obj: ObjectInfo) -> None:
            new_key = new_prefix + obj.key[len(old_prefix):]
            async with limit:
                if obj.key.endswith("/") and obj.size == 0:
                    try:
                        meta = await self.store.head_object(obj.key)
                    except ObjfsError as exc:
                        if exc.errno == errno.ENOENT:
                            return  # gone meanwhile
                        raise
                    done[new_key] = await self.store.put_object(new_key, b"", meta.metadata)
                else:
                    done[new_key] = await self.store.copy_object(
                        obj.key, new_key, obj.size, src_etag=obj.etag or None)

        tasks = [asyncio.ensure_future(copy_one(obj)) for obj in objects]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await self.store.delete_objects(list(done))
            except ObjfsError as exc:
                log.warning("rename: could not delete %d partial copies under %s: %s",
                            len(done), new_prefix, exc)
            raise
        return done

    def _moved(self, moves: dict[int, ObjectInfo]) -> None:
        """Open handles of these inodes read the renamed copies from now on."""
        if not moves:
            return
        with self._handles_lock:
            for handle in self._files.values():
                info = moves.get(handle.inode.ino)
                if info is not None:
                    handle.version = ObjectVersion(handle.version.bucket, info.key, info.etag,
                                                   info.size)

    def _commit_under(self, dir_relpath: str) -> None:
        with self._handles_lock:
            states = [s for s in self._writes.values() if s.relpath.startswith(dir_relpath)]
        for state in states:
            self._commit(state)

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
        return self.tree.resolve(relpath)

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

    def changing(self, inos: list[int]) -> None:
        """The tree is about to show new versions of these inodes (refresher thread, before
        the listing's transaction commits). Opens of them wait until ``changed`` has dropped
        the kernel's pages of the old versions, so a handle of a new version never reads
        kernel-cached old bytes next to new bytes from the daemon."""
        gate = threading.Event()
        with self._handles_lock:
            for ino in inos:
                self._changing[ino] = gate

    def entries_removed(self, entries: list[tuple[int, bytes]]) -> None:
        """A relist removed these names (refresher thread): the kernel, which may cache
        names for the attribute timeout (the TTL by default), forgets them now."""
        self.invalidate_entries_now(entries)

    def attrs_changed(self, inos: list[int]) -> None:
        """A relist changed these inodes' attributes but not their version (an mtime, a
        directory's link count): the kernel drops its cached attributes, not its pages."""
        self.invalidate_attrs_now(inos)

    def changed(self, inos: list[int]) -> None:
        """The tree saw these inodes change or disappear at the origin (refresher thread).

        Open read handles of them go stale first (their reads are ESTALE from now on), so
        nothing puts old bytes back into the kernel's page cache; reads already in progress
        are let finish (per-inode counts, waited on with a condition: no polling under the
        lock every read takes); then the kernel's cached pages are dropped, synchronously
        (the kernel also waits for pages still being filled). Opens held by ``changing`` go
        on only after that: llfuse replies keep_cache, so pages left behind would be served
        to them next to new bytes from the daemon. Every handle open at this point is of an
        old version: an open that read the tree after ``changing`` waits, one that read it
        before is here.
        """
        wanted = set(inos)
        try:
            with self._handles_lock:
                for handle in self._files.values():
                    if handle.inode.ino in wanted and handle.write is None:
                        handle.stale = True
                deadline = time.monotonic() + _READS_DRAIN_TIMEOUT_S
                while any(ino in self._reading for ino in wanted):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._reads_done.wait(remaining)
            self.invalidate_inodes_now(inos)
        finally:
            with self._handles_lock:
                gates = {self._changing.pop(ino, None) for ino in inos}
            for gate in gates - {None}:
                gate.set()
