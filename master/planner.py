"""The preload planner: which group a source goes to, and which member fetches which extent.

Pure functions (no I/O, no clock, no state), so the rules are tested on their own:

- *Which group.* A group is the set of live members that mount the same origin (endpoint,
  bucket, prefix). A source can be preloaded only into a group that mounts it (a member only
  fetches the bucket/prefix it mounted); when several groups do, the caller must name one.
- *Which extents.* Each object version is cut into the same aligned extents of
  ``extent_pages`` 1 MiB pages that the peer cache routes by (``objfs.cache.ring``), and each
  extent goes to its owner under the group's member list: the member that readers of that
  extent will ask. Directory markers (``dir/`` keys of zero bytes) are not files.
- *Mixed extent sizes are refused.* Members of one group must agree on ``extent_pages``,
  otherwise their owner functions disagree and preloaded pages land where nobody looks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from objfs.cache.pages import ObjectVersion, version_digest
from objfs.cache.ring import Ring, extents
from objfs.master.errors import Conflict
from objfs.master.protocol import Origin
from objfs.store import ObjectInfo

PAGE_SIZE = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class PlannedExtent:
    key: str
    etag: str
    size: int
    extent: int
    extent_pages: int
    digest: bytes          # the version digest (owner hashing input)
    owner: str | None      # None: the group has no live member now
    nbytes: int            # bytes of the object in this extent


def group_ring(members: Sequence[str], extent_pages: int) -> Ring | None:
    """The owner function over ``members`` (None when there are none)."""
    if not members:
        return None
    return Ring.of(members, min(members), extent_pages)


def owner_of(ring: Ring | None, digest: bytes, extent: int) -> str | None:
    return None if ring is None else ring.owner_of_extent(digest, extent)


def extent_bytes(size: int, extent: int, extent_pages: int) -> int:
    span = extent_pages * PAGE_SIZE
    start = extent * span
    return max(0, min(size, start + span) - start)


def is_directory_marker(obj: ObjectInfo) -> bool:
    return obj.key.endswith("/")


def plan_object(bucket: str, obj: ObjectInfo, ring: Ring | None,
                extent_pages: int) -> list[PlannedExtent]:
    """Every extent of ``obj`` with its owner (none for a zero-byte object)."""
    version = ObjectVersion(bucket, obj.key, obj.etag, obj.size)
    digest = version_digest(version)
    return [PlannedExtent(obj.key, obj.etag, obj.size, e, extent_pages, digest,
                          owner_of(ring, digest, e), extent_bytes(obj.size, e, extent_pages))
            for e in extents(version, extent_pages)]


def check_extent_pages(reported: Mapping[str, int]) -> int:
    """The one ``extent_pages`` value members report; ``Conflict`` naming who differs."""
    values: dict[int, list[str]] = {}
    for member, pages in sorted(reported.items()):
        values.setdefault(pages, []).append(member)
    if len(values) > 1:
        detail = "; ".join(f"{pages} pages on {', '.join(ms)}"
                           for pages, ms in sorted(values.items()))
        raise Conflict(f"members of one group report different extent sizes ({detail}): "
                       "run the same objfs version on every daemon of a group",
                       code="mixed_extent_pages")
    if not values:
        raise Conflict("no members")
    return next(iter(values))


def choose_group(groups: Mapping[Origin, Sequence[str]], bucket: str, paths: Sequence[str],
                 wanted: str | None) -> Origin:
    """The group a preload of ``paths`` (keys or key prefixes) of ``bucket`` goes to.

    ``groups`` maps each group to its live members. Raises ``Conflict`` when no group with
    live members mounts every path, when several do and ``wanted`` (a group id) names none
    of them, or when ``wanted`` is unknown.
    """
    live = {origin: members for origin, members in groups.items() if members}
    covering = sorted(o for o in live if all(o.covers(bucket, p) for p in paths))
    if wanted is not None:
        for origin in covering:
            if origin.group_id == wanted:
                return origin
        known = ", ".join(o.group_id for o in sorted(live)) or "none"
        raise Conflict(f"group {wanted!r} has no live member that mounts the data "
                       f"(live groups: {known})", code="not_mounted")
    if not covering:
        what = f"s3://{bucket}/{paths[0]}" if len(paths) == 1 else f"these files of {bucket}"
        mounted = ", ".join(f"s3://{o.bucket}/{o.prefix}" for o in sorted(live))
        raise Conflict(f"no live member mounts {what} (members mount: {mounted or 'nothing'}"
                       "; a member registers when its daemon runs with --master)",
                       code="not_mounted")
    if len(covering) > 1:
        raise Conflict("several member groups mount this data: "
                       f"{', '.join(o.group_id for o in covering)}; choose one with group "
                       "(objfs preload --group)", code="ambiguous_group")
    return covering[0]
