"""Where missing pages come from: cache sources (the owning peer) in front of the origin.

A ``SourceChain`` is a list of sources whose last one is the origin (the only source of
truth); the ones before it are *cache sources*. In a cluster there is one cache source, the
peer cache (``cache.peer.PeerSource``): a run of pages that another member owns is asked of
that owner. The page cache routes each run (``SourceChain.wants_cache``): a run no cache
source applies to (no cluster, or this host owns it) goes to the origin directly, without
any lookup on the way; a run owned elsewhere asks the owner first (``fetch_cached``) and
falls back to the origin on a miss (``fetch_origin``). Page states never depend on where
bytes came from.

Failure of a cache source is a miss, never an application error: a source that does its
own accounting (counting, logging once per episode, backoff) raises ``SourceMiss``; any other
exception is counted here (``read_<source>_fallbacks_total``) and warned about once.

``OriginSource`` can be limited to a byte rate (``--origin-read-limit``): a token bucket on
the event loop, taken before each ranged GET.
"""

from __future__ import annotations

import logging
from typing import Protocol

from objfs.cache.limits import Priority, TokenBucket
from objfs.cache.pages import ObjectVersion, byte_range
from objfs.metrics import Metrics

log = logging.getLogger(__name__)


class SourceMiss(Exception):
    """A cache source could not answer; it has counted and logged that itself."""


class PageSource(Protocol):
    name: str

    async def fetch(self, version: ObjectVersion, pages: range) -> bytearray:
        """The bytes of consecutive ``pages`` of ``version``; raises an ObjfsError."""
        ...


class CacheSource(Protocol):
    """A source in front of the origin. ``applies`` is cheap and side-effect free."""

    name: str

    def applies(self, version: ObjectVersion, pages: range) -> bool: ...

    async def fetch(self, version: ObjectVersion, pages: range,
                    priority: Priority = Priority.DEMAND) -> bytearray: ...


class OriginSource:
    """Ranged GETs pinned to the version's ETag (a changed object raises StaleObject),
    optionally limited to ``limit`` bytes/s."""

    name = "origin"

    def __init__(self, store, limit: TokenBucket | None = None,  # objfs.store.ObjectStore
                 metrics: Metrics | None = None) -> None:
        self._store = store
        self._limit = limit  # used on the loop only
        self._metrics = metrics

    async def fetch(self, version: ObjectVersion, pages: range) -> bytearray:
        start, end = byte_range(version, pages)
        if self._limit is not None:
            waited = await self._limit.take(end - start)
            if waited and self._metrics is not None:
                self._metrics.inc("origin_limit_wait_seconds_total", waited)
        return await self._store.get_range(version.key, version.etag, start, end)


class SourceChain:
    def __init__(self, sources: list, *, metrics: Metrics) -> None:
        if not sources:
            raise ValueError("a source chain needs at least one source")
        self._cache_sources: list[CacheSource] = list(sources[:-1])
        self._origin: PageSource = sources[-1]
        self._metrics = metrics
        self._warned: set[str] = set()  # loop only

    @property
    def names(self) -> list[str]:
        return [s.name for s in (*self._cache_sources, self._origin)]

    @property
    def has_cache_sources(self) -> bool:
        return bool(self._cache_sources)

    def wants_cache(self, version: ObjectVersion, pages: range) -> bool:
        """Whether a cache source should be asked for this run before the origin."""
        for source in self._cache_sources:
            applies = getattr(source, "applies", None)
            if applies is None or applies(version, pages):
                return True
        return False

    async def fetch_cached(self, version: ObjectVersion, pages: range,
                           priority: Priority = Priority.DEMAND) -> bytearray | None:
        """The run from the first cache source that has it, or None (a miss: go to the
        origin). Never raises for a source's failure."""
        for source in self._cache_sources:
            applies = getattr(source, "applies", None)
            if applies is not None and not applies(version, pages):
                continue
            try:
                data = await source.fetch(version, pages, priority=priority)
            except SourceMiss:
                continue
            except Exception as exc:  # any failure of a cache source is a miss
                self._metrics.inc(f"read_{source.name}_fallbacks_total")
                if source.name not in self._warned:
                    self._warned.add(source.name)
                    log.warning("source %s failed, falling back (warned once): %s",
                                source.name, exc)
                continue
            self._metrics.inc(f"read_{source.name}_bytes", len(data))
            return data
        return None

    async def fetch_origin(self, version: ObjectVersion, pages: range) -> bytearray:
        data = await self._origin.fetch(version, pages)
        self._metrics.inc(f"read_{self._origin.name}_bytes", len(data))
        return data

    async def fetch(self, version: ObjectVersion, pages: range,
                    priority: Priority = Priority.DEMAND) -> bytearray:
        """The run from a cache source if one applies and has it, else from the origin."""
        if self._cache_sources and self.wants_cache(version, pages):
            data = await self.fetch_cached(version, pages, priority)
            if data is not None:
                return data
        return await self.fetch_origin(version, pages)
