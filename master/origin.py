"""How the master reads the origin: listings and HEADs through ``objfs.store.ObjectStore``.

The master lists what a job covers with its own ``--endpoint``/``--region`` and the AWS
credential chain, one ``ObjectStore`` per bucket (created on first use). It never reads object
bytes. Its ETags are the ones the daemons see (the store is the one place ETags are
normalized), so its version digests, and thus the owners of extents, match theirs.

Every method BLOCKS: call them from worker threads, never from the event loop. Failures come
out as master errors: a missing bucket is ``NotFound`` (404); anything else the origin does
wrong is ``OriginFailed`` (502) with the store's one-line message.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

from objfs.config import StoreConfig
from objfs.errors import BucketNotFound, ObjfsError
from objfs.loop import EventLoopThread
from objfs.master.errors import MasterError, NotFound, OriginFailed
from objfs.metrics import Metrics
from objfs.store import ObjectInfo, ObjectStore

HEAD_CONCURRENCY = 32


class OriginLister(Protocol):
    def first_key(self, bucket: str, prefix: str) -> str | None:
        """Some key under ``prefix`` (None if there is none)."""
        ...

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object ``key`` (None if it does not exist)."""
        ...

    def head_many(self, bucket: str, keys: Sequence[str]) -> list[ObjectInfo | None]:
        ...

    def list(self, bucket: str, prefix: str) -> Iterator[list[ObjectInfo]]:
        """Every object under ``prefix``, a page (<= 1000) at a time."""
        ...


def translate(exc: ObjfsError, bucket: str, where: str) -> MasterError:
    if isinstance(exc, MasterError):
        return exc
    if isinstance(exc, BucketNotFound):
        return NotFound(f"bucket {bucket!r} does not exist at {where}")
    if exc.errno == errno.EACCES:
        return OriginFailed(f"the master is denied access to bucket {bucket!r} at {where} "
                            f"(check its credentials): {exc}")
    return OriginFailed(f"origin {where}: {exc}")


class StoreOrigin:
    """``OriginLister`` over real ``ObjectStore``s. Thread-safe."""

    def __init__(self, endpoint: str | None, region: str, loop: EventLoopThread, *,
                 metrics: Metrics | None = None, session: object | None = None) -> None:
        self._endpoint = endpoint
        self._region = region
        self._loop = loop
        self._metrics = metrics or Metrics()
        self._session = session
        self._lock = threading.Lock()
        self._stores: dict[str, ObjectStore] = {}  # guarded by _lock
        self.where = endpoint or f"AWS S3 ({region})"

    def _store(self, bucket: str) -> ObjectStore:
        with self._lock:
            store = self._stores.get(bucket)
            if store is None:
                config = StoreConfig(bucket=bucket, endpoint=self._endpoint,
                                     region=self._region)
                store = ObjectStore(config, self._loop, metrics=self._metrics,
                                    session=self._session)  # type: ignore[arg-type]
                self._stores[bucket] = store
            return store

    def first_key(self, bucket: str, prefix: str) -> str | None:
        pages = self._store(bucket).list_pages(prefix)
        try:
            for page in pages:
                if page:
                    return page[0].key
            return None
        except ObjfsError as exc:
            raise translate(exc, bucket, self.where) from None
        finally:
            pages.close()

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            return self._store(bucket).head(key)
        except ObjfsError as exc:
            if exc.errno == errno.ENOENT and not isinstance(exc, BucketNotFound):
                return None
            raise translate(exc, bucket, self.where) from None

    def head_many(self, bucket: str, keys: Sequence[str]) -> list[ObjectInfo | None]:
        store = self._store(bucket)

        async def all_heads() -> list[ObjectInfo | None]:
            limit = asyncio.Semaphore(HEAD_CONCURRENCY)

            async def one(key: str) -> ObjectInfo | None:
                async with limit:
                    try:
                        return (await store.head_object(key)).info
                    except ObjfsError as exc:
                        if exc.errno == errno.ENOENT and not isinstance(exc, BucketNotFound):
                            return None
                        raise

            return list(await asyncio.gather(*(one(k) for k in keys)))

        try:
            return self._loop.run(all_heads())
        except ObjfsError as exc:
            raise translate(exc, bucket, self.where) from None

    def list(self, bucket: str, prefix: str) -> Iterator[list[ObjectInfo]]:
        pages = self._store(bucket).list_pages(prefix)
        try:
            yield from pages
        except ObjfsError as exc:
            raise translate(exc, bucket, self.where) from None
        finally:
            pages.close()

    def close(self) -> None:
        with self._lock:
            stores = list(self._stores.values())
            self._stores.clear()
        for store in stores:
            store.close()
