"""Which pages stay on disk: pure eviction policies over page ids and their sizes.

A policy knows nothing about files, threads or the origin: it tracks the resident set, decides
admission, and names victims; the page cache does the I/O. That keeps policies small enough to
test exhaustively and to compare on access traces (tests/unit/test_policy.py).

- ``lru`` evicts the least recently used page to admit a new one. Good for most workloads.
- ``uniform`` admits pages until the cache is full, then keeps that resident set and admits
  nothing more. For shuffled multi-epoch training over a dataset larger than the cache, LRU
  evicts every page shortly before the next epoch asks for it (hit ratio near 0 once the dataset
  exceeds the cache), while a fixed subset gives hit ratio ~ cache/dataset on every epoch.

Memory: one ordered-dict entry per resident page (~150 bytes with its 20-byte id), so a
1 TiB cache of 1 MiB pages costs ~150 MB of daemon memory.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Hashable


class EvictionPolicy(abc.ABC):
    """Resident-set bookkeeping. Not thread-safe: the page cache calls it under its lock."""

    name = "?"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()

    def __contains__(self, page: Hashable) -> bool:
        return page in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def pages(self) -> list[Hashable]:
        """Resident pages, first evicted first."""
        return list(self._sizes)

    def remove(self, page: Hashable) -> bool:
        size = self._sizes.pop(page, None)
        if size is None:
            return False
        self.used_bytes -= size
        return True

    def _insert(self, page: Hashable, size: int) -> None:
        self.remove(page)
        self._sizes[page] = size
        self.used_bytes += size

    def _pop_first(self) -> Hashable:
        page, size = self._sizes.popitem(last=False)
        self.used_bytes -= size
        return page

    def resize(self, capacity_bytes: int) -> list[Hashable]:
        """Set the capacity; return the pages evicted to fit it (in eviction order)."""
        self.capacity_bytes = max(0, capacity_bytes)
        victims = []
        while self.used_bytes > self.capacity_bytes:
            victims.append(self._pop_first())
        return victims

    def load(self, page: Hashable, size: int) -> list[Hashable]:
        """Restore a page found on disk at start-up (call in least- to most-recent order)."""
        self._insert(page, size)
        return self.resize(self.capacity_bytes)

    @abc.abstractmethod
    def admit(self, page: Hashable, size: int) -> list[Hashable] | None:
        """Make ``page`` resident. Returns the victims to evict first, or None if refused."""

    @abc.abstractmethod
    def touch(self, page: Hashable) -> None:
        """A resident page was read."""


class LruPolicy(EvictionPolicy):
    name = "lru"

    def admit(self, page: Hashable, size: int) -> list[Hashable] | None:
        if size > self.capacity_bytes:
            return None
        self.remove(page)
        victims = []
        while self.used_bytes + size > self.capacity_bytes:
            victims.append(self._pop_first())
        self._insert(page, size)
        return victims

    def touch(self, page: Hashable) -> None:
        if page in self._sizes:
            self._sizes.move_to_end(page)


class UniformPolicy(EvictionPolicy):
    """Admit until full, then hold the resident set (only ``resize`` ever evicts)."""

    name = "uniform"

    def admit(self, page: Hashable, size: int) -> list[Hashable] | None:
        if page in self._sizes:
            return []
        if self.used_bytes + size > self.capacity_bytes:
            return None
        self._insert(page, size)
        return []

    def touch(self, page: Hashable) -> None:
        return None


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LruPolicy, "uniform": UniformPolicy}


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    try:
        return POLICIES[name](capacity_bytes)
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r} (choose {', '.join(POLICIES)})") from None
