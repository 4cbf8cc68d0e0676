"""The metadata tree: the bucket prefix as inodes and dentries in LMDB.

Why LMDB: lookup/getattr/readdir are served from a memory-mapped B-tree shared by all FUSE
worker threads without a Python dict of the whole namespace, so memory stays flat at millions
of objects, and the tree survives restarts (a remount serves at once).

How it is built: one flat ListObjectsV2 of the prefix, streamed page by page (one write
transaction per page of <= 1000 keys, and none for a page that changes nothing). Directories
are inferred from key prefixes; ``dir/`` marker objects are directories. A refresh marks every
inode its listing names in a bitmap (``_Seen``); when the listing is complete, the sweep
deletes entries of the listed scope it did not see (deleted at the origin). An unchanged
record is only read, never rewritten, so relisting an unchanged bucket of millions of objects
costs reads and no LMDB writes. Readers see the tree change page by page, never a torn record.

Local changes win over a relist that overlaps them. A namespace change this host makes
(create, publish, unlink, mkdir, rmdir, rename, symlink) runs inside ``local_change(keys)``:
while it runs, and for the rest of any refresh that was in progress when it ended, listed
objects under those keys are ignored and the sweep leaves their entries alone. A listing page
fetched before the change therefore cannot bring back a name this host just removed, delete
one it just created or moved, or revert a file it just published; the next relist, which
started after the change, sees the origin as the change left it.

Layout (sub-databases); every LMDB key is at most 8 + 255 bytes, under LMDB's 511-byte limit,
whatever the length of the S3 key:
  meta      b"format", b"identity", b"next_ino", b"gen", b"listed_at"
  inodes    ino (8 bytes BE) -> record (see ``_RECORD``), relpath last; a directory's
            ``size`` field counts its subdirectories (its link count is 2 + that)
  dentries  parent ino (8 BE) + name (UTF-8) -> child ino (8 BE) + kind (1)   [name order]
  shadowed  parent ino (8 BE) + name -> file ino (8 BE): a file hidden by a same-named dir
  attrs     ino (8 BE) -> mode, uid, gid, mtime set on this host (``Attrs``; absent: defaults)
  objmeta   ino (8 BE) -> ETag length (2), ETag, ``Attrs`` read from that version's object
            metadata by a HEAD (``--object-metadata``): valid while the ETag matches
A listed entry keeps its inode number for as long as it exists (found again through its
dentry), across refreshes and restarts; numbers are never reused.

Names: a key whose segments cannot be POSIX names (empty, '.', '..', NUL, > 255 bytes) is
skipped, counted and logged once. A key that is both an object and a prefix of other keys
(``a`` and ``a/b``) shows as the directory; the object ``a`` is hidden while the directory
exists (as Mountpoint does) and comes back when it goes away.

Durability: the tree is written with ``sync=False`` (no fsync per transaction): a daemon that
dies keeps everything (LMDB's writes are in the kernel), a refresh and a clean stop sync. A
power cut or kernel crash can leave the file damaged; the daemon then rebuilds the tree from a
listing (``objfs.daemon``: an unclean stop in an earlier boot, or a tree that fails to open).

Concurrency: LMDB allows one writer and many readers; refreshes are serialized by
``_refresh_lock`` and the reader methods are safe from any thread. ``_local_lock`` guards the
local-change bookkeeping (``_active``, ``_touched``, ``_refreshing``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import functools
import logging
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lmdb
from cachetools import LRUCache

from objfs.errors import NotFound
from objfs.metrics import Metrics
from objfs.store import ObjectInfo

log = logging.getLogger(__name__)

ROOT_INO = 1
TREE_FORMAT = b"2"  # 2: directories count their subdirectories
_U64 = struct.Struct(">Q")
# format(1) kind(1) parent(8) size(8) mtime_ns(8, signed) gen(8) etag_len(2); etag; relpath
_RECORD = struct.Struct(">BBQQqQH")
_RECORD_VERSION = 1
_SIZE_OFFSET = 10  # where ``size`` sits in _RECORD; ``mtime_ns`` follows it
_MTIME_OFFSET = 18
_ETAG_LEN_OFFSET = 34
_SIZE_MTIME = struct.Struct(">Qq")
_MTIME = struct.Struct(">q")
_ETAG_LEN = struct.Struct(">H")
_FILE, _DIR = 1, 2  # Kind values as plain ints for the refresh loop
_FILE_BYTE, _DIR_BYTE = bytes((_FILE,)), bytes((_DIR,))
MAX_NAME_BYTES = 255


class Kind(enum.IntEnum):
    FILE = 1
    DIR = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Inode:
    ino: int
    kind: Kind
    parent: int
    size: int
    mtime_ns: int
    gen: int
    etag: str
    relpath: str  # path below the mount prefix; directories end with '/', root is ''

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    def encode(self) -> bytes:
        etag = self.etag.encode()
        return _RECORD.pack(_RECORD_VERSION, self.kind, self.parent, self.size, self.mtime_ns,
                            self.gen, len(etag)) + etag + self.relpath.encode()

    @classmethod
    def decode(cls, ino: int, data: bytes) -> "Inode":
        version, kind, parent, size, mtime_ns, gen, etag_len = _RECORD.unpack_from(data)
        if version != _RECORD_VERSION:
            raise ValueError(f"inode record version {version}")
        body = data[_RECORD.size:]
        return cls(ino, Kind(kind), parent, size, mtime_ns, gen,
                   body[:etag_len].decode(), body[etag_len:].decode())


@dataclasses.dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    ino: int
    kind: Kind


def _announce(announced: list[int], on_changing: Callable[[list[int]], None],
              inos: list[int]) -> None:
    """Remember and pass on inodes about to show a new version (see ``refresh``)."""
    announced.extend(inos)
    on_changing(inos)


@dataclasses.dataclass
class RefreshStats:
    scope: str
    objects: int = 0
    skipped_invalid: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    duration_s: float = 0.0


_ATTRS = struct.Struct(">IIIq")
_UNSET32 = 0xFFFFFFFF
_UNSET_MTIME = -(1 << 63)


@dataclasses.dataclass(frozen=True, slots=True)
class Attrs:
    """Attributes set on this host (chmod/chown/utimens/symlink); None means the default."""

    mode: int | None = None   # full st_mode, type bits included (S_IFLNK for symlinks)
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None

    def encode(self) -> bytes:
        return _ATTRS.pack(_UNSET32 if self.mode is None else self.mode,
                           _UNSET32 if self.uid is None else self.uid,
                           _UNSET32 if self.gid is None else self.gid,
                           _UNSET_MTIME if self.mtime_ns is None else self.mtime_ns)

    @classmethod
    def decode(cls, raw: bytes) -> "Attrs":
        mode, uid, gid, mtime = _ATTRS.unpack(raw)
        return cls(None if mode == _UNSET32 else mode, None if uid == _UNSET32 else uid,
                   None if gid == _UNSET32 else gid, None if mtime == _UNSET_MTIME else mtime)


def invalid_reason(relpath: str, segments: list[str] | None = None) -> str | None:
    """Why ``relpath`` (without a trailing '/') cannot be a POSIX path, or None if it can.

    The common case costs a few C-level membership tests on the split segments.
    """
    if segments is None:
        segments = relpath.split("/")
    if "\0" in relpath:
        return "contains NUL"
    if "" in segments:
        return "empty path segment"
    if "." in segments:
        return "'.' segment"
    if ".." in segments:
        return "'..' segment"
    for segment in segments:
        # A str of <= 63 chars is at most 252 UTF-8 bytes: encode only longer ones.
        if len(segment) > 63 and len(segment.encode()) > MAX_NAME_BYTES:
            return f"segment longer than {MAX_NAME_BYTES} bytes"
    return None


def _dentry_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


class MetadataTree:
    """The LMDB-backed tree of one mount. Reader methods are thread-safe."""

    def __init__(self, path: Path, *, prefix: str, identity: str,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 map_size: int = 1 << 36) -> None:
        self.prefix = prefix
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._refresh_lock = threading.Lock()  # one writer of refresh state at a time
        # Files this host is writing: a refresh neither sweeps them nor overwrites them with
        # the (older) listed version until they are unpinned after their upload.
        self._pinned: set[bytes] = set()  # guarded by _pinned_lock
        self._pinned_lock = threading.Lock()
        self._logged_invalid: LRUCache[str, bool] = LRUCache(maxsize=10_000)  # refresh thread
        # Local changes (see ``local_change``), all guarded by _local_lock: keys of changes
        # in progress (a multiset), keys changed during the refresh in progress, and whether
        # one is in progress.
        self._local_lock = threading.Lock()
        self._active: collections.Counter[str] = collections.Counter()
        self._touched: set[str] = set()
        self._refreshing = False
        # Inodes whose attributes a refresh changed without a new version: reported after
        # each page (on_attrs). Local changes do not add to it (the kernel made them).
        self._attr_changes: list[int] = []  # guarded by _local_lock
        path.mkdir(parents=True, exist_ok=True)
        self._path = path
        try:
            self._env = self._open(path, map_size)
            with self._env.begin() as txn:
                fmt = txn.get(b"format", db=self._meta)
                ident = txn.get(b"identity", db=self._meta)
        except lmdb.Error as exc:
            log.warning("metadata tree in %s is unreadable (%s): rebuilding it from a listing",
                        path, exc)
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            self._env = self._open(path, map_size)
            fmt = ident = None
        if fmt is not None and (fmt != TREE_FORMAT or ident != identity.encode()):
            log.warning("metadata tree in %s belongs to %s (format %s); rebuilding it",
                        path, (ident or b"?").decode(errors="replace"),
                        fmt.decode(errors="replace"))
            self._env.close()
            shutil.rmtree(path)
            path.mkdir(parents=True)
            self._env = self._open(path, map_size)
            fmt = None
        if fmt is None:
            self._initialize(identity)

    def _open(self, path: Path, map_size: int) -> lmdb.Environment:
        # sync=False: no fsync per transaction (a create would wait for the disk). A daemon
        # that dies loses nothing; a power cut can damage the file, and the daemon then
        # rebuilds the tree from a listing (module docstring). refresh() and close() sync.
        env = lmdb.open(str(path), map_size=map_size, max_dbs=8, max_readers=1024,
                        sync=False, metasync=False, readahead=False)
        self._meta = env.open_db(b"meta")
        self._inodes = env.open_db(b"inodes")
        self._dentries = env.open_db(b"dentries")
        self._shadowed = env.open_db(b"shadowed")
        self._attrs = env.open_db(b"attrs")
        self._objmeta = env.open_db(b"objmeta")
        return env

    def _initialize(self, identity: str) -> None:
        root = Inode(ROOT_INO, Kind.DIR, ROOT_INO, 0, int(self._clock() * 1e9), 0, "", "")
        with self._env.begin(write=True) as txn:
            txn.put(b"format", TREE_FORMAT, db=self._meta)
            txn.put(b"identity", identity.encode(), db=self._meta)
            txn.put(b"next_ino", _U64.pack(ROOT_INO + 1), db=self._meta)
            txn.put(b"gen", _U64.pack(0), db=self._meta)
            txn.put(_U64.pack(ROOT_INO), root.encode(), db=self._inodes)
        self._env.sync(True)

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()

    # ---- readers ---------------------------------------------------------------------------

    def listed_at(self) -> float | None:
        """Wall-clock start time of the last complete full listing, or None if never."""
        with self._env.begin() as txn:
            raw = txn.get(b"listed_at", db=self._meta)
        return float(raw.decode()) if raw else None

    def get(self, ino: int) -> Inode:
        with self._env.begin() as txn:
            raw = txn.get(_U64.pack(ino), db=self._inodes)
        if raw is None:
            raise NotFound(f"inode {ino}")
        return Inode.decode(ino, raw)

    def lookup(self, parent: int, name: bytes) -> Inode:
        with self._env.begin() as txn:
            raw = txn.get(_dentry_key(parent, name), db=self._dentries)
            if raw is None:
                raise NotFound(name.decode(errors="replace"))
            ino_b = raw[:8]
            rec = txn.get(ino_b, db=self._inodes)
        if rec is None:
            raise NotFound(name.decode(errors="replace"))
        return Inode.decode(_U64.unpack(ino_b)[0], rec)

    def readdir(self, parent: int, after: bytes | None = None) -> Iterator[DirEntry]:
        """Children of ``parent`` in name order, starting after ``after`` (exclusive).

        Streams from a cursor: resuming costs one seek, never a rescan.
        """
        base = _U64.pack(parent)
        with self._env.begin(db=self._dentries) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(base + (after if after is not None else b"")):
                return
            for key, value in cursor:
                if not key.startswith(base):
                    return
                name = key[8:]
                if after is not None and name == after:
                    continue
                yield DirEntry(name, _U64.unpack_from(value)[0], Kind(value[8]))

    def resolve(self, relpath: str) -> Inode:
        """The inode at ``relpath`` below the mount root ('' is the root)."""
        inode = self.get(ROOT_INO)
        for name in (p for p in relpath.strip("/").split("/") if p):
            inode = self.lookup(inode.ino, name.encode())
        return inode

    def has_children(self, ino: int) -> bool:
        base = _U64.pack(ino)
        with self._env.begin() as txn:
            for db in (self._dentries, self._shadowed):
                cursor = txn.cursor(db=db)
                if cursor.set_range(base) and cursor.key().startswith(base):
                    return True
        return False

    def attrs(self, ino: int) -> Attrs | None:
        with self._env.begin() as txn:
            raw = txn.get(_U64.pack(ino), db=self._attrs)
        return Attrs.decode(raw) if raw is not None else None

    def object_attrs(self, inode: Inode) -> Attrs | None:
        """Attributes read from the object metadata of ``inode``'s current version (see
        ``set_object_attrs``); None if not fetched for this version."""
        with self._env.begin() as txn:
            raw = txn.get(_U64.pack(inode.ino), db=self._objmeta)
        if raw is None:
            return None
        etag_len = _ETAG_LEN.unpack_from(raw)[0]
        if raw[2:2 + etag_len] != inode.etag.encode():
            return None
        return Attrs.decode(raw[2 + etag_len:])

    def set_object_attrs(self, inode: Inode, attrs: Attrs) -> None:
        """Remember what the object metadata of ``inode``'s version says (``Attrs()`` when
        it says nothing), so it is fetched once per version, across restarts."""
        etag = inode.etag.encode()
        with self._env.begin(write=True) as txn:
            if txn.get(_U64.pack(inode.ino), db=self._inodes) is not None:
                txn.put(_U64.pack(inode.ino), _ETAG_LEN.pack(len(etag)) + etag + attrs.encode(),
                        db=self._objmeta)

    def set_attrs(self, ino: int, *, clear_mtime: bool = False, **changes: int | None) -> Attrs:
        """Merge ``changes`` (mode=, uid=, gid=, mtime_ns=; None leaves a field) into the
        attributes recorded for ``ino``; ``clear_mtime`` forgets a set mtime (the file was
        written since: its own mtime counts again)."""
        key = _U64.pack(ino)
        with self._env.begin(write=True) as txn:
            if txn.get(key, db=self._inodes) is None:
                raise NotFound(f"inode {ino}")
            raw = txn.get(key, db=self._attrs)
            current = Attrs.decode(raw) if raw is not None else Attrs()
            merged = dataclasses.replace(
                current, **{k: v for k, v in changes.items() if v is not None})
            if clear_mtime:
                merged = dataclasses.replace(merged, mtime_ns=None)
            txn.put(key, merged.encode(), db=self._attrs)
        return merged

    # ---- local changes: what this host did, before the next listing shows it -----------------

    @contextlib.contextmanager
    def local_change(self, *keys: str) -> Iterator[None]:
        """Run a namespace change of this host: while it runs, and for the rest of a refresh
        in progress when it ends, listed objects under ``keys`` (full object keys; a key
        ending with '/' also stands for everything below it) are ignored by refreshes and
        their entries are not swept. Wrap the origin call *and* the tree update in it."""
        keys = tuple(k for k in keys if k)
        with self._local_lock:
            self._active.update(keys)
        try:
            yield
        finally:
            with self._local_lock:
                self._active.subtract(keys)
                for key in keys:
                    if self._active[key] <= 0:
                        del self._active[key]
                if self._refreshing:
                    self._touched.update(keys)

    def _touch(self, *keys: str) -> None:
        """Keys this host just changed: a refresh in progress leaves them alone from now on.
        Called before the change's own transaction (see ``_apply_page``)."""
        with self._local_lock:
            if self._refreshing:
                self._touched.update(keys)

    def _key_of(self, record: bytes) -> str:
        return self.prefix + _relpath_of(record)

    def _skip_snapshot(self) -> _Skip | None:
        """Keys a refresh must leave alone right now (None: none)."""
        with self._local_lock:
            if not self._active and not self._touched:
                return None
            keys = frozenset(self._active) | frozenset(self._touched)
        return _Skip(keys, tuple(k for k in keys if k.endswith("/")))

    def upsert(self, relpath: str, *, size: int = 0, etag: str = "", mtime_ns: int,
               is_dir: bool = False) -> Inode:
        """Record an object this host created or replaced (or a directory), as the next
        listing will show it; a new entry moves its parent's mtime to now. Raises NotFound
        if ``relpath`` is not a valid name."""
        key = self.prefix + relpath.strip("/") + ("/" if is_dir else "")
        self._touch(key)
        stats = RefreshStats(scope="local")
        with self._env.begin() as txn:
            gen = _U64.unpack(txn.get(b"gen", db=self._meta))[0]
        changed = self._apply_page([ObjectInfo(key, size, etag, mtime_ns)], gen, stats,
                                   respect_pins=False, local_mtime_ns=self._now_ns())
        if stats.skipped_invalid:
            raise NotFound(f"{relpath!r} is not a valid name")
        inode = self.resolve(relpath)
        if changed or stats.added:
            self._metrics.inc("tree_local_changes_total")
        return inode

    def pin(self, ino: int) -> None:
        with self._pinned_lock:
            self._pinned.add(_U64.pack(ino))

    def unpin(self, ino: int) -> None:
        with self._pinned_lock:
            self._pinned.discard(_U64.pack(ino))

    def _is_pinned(self, raw_ino: bytes) -> bool:
        with self._pinned_lock:
            return raw_ino in self._pinned

    def remove(self, ino: int) -> None:
        """Forget an entry this host deleted (a directory must be empty); its parent's mtime
        moves to now."""
        raw_ino = _U64.pack(ino)
        with self._env.begin() as txn:
            record = txn.get(raw_ino, db=self._inodes)
        if record is not None:
            self._touch(self._key_of(record))
        with self._env.begin(write=True) as txn:
            self._remove(txn, raw_ino, None, self._now_ns())
            txn.delete(raw_ino, db=self._attrs)
            txn.delete(raw_ino, db=self._objmeta)

    def rename(self, ino: int, new_parent: int, new_name: bytes) -> list[int]:
        """Move an entry (and, for a directory, every relpath below it) to ``new_parent`` /
        ``new_name``, keeping inode numbers. The target name must be free. Returns the inodes
        whose relpath changed. Both parents' mtimes move to now."""
        raw_ino = _U64.pack(ino)
        moved: list[int] = []
        now = self._now_ns()
        with self._env.begin() as txn:
            rec_raw = txn.get(raw_ino, db=self._inodes)
            parent_raw = txn.get(_U64.pack(new_parent), db=self._inodes)
        if rec_raw is not None and parent_raw is not None:
            suffix = "/" if rec_raw[1] == _DIR else ""
            self._touch(self._key_of(rec_raw), self._key_of(parent_raw) + new_name.decode()
                        + suffix)
        with self._env.begin(write=True) as txn:
            rec_raw = txn.get(raw_ino, db=self._inodes)
            if rec_raw is None:
                raise NotFound(f"inode {ino}")
            rec = Inode.decode(ino, rec_raw)
            parent_raw = txn.get(_U64.pack(new_parent), db=self._inodes)
            if parent_raw is None:
                raise NotFound(f"inode {new_parent}")
            parent_rel = Inode.decode(new_parent, parent_raw).relpath
            old_name = rec.relpath.rstrip("/").rsplit("/", 1)[-1].encode()
            old_key = _dentry_key(rec.parent, old_name)
            if txn.get(old_key, db=self._shadowed) == raw_ino:
                txn.delete(old_key, db=self._shadowed)
            else:
                txn.delete(old_key, db=self._dentries)
            txn.put(_dentry_key(new_parent, new_name), raw_ino + bytes((rec.kind,)),
                    db=self._dentries)
            new_rel = parent_rel + new_name.decode() + ("/" if rec.is_dir else "")
            txn.put(raw_ino, dataclasses.replace(rec, parent=new_parent,
                                                 relpath=new_rel).encode(), db=self._inodes)
            subdirs = 1 if rec.is_dir else 0
            self._adjust_dir(txn, _U64.pack(rec.parent), -subdirs, now)
            self._adjust_dir(txn, _U64.pack(new_parent), subdirs, now)
            moved.append(ino)
            if rec.is_dir:
                old_prefix = rec.relpath
                pending = [ino]
                while pending:
                    base = _U64.pack(pending.pop())
                    children = []
                    for db in (self._dentries, self._shadowed):
                        cursor = txn.cursor(db=db)
                        if cursor.set_range(base):
                            for key, value in cursor:
                                if not key.startswith(base):
                                    break
                                children.append(value[:8])
                    for child_raw in children:
                        child = Inode.decode(_U64.unpack(child_raw)[0],
                                             txn.get(child_raw, db=self._inodes))
                        txn.put(child_raw, dataclasses.replace(
                            child, relpath=new_rel + child.relpath[len(old_prefix):]).encode(),
                            db=self._inodes)
                        moved.append(child.ino)
                        if child.is_dir:
                            pending.append(child.ino)
        return moved

    def count(self) -> int:
        with self._env.begin() as txn:
            return txn.stat(self._inodes)["entries"]

    def _attr_changed(self, raw_ino: bytes) -> None:
        with self._local_lock:
            self._attr_changes.append(_U64.unpack(raw_ino)[0])

    def _now_ns(self) -> int:
        return int(self._clock() * 1e9)

    def _adjust_dir(self, txn: lmdb.Transaction, raw_ino: bytes, subdirs_delta: int,
                    mtime_ns: int | None) -> None:
        """Change a directory's subdirectory count and (if given) move its mtime forward."""
        old = txn.get(raw_ino, db=self._inodes)
        if old is None:
            return  # removed in the same transaction (a sweep)
        size, mtime = _SIZE_MTIME.unpack_from(old, _SIZE_OFFSET)
        new_size = max(0, size + subdirs_delta)
        new_mtime = mtime if mtime_ns is None else max(mtime, mtime_ns)
        if (new_size, new_mtime) != (size, mtime):
            txn.put(raw_ino, old[:_SIZE_OFFSET] + _SIZE_MTIME.pack(new_size, new_mtime)
                    + old[_SIZE_OFFSET + 16:], db=self._inodes)

    # ---- refresh (writer) ------------------------------------------------------------------

    def refresh(self, pages: Iterable[list[ObjectInfo]], scope: str = "",
                on_changed: Callable[[list[int]], None] | None = None,
                on_changing: Callable[[list[int]], None] | None = None,
                on_removed: Callable[[list[tuple[int, bytes]]], None] | None = None,
                on_attrs: Callable[[list[int]], None] | None = None) -> RefreshStats:
        """Apply a complete flat listing of ``prefix + scope`` and sweep what it did not list.

        ``scope`` is '' (the whole mount) or a directory relpath ending with '/'. If the
        listing raises, nothing is swept (a partial listing never deletes entries).
        ``on_changed`` receives inode numbers whose content version changed or went away,
        after the tree shows it. ``on_changing`` receives those whose version changed just
        before the tree shows it (inside the write transaction, so readers still see the old
        version); every such call is followed by ``on_changed`` of the same inodes, even if
        the commit fails. ``on_removed`` receives the (parent inode, name) of every entry
        the sweep removed, after it did; ``on_attrs`` the inodes whose attributes changed
        without a new version (an mtime, a directory's link count or marker time), after
        each page. Objects under keys of local changes (``local_change``) are left alone.
        """
        if scope and not scope.endswith("/"):
            raise ValueError("scope must be '' or end with '/'")
        with self._refresh_lock:
            with self._local_lock:
                self._refreshing = True
                self._touched = set()
            try:
                return self._refresh(pages, scope, on_changed, on_changing, on_removed,
                                     on_attrs)
            finally:
                with self._local_lock:
                    self._refreshing = False
                    self._touched = set()

    def _refresh(self, pages: Iterable[list[ObjectInfo]], scope: str,
                 on_changed: Callable[[list[int]], None] | None,
                 on_changing: Callable[[list[int]], None] | None,
                 on_removed: Callable[[list[tuple[int, bytes]]], None] | None,
                 on_attrs: Callable[[list[int]], None] | None) -> RefreshStats:
        started = self._clock()
        t0 = time.monotonic()
        stats = RefreshStats(scope=scope)
        gen = self._next_generation()
        with self._env.begin() as txn:
            seen = _Seen(_U64.unpack(txn.get(b"next_ino", db=self._meta))[0])
        for page in pages:
            announced: list[int] = []
            try:
                changed = self._apply_page(
                    page, gen, stats, seen=seen, skip_of=self._skip_snapshot,
                    before_commit=None if on_changing is None else
                    functools.partial(_announce, announced, on_changing))
            except BaseException:
                if announced and on_changed is not None:
                    on_changed(announced)  # whoever waits on on_changing must go on
                raise
            if changed and on_changed is not None:
                on_changed(changed)
            self._report_attrs(on_attrs)
        removed, names = self._sweep(scope, seen, stats)
        if removed and on_changed is not None:
            on_changed(removed)
        if names and on_removed is not None:
            on_removed(names)
        self._report_attrs(on_attrs)
        if scope == "":
            with self._env.begin(write=True) as txn:
                txn.put(b"listed_at", repr(started).encode(), db=self._meta)
        self._env.sync(True)
        stats.duration_s = time.monotonic() - t0
        self._metrics.inc("tree_refreshes_total")
        self._metrics.inc("tree_refresh_seconds_total", stats.duration_s)
        self._metrics.inc("tree_invalid_keys_skipped_total", stats.skipped_invalid)
        return stats

    def _report_attrs(self, on_attrs: Callable[[list[int]], None] | None) -> None:
        with self._local_lock:
            inos, self._attr_changes = self._attr_changes, []
        if inos and on_attrs is not None:
            on_attrs(sorted(set(inos)))

    def _next_generation(self) -> int:
        with self._env.begin(write=True) as txn:
            gen = _U64.unpack(txn.get(b"gen", db=self._meta))[0] + 1
            txn.put(b"gen", _U64.pack(gen), db=self._meta)
        return gen

    def _apply_page(self, page: list[ObjectInfo], gen: int, stats: RefreshStats,
                    respect_pins: bool = True, seen: _Seen | None = None,
                    skip_of: Callable[[], _Skip | None] | None = None,
                    local_mtime_ns: int | None = None,
                    before_commit: Callable[[list[int]], None] | None = None) -> list[int]:
        """Apply listed (or locally made) objects in one write transaction; returns the
        inodes whose version changed. Records are only written when something changed.

        ``skip_of`` gives the keys of local changes to leave alone; it is asked inside the
        transaction, after LMDB's writer lock is held: a local change registers its keys
        before its own transaction, so a page applied after that change committed always
        sees them."""
        changed: list[int] = []
        # Directories already stamped in this page: ordered listings touch the same few
        # ancestors over and over, so this saves most lookups.
        stamped: dict[str, int] = {"": ROOT_INO}
        prefix = self.prefix
        with self._env.begin(write=True) as txn:
            skip = skip_of() if skip_of is not None else None
            start_ino = next_ino = _U64.unpack(txn.get(b"next_ino", db=self._meta))[0]
            for obj in page:
                stats.objects += 1
                key = obj.key
                if not key.startswith(prefix):
                    continue
                rel = key[len(prefix):]
                if rel == "":
                    continue  # the marker of the mount prefix itself
                is_marker = rel.endswith("/")
                path = rel[:-1] if is_marker else rel
                segments = path.split("/")
                reason = invalid_reason(path, segments)
                if reason is not None:
                    stats.skipped_invalid += 1
                    if key not in self._logged_invalid:
                        self._logged_invalid[key] = True
                        log.warning("skipping key %r: not a valid file name (%s)", key, reason)
                    continue
                dir_segments = segments if is_marker else segments[:-1]
                parent = ROOT_INO
                dirpath = ""
                for segment in dir_segments:
                    dirpath += segment + "/"
                    ino = stamped.get(dirpath)
                    if ino is None:
                        if skip is not None and skip.covers(prefix + dirpath):
                            break  # a directory this host is changing: not from this listing
                        ino, next_ino = self._stamp_dir(
                            txn, parent, segment, dirpath, gen,
                            obj.mtime_ns if dirpath == rel else None, next_ino, stats, seen,
                            local_mtime_ns)
                        stamped[dirpath] = ino
                    parent = ino
                else:
                    if not is_marker and (skip is None or not skip.covers(key)):
                        next_ino = self._stamp_file(txn, parent, segments[-1], rel, obj, gen,
                                                    next_ino, stats, changed, respect_pins,
                                                    seen, local_mtime_ns)
            if next_ino != start_ino:
                txn.put(b"next_ino", _U64.pack(next_ino), db=self._meta)
            if changed and before_commit is not None:
                before_commit(changed)
        return changed

    # The refresh loop below works on raw record bytes: decoding and re-encoding an Inode per
    # listed object was most of a refresh's CPU. Offsets follow _RECORD.

    def _stamp_dir(self, txn: lmdb.Transaction, parent: int, name: str, dirpath: str, gen: int,
                   marker_mtime_ns: int | None, next_ino: int, stats: RefreshStats,
                   seen: _Seen | None, local_mtime_ns: int | None) -> tuple[int, int]:
        dkey = _dentry_key(parent, name.encode())
        current = txn.get(dkey, db=self._dentries)
        if current is not None and current[8] == _DIR:
            raw_ino = current[:8]
            ino = _U64.unpack(raw_ino)[0]
            if seen is not None:
                seen.add(ino)
            if marker_mtime_ns is not None:
                # A marker's time counts when it is newer: a re-PUT marker (chmod) moves it,
                # an older listing never undoes a local change's time.
                old = txn.get(raw_ino, db=self._inodes)
                if marker_mtime_ns > _MTIME.unpack_from(old, _MTIME_OFFSET)[0]:
                    txn.put(raw_ino, old[:_MTIME_OFFSET] + _MTIME.pack(marker_mtime_ns)
                            + old[_MTIME_OFFSET + 8:], db=self._inodes)
                    if seen is not None:
                        self._attr_changed(raw_ino)
            return ino, next_ino
        if current is not None:
            # A file of the same name: the directory wins, the file waits in ``shadowed``.
            txn.put(dkey, current[:8], db=self._shadowed)
        ino = next_ino
        raw_ino = _U64.pack(ino)
        mtime = marker_mtime_ns if marker_mtime_ns is not None else int(self._clock() * 1e9)
        txn.put(raw_ino, _RECORD.pack(_RECORD_VERSION, _DIR, parent, 0, mtime, gen, 0)
                + dirpath.encode(), db=self._inodes)
        txn.put(dkey, raw_ino + _DIR_BYTE, db=self._dentries)
        self._adjust_dir(txn, _U64.pack(parent), 1, local_mtime_ns)
        if seen is not None:
            self._attr_changed(_U64.pack(parent))  # its link count
        if seen is not None:
            seen.add(ino)
        stats.added += 1
        return ino, next_ino + 1

    def _stamp_file(self, txn: lmdb.Transaction, parent: int, name: str, rel: str,
                    obj: ObjectInfo, gen: int, next_ino: int, stats: RefreshStats,
                    changed: list[int], respect_pins: bool, seen: _Seen | None,
                    local_mtime_ns: int | None) -> int:
        dkey = _dentry_key(parent, name.encode())
        current = txn.get(dkey, db=self._dentries)
        shadowed = current is not None and current[8] == _DIR
        raw_ino = txn.get(dkey, db=self._shadowed) if shadowed else \
            (current[:8] if current is not None else None)
        etag = obj.etag.encode()
        if raw_ino is not None:
            if seen is not None:
                seen.add(_U64.unpack(raw_ino)[0])
            if respect_pins and self._pinned and self._is_pinned(raw_ino):
                return next_ino  # being written here: our record stands
            old = txn.get(raw_ino, db=self._inodes)
            _, _, _, size, mtime, _, etag_len = _RECORD.unpack_from(old)
            if old[_RECORD.size:_RECORD.size + etag_len] == etag and size == obj.size:
                if mtime != obj.mtime_ns:
                    txn.put(raw_ino, old[:_MTIME_OFFSET] + _MTIME.pack(obj.mtime_ns)
                            + old[_MTIME_OFFSET + 8:], db=self._inodes)
                    if seen is not None:
                        self._attr_changed(raw_ino)
                return next_ino
            changed.append(_U64.unpack(raw_ino)[0])
            stats.changed += 1
        else:
            raw_ino = _U64.pack(next_ino)
            next_ino += 1
            if shadowed:
                txn.put(dkey, raw_ino, db=self._shadowed)
            else:
                txn.put(dkey, raw_ino + _FILE_BYTE, db=self._dentries)
                if local_mtime_ns is not None:
                    self._adjust_dir(txn, _U64.pack(parent), 0, local_mtime_ns)
            if seen is not None:
                seen.add(_U64.unpack(raw_ino)[0])
            stats.added += 1
        txn.put(raw_ino, _RECORD.pack(_RECORD_VERSION, _FILE, parent, obj.size, obj.mtime_ns, gen,
                                      len(etag)) + etag + rel.encode(), db=self._inodes)
        return next_ino

    def _scope_inos(self, txn: lmdb.Transaction, scope: str) -> Iterator[bytes]:
        """Inode keys (8 bytes) of everything under ``scope``, the scope dir excluded."""
        if scope == "":
            cursor = txn.cursor(db=self._inodes)
            for raw_ino in cursor.iternext(keys=True, values=False):
                if raw_ino != _U64.pack(ROOT_INO):
                    yield raw_ino
            return
        parent = ROOT_INO
        for segment in scope.rstrip("/").split("/"):
            raw = txn.get(_dentry_key(parent, segment.encode()), db=self._dentries)
            if raw is None or raw[8] != Kind.DIR:
                return
            parent = _U64.unpack_from(raw)[0]
        pending = [parent]  # directories still to walk: ints, bounded by the number of dirs
        while pending:
            base = _U64.pack(pending.pop())
            for db in (self._dentries, self._shadowed):
                cursor = txn.cursor(db=db)
                if not cursor.set_range(base):
                    continue
                for key, value in cursor:
                    if not key.startswith(base):
                        break
                    yield value[:8]
                    if len(value) > 8 and value[8] == Kind.DIR:
                        pending.append(_U64.unpack_from(value)[0])

    def _sweep(self, scope: str, seen: _Seen,
               stats: RefreshStats) -> tuple[list[int], list[tuple[int, bytes]]]:
        """Delete entries under ``scope`` the listing did not name, unless this host is
        writing them or changed them meanwhile; return their inode numbers. A directory
        that still holds an entry that stays (a file being written) stays too."""
        skip = self._skip_snapshot()
        with self._env.begin() as txn:
            stale: dict[bytes, bytes] = {}  # raw ino -> record
            for raw_ino in self._scope_inos(txn, scope):
                if _U64.unpack(raw_ino)[0] in seen or self._is_pinned(raw_ino):
                    continue
                record = txn.get(raw_ino, db=self._inodes)
                if record is None:
                    continue
                if skip is not None and skip.covers(self.prefix + _relpath_of(record)):
                    continue
                stale[raw_ino] = record
            for raw_ino, record in list(stale.items()):
                if record[1] == _DIR and self._holds_survivor(txn, raw_ino, stale):
                    del stale[raw_ino]
        removed: list[bytes] = []
        names: list[tuple[int, bytes]] = []
        if stale:
            with self._env.begin(write=True) as txn:
                # Asked again under LMDB's writer lock: a local change may have begun since.
                skip = self._skip_snapshot()
                for raw_ino in stale:
                    record = txn.get(raw_ino, db=self._inodes)
                    if record is None or self._is_pinned(raw_ino) or (
                            skip is not None and skip.covers(self.prefix + _relpath_of(record))):
                        continue
                    parent = _U64.unpack_from(record, 2)[0]
                    names.append((parent, _relpath_of(record).rstrip("/").rsplit("/", 1)[-1]
                                  .encode()))
                    self._remove(txn, raw_ino, seen, None)
                    removed.append(raw_ino)
            stats.removed += len(removed)
        return [_U64.unpack(raw_ino)[0] for raw_ino in removed], names

    def _holds_survivor(self, txn: lmdb.Transaction, raw_ino: bytes,
                        stale: dict[bytes, bytes]) -> bool:
        """Whether anything below directory ``raw_ino`` is not in ``stale``."""
        pending = [raw_ino]
        while pending:
            base = pending.pop()
            for db in (self._dentries, self._shadowed):
                cursor = txn.cursor(db=db)
                if not cursor.set_range(base):
                    continue
                for key, value in cursor:
                    if not key.startswith(base):
                        break
                    child = value[:8]
                    if child not in stale:
                        return True
                    if len(value) > 8 and value[8] == Kind.DIR:
                        pending.append(child)
        return False

    def _remove(self, txn: lmdb.Transaction, raw_ino: bytes, seen: _Seen | None,
                local_mtime_ns: int | None) -> None:
        """Delete one entry. ``seen``: the sweep's listing (a file hidden by a removed
        directory shows again only if that listing named it); None: a local removal."""
        rec_raw = txn.get(raw_ino, db=self._inodes)
        if rec_raw is None:
            return
        txn.delete(raw_ino, db=self._inodes)
        txn.delete(raw_ino, db=self._objmeta)
        rec = Inode.decode(_U64.unpack(raw_ino)[0], rec_raw)
        name = rec.relpath.rstrip("/").rsplit("/", 1)[-1].encode()
        dkey = _dentry_key(rec.parent, name)
        if txn.get(dkey, db=self._shadowed) == raw_ino:
            txn.delete(dkey, db=self._shadowed)
            return
        current = txn.get(dkey, db=self._dentries)
        if current is None or current[:8] != raw_ino:
            return
        txn.delete(dkey, db=self._dentries)
        self._adjust_dir(txn, _U64.pack(rec.parent), -1 if rec.kind is Kind.DIR else 0,
                         local_mtime_ns)
        if seen is not None and rec.kind is Kind.DIR:
            self._attr_changed(_U64.pack(rec.parent))  # its link count
        if rec.kind is Kind.DIR:
            # A file hidden by this directory shows again if it is still current.
            twin = txn.get(dkey, db=self._shadowed)
            if twin is not None:
                txn.delete(dkey, db=self._shadowed)
                if txn.get(twin, db=self._inodes) is not None and \
                        (seen is None or _U64.unpack(twin)[0] in seen):
                    txn.put(dkey, twin + bytes((Kind.FILE,)), db=self._dentries)


def _relpath_of(record: bytes) -> str:
    etag_len = _ETAG_LEN.unpack_from(record, _ETAG_LEN_OFFSET)[0]
    return record[_RECORD.size + etag_len:].decode()


class _Seen:
    """The inode numbers a refresh's listing named: one bit each (1.25 MB per 10 million
    inodes; numbers are dense, never reused). Owned by the refreshing thread."""

    __slots__ = ("_bits",)

    def __init__(self, next_ino: int) -> None:
        self._bits = bytearray((next_ino >> 3) + 1)

    def add(self, ino: int) -> None:
        i = ino >> 3
        if i >= len(self._bits):
            self._bits.extend(bytes(i - len(self._bits) + 4096))
        self._bits[i] |= 1 << (ino & 7)

    def __contains__(self, ino: int) -> bool:
        i = ino >> 3
        return i < len(self._bits) and bool(self._bits[i] >> (ino & 7) & 1)


@dataclasses.dataclass(frozen=True, slots=True)
class _Skip:
    """Keys of local changes a refresh leaves alone: exact keys, and keys ending with '/'
    that also cover everything below them."""

    keys: frozenset[str]
    prefixes: tuple[str, ...]

    def covers(self, key: str) -> bool:
        return key in self.keys or (bool(self.prefixes) and key.startswith(self.prefixes))
