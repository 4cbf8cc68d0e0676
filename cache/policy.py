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

Pins (preload, README "Preload"): a page can be *pinned* by one or more holders (a running
preload job), whether or not it is resident yet. A resident pinned page is in neither
eviction order: nothing evicts it, not even ``resize``, until its last pin goes; it then
returns as the most recently used page of its class. A page pinned before it is admitted is
admitted pinned. Admission that would need to evict pinned bytes is refused (``admit``
returns None), so a job never evicts its own pages: when pinned pages fill the cache, further
pages are not kept and the job reports them failed.

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
    each is in eviction order (first evicted first), and copies go before owned pages.
    Resident pinned pages are in ``_pinned`` (page -> (size, owned)) instead; ``_pins``
    counts the pins of every pinned page, resident or not."""

    name = "?"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._owned: OrderedDict[Hashable, int] = OrderedDict()
        self._copies: OrderedDict[Hashable, int] = OrderedDict()
        self._pinned: dict[Hashable, tuple[int, bool]] = {}
        self._pins: dict[Hashable, int] = {}
        self.pinned_bytes = 0
        self._pinned_copies = 0

    def __contains__(self, page: Hashable) -> bool:
        return page in self._owned or page in self._copies or page in self._pinned

    def __len__(self) -> int:
        return len(self._owned) + len(self._copies) + len(self._pinned)

    @property
    def copies(self) -> int:
        """How many resident pages are copies of pages owned elsewhere."""
        return len(self._copies) + self._pinned_copies

    @property
    def pinned(self) -> int:
        """How many resident pages are pinned."""
        return len(self._pinned)

    def is_copy(self, page: Hashable) -> bool:
        if page in self._pinned:
            return not self._pinned[page][1]
        return page in self._copies

    def is_pinned(self, page: Hashable) -> bool:
        return page in self._pins

    def pages(self) -> list[Hashable]:
        """Resident pages, first evicted first (pinned ones last: never while pinned)."""
        return [*self._copies, *self._owned, *self._pinned]

    def sizes(self) -> dict[Hashable, int]:
        """Resident page -> its size."""
        return {**self._copies, **self._owned,
                **{page: size for page, (size, _) in self._pinned.items()}}

    @property
    def evictable_bytes(self) -> int:
        return self.used_bytes - self.pinned_bytes

    def remove(self, page: Hashable) -> bool:
        """Forget a resident page (evicted, dropped, corrupt); its pins stay, so it is
        admitted pinned again if it comes back."""
        size = self._owned.pop(page, None)
        if size is None:
            size = self._copies.pop(page, None)
            if size is None:
                entry = self._pinned.pop(page, None)
                if entry is None:
                    return False
                size, owned = entry
                self.pinned_bytes -= size
                self._pinned_copies -= not owned
        self.used_bytes -= size
        return True

    def _insert(self, page: Hashable, size: int, owned: bool = True) -> None:
        self.remove(page)
        if page in self._pins:
            self._pinned[page] = (size, owned)
            self.pinned_bytes += size
            self._pinned_copies += not owned
        else:
            (self._owned if owned else self._copies)[page] = size
        self.used_bytes += size

    def pin(self, page: Hashable) -> None:
        """Add a pin to ``page`` (resident or not)."""
        count = self._pins.get(page, 0)
        self._pins[page] = count + 1
        if count:
            return
        owned = page in self._owned
        size = self._owned.pop(page, None) if owned else self._copies.pop(page, None)
        if size is not None:
            self._pinned[page] = (size, owned)
            self.pinned_bytes += size
            self._pinned_copies += not owned

    def unpin(self, page: Hashable) -> None:
        """Take one pin off ``page``; with its last pin gone a resident page becomes the
        most recently used of its class."""
        count = self._pins.get(page, 0)
        if count > 1:
            self._pins[page] = count - 1
            return
        self._pins.pop(page, None)
        entry = self._pinned.pop(page, None)
        if entry is not None:
            size, owned = entry
            self.pinned_bytes -= size
            self._pinned_copies -= not owned
            (self._owned if owned else self._copies)[page] = size

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
        while self.used_bytes > self.capacity_bytes and (self._copies or self._owned):
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
            entry = self._pinned.get(page)
            if entry is not None:
                if entry[1] != owned:
                    self._pinned[page] = (entry[0], owned)
                    self._pinned_copies += -1 if owned else 1
                    moved += 1
                continue
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
        already = self._pinned.get(page, (0, True))[0]
        if self.pinned_bytes - already + size > self.capacity_bytes:
            return None  # only by evicting pinned pages (or never: larger than the cache)
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
