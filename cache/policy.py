"""Which pages stay on disk: pure eviction policies over page ids and their sizes.

A policy knows nothing about files, threads or the origin: it tracks the resident set, decides
admission, and names victims; the page cache does the I/O. That keeps policies small enough to
test exhaustively and to compare on access traces (tests/unit/test_policy.py).

- ``lru`` evicts the least recently used page to admit a new one. Good for most workloads.
- ``uniform`` admits pages until the cache is full, then keeps that resident set and admits
  nothing more. For shuffled multi-epoch training over a dataset larger than the cache, LRU
  evicts every page shortly before the next epoch asks for it (hit ratio near 0 once the dataset
  exceeds the cache), while a fixed subset gives hit ratio ~ cache/dataset on every epoch.

Replica-aware eviction (in a cluster, ARCHITECTURE.md "Peer cache and master"): every page is
either *owned* by this host (the owner function of ``cache.ring`` names it) or a *copy* of a
page another member owns, which this host can get back from that owner instead of the origin.
When space is needed, copies go before owned pages; within each class the order is the
policy's own (LRU for ``lru``, insertion for ``uniform``). The page cache says which class a
page is in when it admits or loads it; when the member list changes it moves the pages whose
owner changed (``reclassify``): a page that became a copy goes first among the copies (the
cheapest to lose), one that became owned goes last among the owned (this host is now where
the cluster looks for it). Exact recency across the two classes is not kept over a change.
Without a cluster every page is owned and the policies are exactly the plain ones.

Memory: one ordered-dict entry per resident page (~150 bytes with its 20-byte id), so a
1 TiB cache of 1 MiB pages costs ~150 MB of daemon memory.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Hashable, Iterable


class EvictionPolicy(abc.ABC):
    """Resident-set bookkeeping. Not thread-safe: the page cache calls it under its lock.

    Two ordered dicts, page -> size: ``_copies`` (pages owned elsewhere) and ``_owned``;
    each is in eviction order (first evicted first), and copies go before owned pages."""

    name = "?"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._owned: OrderedDict[Hashable, int] = OrderedDict()
        self._copies: OrderedDict[Hashable, int] = OrderedDict()

    def __contains__(self, page: Hashable) -> bool:
        return page in self._owned or page in self._copies

    def __len__(self) -> int:
        return len(self._owned) + len(self._copies)

    @property
    def copies(self) -> int:
        """How many resident pages are copies of pages owned elsewhere."""
        return len(self._copies)

    def is_copy(self, page: Hashable) -> bool:
        return page in self._copies

    def pages(self) -> list[Hashable]:
        """Resident pages, first evicted first."""
        return [*self._copies, *self._owned]

    def sizes(self) -> dict[Hashable, int]:
        """Resident page -> its size."""
        return {**self._copies, **self._owned}

    def remove(self, page: Hashable) -> bool:
        size = self._owned.pop(page, None)
        if size is None:
            size = self._copies.pop(page, None)
            if size is None:
                return False
        self.used_bytes -= size
        return True

    def _insert(self, page: Hashable, size: int, owned: bool = True) -> None:
        self.remove(page)
        (self._owned if owned else self._copies)[page] = size
        self.used_bytes += size

    def _pop_first(self) -> Hashable:
        page, size = (self._copies or self._owned).popitem(last=False)
        self.used_bytes -= size
        return page

    def _move_to_end(self, page: Hashable) -> None:
        if page in self._owned:
            self._owned.move_to_end(page)
        elif page in self._copies:
            self._copies.move_to_end(page)

    def resize(self, capacity_bytes: int) -> list[Hashable]:
        """Set the capacity; return the pages evicted to fit it (in eviction order)."""
        self.capacity_bytes = max(0, capacity_bytes)
        victims = []
        while self.used_bytes > self.capacity_bytes:
            victims.append(self._pop_first())
        return victims

    def load(self, page: Hashable, size: int, owned: bool = True) -> list[Hashable]:
        """Restore a page found on disk at start-up (call in least- to most-recent order)."""
        self._insert(page, size, owned)
        return self.resize(self.capacity_bytes)

    def reclassify(self, changes: Iterable[tuple[Hashable, bool]]) -> int:
        """Apply (page, owned) after a membership change; returns how many pages moved.
        A page that became a copy goes first among the copies, one that became owned last
        among the owned; pages not resident are ignored."""
        new_copies: list[tuple[Hashable, int]] = []
        moved = 0
        for page, owned in changes:
            if owned and page in self._copies:
                self._owned[page] = self._copies.pop(page)
                moved += 1
            elif not owned and page in self._owned:
                new_copies.append((page, self._owned.pop(page)))
                moved += 1
        if new_copies:
            rest = self._copies
            self._copies = OrderedDict(new_copies)
            self._copies.update(rest)
        return moved

    @abc.abstractmethod
    def admit(self, page: Hashable, size: int, owned: bool = True) -> list[Hashable] | None:
        """Make ``page`` resident. Returns the victims to evict first, or None if refused."""

    @abc.abstractmethod
    def touch(self, page: Hashable) -> None:
        """A resident page was read."""


class LruPolicy(EvictionPolicy):
    name = "lru"

    def admit(self, page: Hashable, size: int, owned: bool = True) -> list[Hashable] | None:
        if size > self.capacity_bytes:
            return None
        self.remove(page)
        victims = []
        while self.used_bytes + size > self.capacity_bytes:
            victims.append(self._pop_first())
        self._insert(page, size, owned)
        return victims

    def touch(self, page: Hashable) -> None:
        self._move_to_end(page)


class UniformPolicy(EvictionPolicy):
    """Admit until full, then hold the resident set (only ``resize`` ever evicts, copies
    first)."""

    name = "uniform"

    def admit(self, page: Hashable, size: int, owned: bool = True) -> list[Hashable] | None:
        if page in self:
            return []
        if self.used_bytes + size > self.capacity_bytes:
            return None
        self._insert(page, size, owned)
        return []

    def touch(self, page: Hashable) -> None:
        return None


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LruPolicy, "uniform": UniformPolicy}


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    try:
        return POLICIES[name](capacity_bytes)
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r} (choose {', '.join(POLICIES)})") from None
