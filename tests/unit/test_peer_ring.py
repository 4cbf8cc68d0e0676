"""Unit tests of the owner function (``objfs.cache.ring``) and of the member list.

Rendezvous hashing over extents: every member computes the same owner from the list alone,
the load is balanced, and a membership change moves only what it must (about 1/N of the
extents when a member joins; only the leaving member's extents when one leaves).
"""

from __future__ import annotations

import collections

import pytest

from objfs.cache.pages import ObjectVersion, page_id, version_digest
from objfs.cache.ring import Ring, extent_of, extent_range, extents, split_at_extents
from objfs.cluster import MutableMembership, StaticMembership

MEMBERS = [f"10.0.0.{i}:9567" for i in range(1, 9)]
VERSIONS = [ObjectVersion("bkt", f"data/shard-{i:05d}.tar", f'"etag{i}"', 1 << 30)
            for i in range(40)]  # 40 x 1 GiB = 5,120 extents of 8 pages


def owners(ring: Ring) -> dict[tuple[bytes, int], str]:
    return {(version_digest(v), e): ring.owner_of_extent(version_digest(v), e)
            for v in VERSIONS for e in extents(v, ring.extent_pages)}


def test_every_member_computes_the_same_owner() -> None:
    views = [Ring.of(MEMBERS, me) for me in MEMBERS]
    reference = owners(views[0])
    for view in views[1:]:
        assert owners(view) == reference
    # Listing order and duplicates do not matter.
    assert owners(Ring.of(list(reversed(MEMBERS)) + MEMBERS[:2], MEMBERS[3])) == reference


def test_owner_is_per_extent_and_pages_of_an_extent_share_it() -> None:
    ring = Ring.of(MEMBERS, MEMBERS[0])
    v = VERSIONS[0]
    for e in range(20):
        pages = extent_range(v, e, 8)
        assert {ring.owner(v, i) for i in pages} == {ring.owner_of_extent(version_digest(v), e)}
    assert len({ring.owner(v, 8 * e) for e in range(64)}) == len(MEMBERS)  # spread out


def test_distribution_is_balanced() -> None:
    ring = Ring.of(MEMBERS, MEMBERS[0])
    counts = collections.Counter(owners(ring).values())
    mean = sum(counts.values()) / len(MEMBERS)
    assert set(counts) == set(MEMBERS)
    for member, n in counts.items():
        assert abs(n - mean) / mean < 0.10, (member, n, mean)  # 640 each, +-10 %


def test_adding_a_member_moves_about_one_nth_and_only_to_it() -> None:
    before = owners(Ring.of(MEMBERS, MEMBERS[0]))
    newcomer = "10.0.0.99:9567"
    after = owners(Ring.of(MEMBERS + [newcomer], MEMBERS[0]))
    moved = [k for k in before if before[k] != after[k]]
    assert all(after[k] == newcomer for k in moved)  # nothing moves between old members
    share = len(moved) / len(before)
    assert abs(share - 1 / 9) < 0.02, share


def test_removing_a_member_moves_only_its_extents() -> None:
    before = owners(Ring.of(MEMBERS, MEMBERS[0]))
    leaving = MEMBERS[5]
    after = owners(Ring.of([m for m in MEMBERS if m != leaving], MEMBERS[0]))
    for k in before:
        if before[k] == leaving:
            assert after[k] != leaving
        else:
            assert after[k] == before[k]
    # ... and they spread over the others, not onto one.
    heirs = collections.Counter(after[k] for k in before if before[k] == leaving)
    assert len(heirs) == len(MEMBERS) - 1


def test_ranked_starts_with_the_owner() -> None:
    ring = Ring.of(MEMBERS, MEMBERS[0])
    digest = version_digest(VERSIONS[3])
    for e in range(30):
        ranked = ring.ranked(digest, e)
        assert ranked[0] == ring.owner_of_extent(digest, e)
        assert sorted(ranked) == sorted(MEMBERS)


def test_owns_page_from_a_page_id_alone() -> None:
    rings = [Ring.of(MEMBERS[:3], me) for me in MEMBERS[:3]]
    v = VERSIONS[1]
    for index in range(0, 400, 7):
        pid = page_id(v, index)
        owning = [r.self_id for r in rings if r.owns_page(pid)]
        assert owning == [rings[0].owner(v, index)]


def test_a_cluster_of_one_owns_everything() -> None:
    ring = Ring.of([], "me:1")
    assert ring.alone and ring.members == ("me:1",)
    assert ring.owns_page(page_id(VERSIONS[0], 12345))
    assert ring.owner(VERSIONS[0], 7) == "me:1"


def test_extent_helpers() -> None:
    v = ObjectVersion("b", "k", "e", 20 * 1024 * 1024 + 1)  # 21 pages
    assert list(extents(v, 8)) == [0, 1, 2]
    assert extent_range(v, 2, 8) == range(16, 21)
    assert extent_of(15, 8) == 1 and extent_of(16, 8) == 2
    assert split_at_extents(range(5, 20), 8) == [range(5, 8), range(8, 16), range(16, 20)]
    assert split_at_extents(range(8, 16), 8) == [range(8, 16)]
    assert split_at_extents(range(3, 3), 8) == []


def test_ring_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Ring(("b", "a"), "a")  # unsorted
    with pytest.raises(ValueError):
        Ring(("a",), "z")       # self not a member
    with pytest.raises(ValueError):
        Ring.of(["a"], "a", extent_pages=0)


def test_static_membership_includes_self_and_never_changes() -> None:
    m = StaticMembership("h1:1", ["h2:1", "h1:1", "h3:1"])
    assert m.self_id == "h1:1" and m.ring().members == ("h1:1", "h2:1", "h3:1")
    m.subscribe(lambda ring: pytest.fail("a static list never changes"))


def test_mutable_membership_notifies_on_change_only() -> None:
    m = MutableMembership("h1:1", initial=["h2:1"])
    seen = []
    m.subscribe(seen.append)
    assert m.update(["h2:1"]) is False
    assert m.update(["h2:1", "h3:1"]) is True
    assert [r.members for r in seen] == [("h1:1", "h2:1", "h3:1")]
