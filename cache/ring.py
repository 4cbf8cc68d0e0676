"""Which cluster member owns a page: rendezvous (highest random weight) hashing over extents.

Why extents and not pages: an owner fetches what it owns from the origin, and a ranged GET of
one page costs a request's latency for 1 MiB. Pages are grouped into aligned *extents* of
``extent_pages`` pages (the ``--read-request-size`` run, 8 MiB by default) and an extent has
one owner, so an owner still fetches a run of pages with one GET, and a reader asks one owner
per run.

Why rendezvous hashing: every member computes the same owner from the member list alone, with
no coordination, and when a member joins or leaves only the extents it wins or held move
(about 1/N of them), so the caches of the others stay useful. The weight of a member for an
extent is xxh3-64 over (member id, version digest, extent number); the highest weight wins,
ties broken by the member id.

The same function places preloaded pages (the master's planner) and routes misses (the peer
cache), so preloaded pages are where readers look for them. It is pure: no I/O, no clock.
A page id (``cache.pages.page_id``) is the 16-byte version digest followed by the page index,
so ownership can be computed from a page id alone (``Ring.owns_page``), which is what the
replica-aware eviction policy does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import xxhash

from objfs.cache.pages import ObjectVersion, version_digest

DEFAULT_EXTENT_PAGES = 8
_INDEX_BYTES = 4  # big-endian page index at the end of a page id


def extent_of(page_index: int, extent_pages: int) -> int:
    """The extent that holds page ``page_index``."""
    return page_index // extent_pages


def extent_range(version: ObjectVersion, extent: int, extent_pages: int) -> range:
    """Page indexes of ``extent`` of ``version`` (the last extent may be short)."""
    start = extent * extent_pages
    return range(start, min(start + extent_pages, version.page_count()))


def extents(version: ObjectVersion, extent_pages: int) -> range:
    """Every extent number of ``version``."""
    return range(-(-version.page_count() // extent_pages))


def split_at_extents(pages: range, extent_pages: int) -> list[range]:
    """``pages`` cut at extent boundaries: each piece lies in one extent (one owner)."""
    out = []
    start = pages.start
    while start < pages.stop:
        stop = min(pages.stop, (start // extent_pages + 1) * extent_pages)
        out.append(range(start, stop))
        start = stop
    return out


def _weight(member: bytes, digest: bytes, extent: int) -> int:
    return xxhash.xxh3_64_intdigest(member + b"\0" + digest + extent.to_bytes(8, "big"))


@dataclasses.dataclass(frozen=True)
class Ring:
    """An immutable member list and the owner function over it.

    ``members`` are member ids (``HOST:PORT`` peer addresses), sorted and unique; ``self_id``
    is this host's id (it is always a member). A ring of one member owns everything.
    """

    members: tuple[str, ...]
    self_id: str
    extent_pages: int = DEFAULT_EXTENT_PAGES
    _encoded: tuple[bytes, ...] = dataclasses.field(init=False, repr=False, compare=False)

    @classmethod
    def of(cls, members: Iterable[str], self_id: str,
           extent_pages: int = DEFAULT_EXTENT_PAGES) -> "Ring":
        """A ring over ``members`` plus ``self_id`` (added if missing)."""
        return cls(tuple(sorted(set(members) | {self_id})), self_id, extent_pages)

    def __post_init__(self) -> None:
        if self.extent_pages < 1:
            raise ValueError("extent_pages must be >= 1")
        if self.self_id not in self.members:
            raise ValueError(f"{self.self_id!r} is not a member of {self.members!r}")
        if list(self.members) != sorted(set(self.members)):
            raise ValueError("members must be sorted and unique (use Ring.of)")
        object.__setattr__(self, "_encoded", tuple(m.encode() for m in self.members))

    @property
    def alone(self) -> bool:
        """A cluster of one: every page is this host's own."""
        return len(self.members) == 1

    def ranked(self, digest: bytes, extent: int) -> list[str]:
        """Members from the owner down, by weight for this extent of the version ``digest``."""
        weights = sorted(((_weight(enc, digest, extent), m)
                          for enc, m in zip(self._encoded, self.members)), reverse=True)
        return [m for _, m in weights]

    def owner_of_extent(self, digest: bytes, extent: int) -> str:
        if len(self.members) == 1:
            return self.members[0]
        best_member = self.members[0]
        best = -1
        for enc, member in zip(self._encoded, self.members):
            w = _weight(enc, digest, extent)
            if w > best or (w == best and member > best_member):
                best, best_member = w, member
        return best_member

    def owner(self, version: ObjectVersion, page_index: int) -> str:
        """The member that owns page ``page_index`` of ``version``."""
        return self.owner_of_extent(version_digest(version),
                                    extent_of(page_index, self.extent_pages))

    def owns_page(self, page_id: bytes) -> bool:
        """Whether this host owns the page with id ``page_id`` (``cache.pages.page_id``)."""
        if len(self.members) == 1:
            return True
        digest, index = page_id[:-_INDEX_BYTES], int.from_bytes(page_id[-_INDEX_BYTES:], "big")
        return self.owner_of_extent(digest, extent_of(index, self.extent_pages)) == self.self_id
