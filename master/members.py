"""The member registry: who is alive in which group, as the master sees it.

A member is a daemon, identified by its peer address, that heartbeats; its group is the origin
(endpoint, bucket, prefix) it mounts. A member not heard from for ``timeout_s`` (on the
injected monotonic clock) is expired; the coordinator then drops it and reassigns its work.
Registrations are persisted by the coordinator; liveness is not: a restarted master gives
every known member a full timeout from its own start to heartbeat again.

Not thread-safe: owned by ``Coordinator`` and used under its lock only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from objfs.cache.ring import Ring
from objfs.master.planner import check_extent_pages, group_ring
from objfs.master.protocol import MemberReport, Origin


@dataclasses.dataclass
class Member:
    id: str
    origin: Origin
    extent_pages: int
    incarnation: str
    registered_at: float              # wall clock, for display
    last_seen: float                  # monotonic clock
    capacity_bytes: int = 0
    used_bytes: int = 0
    free_bytes: int = 0

    def to_record(self) -> dict[str, Any]:
        return {"origin": self.origin.to_json(), "extent_pages": self.extent_pages,
                "incarnation": self.incarnation, "registered_at": self.registered_at,
                "cache": {"capacity_bytes": self.capacity_bytes, "used_bytes": self.used_bytes,
                          "free_bytes": self.free_bytes}}

    @classmethod
    def from_record(cls, member_id: str, record: dict[str, Any], last_seen: float) -> "Member":
        cache = record.get("cache", {})
        return cls(member_id, Origin.from_json(record["origin"]), int(record["extent_pages"]),
                   record.get("incarnation", ""), float(record.get("registered_at", 0)),
                   last_seen, int(cache.get("capacity_bytes", 0)),
                   int(cache.get("used_bytes", 0)), int(cache.get("free_bytes", 0)))


class Registry:
    def __init__(self, clock: Callable[[], float], timeout_s: float) -> None:
        self._clock = clock
        self.timeout_s = timeout_s
        self._members: dict[str, Member] = {}
        self._rings: dict[tuple[str, int], Ring | None] = {}  # cache, cleared on any change

    def get(self, member_id: str) -> Member | None:
        return self._members.get(member_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._members.values(), key=lambda m: m.id))

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: Member) -> None:
        self._members[member.id] = member
        self._rings.clear()

    def remove(self, member_id: str) -> Member | None:
        member = self._members.pop(member_id, None)
        self._rings.clear()
        return member

    def check_joinable(self, report: MemberReport) -> None:
        """Refuse (``Conflict``) a member whose extent size differs from its group's."""
        reported = {m.id: m.extent_pages for m in self._members.values()
                    if m.origin == report.origin and m.id != report.member}
        if reported and report.extent_pages not in reported.values():
            reported[report.member] = report.extent_pages
            check_extent_pages(reported)

    def update_seen(self, member: Member, report: MemberReport) -> None:
        member.last_seen = self._clock()
        member.capacity_bytes = report.capacity_bytes
        member.used_bytes = report.used_bytes
        member.free_bytes = report.free_bytes
        member.incarnation = report.incarnation

    def expired(self) -> list[str]:
        deadline = self._clock() - self.timeout_s
        return sorted(m.id for m in self._members.values() if m.last_seen < deadline)

    def groups(self) -> dict[Origin, list[str]]:
        out: dict[Origin, list[str]] = {}
        for m in self._members.values():
            out.setdefault(m.origin, []).append(m.id)
        return {origin: sorted(ids) for origin, ids in out.items()}

    def origin_of(self, group_id: str) -> Origin | None:
        for m in self._members.values():
            if m.origin.group_id == group_id:
                return m.origin
        return None

    def members_of(self, group_id: str) -> list[str]:
        return sorted(m.id for m in self._members.values() if m.origin.group_id == group_id)

    def extent_pages(self, group_id: str) -> int | None:
        for m in self._members.values():
            if m.origin.group_id == group_id:
                return m.extent_pages
        return None

    def capacity(self, group_id: str) -> int:
        return sum(m.capacity_bytes for m in self._members.values()
                   if m.origin.group_id == group_id)

    def ring(self, group_id: str, extent_pages: int) -> Ring | None:
        """The owner function over the live members of ``group_id`` (None if none)."""
        key = (group_id, extent_pages)
        if key not in self._rings:
            self._rings[key] = group_ring(self.members_of(group_id), extent_pages)
        return self._rings[key]
