"""The persistent index of Ready pages: LMDB, page id -> (bytes on disk, last-use sequence).

The index, not a directory walk, is what a restarted daemon loads: one cursor pass, sorted by
last use so LRU order survives restarts. Files and index can disagree after a crash (a page
written but not indexed, or indexed but its file gone); the page cache reconciles them in the
background, and a hit whose file is missing or corrupt is simply a miss.

Writes use ``sync=False``: a daemon crash loses nothing (LMDB's pages are in the kernel), an OS
crash can lose the last updates, which only costs refetches. A damaged index is discarded and
the cache starts empty rather than failing the mount.
"""

from __future__ import annotations

import logging
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmdb

log = logging.getLogger(__name__)

_ENTRY = struct.Struct(">IQ")  # stored bytes, last-use sequence
_SCHEMA = b"objfs-page-index-1"


class PageIndex:
    """Thread-safe (LMDB serializes writers; readers never block)."""

    def __init__(self, path: Path, map_size: int = 1 << 34) -> None:
        self.path = path
        try:
            self._env = self._open(path, map_size)
        except lmdb.Error as exc:
            log.warning("page index %s is unreadable (%s): starting with an empty cache",
                        path, exc)
            shutil.rmtree(path, ignore_errors=True)
            self._env = self._open(path, map_size)

    @staticmethod
    def _open(path: Path, map_size: int) -> lmdb.Environment:
        path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(path), map_size=map_size, max_dbs=2, sync=False, metasync=False,
                        readahead=False, max_readers=256)
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            schema = txn.get(b"schema", db=meta)
            if schema is None:
                txn.put(b"schema", _SCHEMA, db=meta)
            elif schema != _SCHEMA:
                env.close()
                raise lmdb.Error(f"unknown index schema {schema!r}")
        return env

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()

    def entries(self) -> Iterator[tuple[bytes, int, int]]:
        """(page id, stored bytes, last-use sequence) for every indexed page, in id order."""
        with self._env.begin(buffers=False) as txn:
            for key, value in txn.cursor():
                if key == b"meta":
                    continue
                size, seq = _ENTRY.unpack(value)
                yield key, size, seq

    def put(self, entries: Iterable[tuple[bytes, int, int]]) -> None:
        with self._env.begin(write=True) as txn:
            for page_id, size, seq in entries:
                txn.put(page_id, _ENTRY.pack(size, seq))

    def touch(self, seqs: dict[bytes, int]) -> None:
        """Record last use; ignores pages no longer indexed."""
        with self._env.begin(write=True) as txn:
            for page_id, seq in seqs.items():
                value = txn.get(page_id)
                if value is not None:
                    txn.put(page_id, _ENTRY.pack(_ENTRY.unpack(value)[0], seq))

    def delete(self, page_ids: Iterable[bytes]) -> None:
        with self._env.begin(write=True) as txn:
            for page_id in page_ids:
                txn.delete(page_id)

    def count(self) -> int:
        with self._env.begin() as txn:
            return txn.stat()["entries"] - 1  # minus the "meta" sub-db record
