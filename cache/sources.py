"""Where missing pages come from: a chain of sources tried in order.

Today the chain is just the origin. The peer cache (ARCHITECTURE.md, "Peer cache") inserts the
owning host in front of it: a peer that fails or times out is a miss, counted and warned about
once, and the next source is asked. The page cache only sees ``fetch(version, pages)``, so
page states never depend on where bytes came from.
"""

from __future__ import annotations

import logging
from typing import Protocol

from objfs.cache.pages import ObjectVersion, byte_range
from objfs.metrics import Metrics

log = logging.getLogger(__name__)


class PageSource(Protocol):
    name: str

    async def fetch(self, version: ObjectVersion, pages: range) -> bytearray:
        """The bytes of consecutive ``pages`` of ``version``; raises an ObjfsError."""
        ...


class OriginSource:
    """Ranged GETs pinned to the version's ETag (a changed object raises StaleObject)."""

    name = "origin"

    def __init__(self, store) -> None:  # objfs.store.ObjectStore
        self._store = store

    async def fetch(self, version: ObjectVersion, pages: range) -> bytearray:
        start, end = byte_range(version, pages)
        return await self._store.get_range(version.key, version.etag, start, end)


class SourceChain:
    def __init__(self, sources: list[PageSource], *, metrics: Metrics) -> None:
        if not sources:
            raise ValueError("a source chain needs at least one source")
        self._sources = sources
        self._metrics = metrics
        self._warned: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._sources]

    async def fetch(self, version: ObjectVersion, pages: range) -> bytearray:
        for source in self._sources[:-1]:
            try:
                data = await source.fetch(version, pages)
            except Exception as exc:  # any failure of a cache source is a miss
                self._metrics.inc(f"read_{source.name}_fallbacks_total")
                if source.name not in self._warned:
                    self._warned.add(source.name)
                    log.warning("source %s failed, falling back (warned once): %s",
                                source.name, exc)
                continue
            self._metrics.inc(f"read_{source.name}_bytes", len(data))
            return data
        last = self._sources[-1]
        data = await last.fetch(version, pages)
        self._metrics.inc(f"read_{last.name}_bytes", len(data))
        return data
