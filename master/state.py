"""The master's persistent state: LMDB in ``--state-dir``, so a restarted master resumes.

Databases (keys are bytes; job ids are 16 ASCII characters, task and file numbers 8-byte
big-endian, so one job's records are contiguous and in order)::

    meta      b"schema"                     -> SCHEMA
    members   member id                     -> JSON {origin, extent_pages, cache, ...}
    jobs      job id                        -> JSON ``Job`` record (counters included)
    tasks     job id + task no              -> JSON {key, etag, size, extent, ...}
    files     job id + file no              -> JSON {key, size, left, fetched, skipped, failed}
    filekeys  job id + blake2b(key)         -> file no (a relisted key is planned once)
    queue     member id + NUL + job + task  -> version digest (16) + extent (4): PENDING work
    leased    member id + NUL + job + task  -> same: work handed to that member
    homed     member id + NUL + job + task  -> same: work that member completed (running jobs)

``queue``, ``leased`` and ``homed`` are the per-member indexes of a running job's extents:
leasing walks the member's ``queue`` range (oldest job first, since job ids start with their
creation time); a dropped member's three ranges are what gets reassigned. Their values carry what the owner
function needs, so a change of owners never reads the task records.

The tasks, files and keys of a job are deleted when it ends (its counters live on in the job
record). Writes use ``sync=False`` (a killed master loses nothing; an OS crash may lose the
last transactions, which costs refetching work members did) and ``StateStore.sync`` flushes
periodically. One writer at a time: LMDB serializes write transactions, and the coordinator
calls in under its own lock anyway.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from objfs.errors import ConfigError

SCHEMA = b"objfs-master-1"
_NO = struct.Struct(">Q")
_WORK = struct.Struct(">16sI")
JOB_ID_LEN = 16


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _job_key(job_id: str) -> bytes:
    key = job_id.encode()
    if len(key) != JOB_ID_LEN:
        raise ValueError(f"bad job id {job_id!r}")
    return key


def _numbered(job_id: str, number: int) -> bytes:
    return _job_key(job_id) + _NO.pack(number)


def _work_key(member: str, job_id: str, task: int) -> bytes:
    return member.encode() + b"\0" + _numbered(job_id, task)


def _split_work_key(key: bytes) -> tuple[str, str, int]:
    member, _, rest = key.partition(b"\0")
    return member.decode(), rest[:JOB_ID_LEN].decode(), _NO.unpack(rest[JOB_ID_LEN:])[0]


class Txn:
    """Typed access to the databases inside one LMDB transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._db = dbs

    # ---- members and jobs ----------------------------------------------------------------
    def put_member(self, member: str, record: dict[str, Any]) -> None:
        self._txn.put(member.encode(), _dumps(record), db=self._db["members"])

    def delete_member(self, member: str) -> None:
        self._txn.delete(member.encode(), db=self._db["members"])

    def members(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, value in self._txn.cursor(db=self._db["members"]):
            yield key.decode(), json.loads(value)

    def put_job(self, job_id: str, record: dict[str, Any]) -> None:
        self._txn.put(_job_key(job_id), _dumps(record), db=self._db["jobs"])

    def delete_job(self, job_id: str) -> None:
        self._txn.delete(_job_key(job_id), db=self._db["jobs"])

    def jobs(self) -> Iterator[dict[str, Any]]:
        for _, value in self._txn.cursor(db=self._db["jobs"]):
            yield json.loads(value)

    # ---- tasks, files, keys ---------------------------------------------------------------
    def get_task(self, job_id: str, task: int) -> dict[str, Any] | None:
        value = self._txn.get(_numbered(job_id, task), db=self._db["tasks"])
        return None if value is None else json.loads(value)

    def put_task(self, job_id: str, task: int, record: dict[str, Any]) -> None:
        self._txn.put(_numbered(job_id, task), _dumps(record), db=self._db["tasks"])

    def get_file(self, job_id: str, file_no: int) -> dict[str, Any] | None:
        value = self._txn.get(_numbered(job_id, file_no), db=self._db["files"])
        return None if value is None else json.loads(value)

    def put_file(self, job_id: str, file_no: int, record: dict[str, Any]) -> None:
        self._txn.put(_numbered(job_id, file_no), _dumps(record), db=self._db["files"])

    def claim_key(self, job_id: str, key: str) -> bool:
        """Record that ``key`` is planned in ``job_id``; False if it already was."""
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        return self._txn.put(_job_key(job_id) + digest, b"", db=self._db["filekeys"],
                             overwrite=False)

    def drop_job_records(self, job_id: str) -> int:
        """Delete the tasks, files and keys of ``job_id``; returns how many records."""
        prefix = _job_key(job_id)
        removed = 0
        for name in ("tasks", "files", "filekeys"):
            cursor = self._txn.cursor(db=self._db[name])
            if not cursor.set_range(prefix):
                continue
            while cursor.key().startswith(prefix):
                removed += 1
                if not cursor.delete():
                    break
        return removed

    # ---- per-member work indexes ----------------------------------------------------------
    def put_work(self, index: str, member: str, job_id: str, task: int, digest: bytes,
                 extent: int) -> None:
        self._txn.put(_work_key(member, job_id, task), _WORK.pack(digest, extent),
                      db=self._db[index])

    def delete_work(self, index: str, member: str, job_id: str, task: int) -> bool:
        return self._txn.delete(_work_key(member, job_id, task), db=self._db[index])

    def has_work(self, index: str, member: str, job_id: str, task: int) -> bool:
        return self._txn.get(_work_key(member, job_id, task), db=self._db[index]) is not None

    def work_of(self, index: str, member: str, limit: int | None = None,
                after: tuple[str, int] | None = None) -> list[tuple[str, int, bytes, int]]:
        """Up to ``limit`` (job, task, digest, extent) of ``member`` in ``index``, oldest job
        first, starting after the entry ``after`` (job, task). A snapshot: the caller may
        change the index while it walks the list."""
        prefix = member.encode() + b"\0"
        start = prefix if after is None else _work_key(member, *after) + b"\0"
        out: list[tuple[str, int, bytes, int]] = []
        cursor = self._txn.cursor(db=self._db[index])
        if not cursor.set_range(start):
            return out
        for key, value in cursor:
            if not key.startswith(prefix) or (limit is not None and len(out) >= limit):
                break
            _, job_id, task = _split_work_key(key)
            digest, extent = _WORK.unpack(value)
            out.append((job_id, task, digest, extent))
        return out

    def all_work(self, index: str) -> list[tuple[str, str, int, bytes, int]]:
        """Every (member, job, task, digest, extent) in ``index`` (a snapshot list)."""
        out = []
        for key, value in self._txn.cursor(db=self._db[index]):
            member, job_id, task = _split_work_key(key)
            digest, extent = _WORK.unpack(value)
            out.append((member, job_id, task, digest, extent))
        return out

    def count(self, name: str) -> int:
        return self._txn.stat(self._db[name])["entries"]


class StateStore:
    """Owns the LMDB environment of a state dir."""

    DATABASES = ("meta", "members", "jobs", "tasks", "files", "filekeys", "queue", "leased",
                 "homed")

    def __init__(self, path: Path, map_size: int = 1 << 34) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(path), map_size=map_size, max_dbs=len(self.DATABASES),
                                  sync=False, metasync=False, lock=True, subdir=True)
        except (OSError, lmdb.Error) as exc:
            raise ConfigError(f"master state in {path}: {exc}") from None
        self._dbs = {name: self._env.open_db(name.encode()) for name in self.DATABASES}
        with self._env.begin(write=True) as txn:
            schema = txn.get(b"schema", db=self._dbs["meta"])
            if schema is None:
                txn.put(b"schema", SCHEMA, db=self._dbs["meta"])
            elif schema != SCHEMA:
                raise ConfigError(f"master state in {path} has format {schema.decode()!r}, "
                                  f"this master reads {SCHEMA.decode()!r}: use a new "
                                  "--state-dir")

    def write(self) -> "_TxnContext":
        return _TxnContext(self._env, self._dbs, write=True)

    def read(self) -> "_TxnContext":
        return _TxnContext(self._env, self._dbs, write=False)

    def sync(self) -> None:
        self._env.sync(True)

    def close(self) -> None:
        try:
            self._env.sync(True)
        finally:
            self._env.close()


class _TxnContext:
    def __init__(self, env: lmdb.Environment, dbs: dict[str, Any], write: bool) -> None:
        self._env = env
        self._dbs = dbs
        self._write = write
        self._txn: lmdb.Transaction | None = None

    def __enter__(self) -> Txn:
        self._txn = self._env.begin(write=self._write)
        return Txn(self._txn, self._dbs)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._txn is not None
        if exc_type is None and self._write:
            self._txn.commit()
        else:
            self._txn.abort()
