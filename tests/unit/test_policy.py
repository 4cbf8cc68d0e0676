"""Unit tests of ``objfs.cache.policy``: LRU and uniform eviction, alone and on access traces.

The trace test is the reason ``uniform`` exists: on shuffled multi-epoch training over a dataset
larger than the cache, LRU evicts each page shortly before the next epoch asks for it, while a
fixed resident subset gives a hit ratio of about cache/dataset.
"""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objfs.cache.policy import (
    POLICIES,
    EvictionPolicy,
    LruPolicy,
    UniformPolicy,
    make_policy,
)


def test_make_policy() -> None:
    assert isinstance(make_policy("lru", 10), LruPolicy)
    assert isinstance(make_policy("uniform", 10), UniformPolicy)
    assert set(POLICIES) == {"lru", "uniform"}
    assert make_policy("lru", 10).name == "lru"
    assert make_policy("uniform", 10).name == "uniform"
    with pytest.raises(ValueError, match="unknown cache policy 'lfu'"):
        make_policy("lfu", 10)


@pytest.mark.parametrize("name", ["lru", "uniform"])
def test_negative_capacity_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        make_policy(name, -1)


@pytest.mark.parametrize("name", ["lru", "uniform"])
def test_zero_capacity_admits_nothing(name: str) -> None:
    p = make_policy(name, 0)
    assert p.admit("a", 1) is None
    assert p.admit("empty", 0) == []  # a zero-byte page fits anywhere
    assert p.used_bytes == 0


# ---- LRU -------------------------------------------------------------------------------------

def test_lru_evicts_least_recently_used() -> None:
    p = LruPolicy(3)
    assert p.admit("a", 1) == []
    assert p.admit("b", 1) == []
    assert p.admit("c", 1) == []
    assert p.admit("d", 1) == ["a"]
    assert p.pages() == ["b", "c", "d"]
    assert "a" not in p and "d" in p
    assert len(p) == 3 and p.used_bytes == 3


def test_lru_touch_reorders() -> None:
    p = LruPolicy(3)
    for page in "abc":
        p.admit(page, 1)
    p.touch("a")
    assert p.pages() == ["b", "c", "a"]
    assert p.admit("d", 1) == ["b"]
    p.touch("c")
    assert p.admit("e", 1) == ["a"]
    assert p.pages() == ["d", "c", "e"]
    p.touch("zz")  # not resident: ignored
    assert p.pages() == ["d", "c", "e"]


def test_lru_evicts_as_many_as_needed() -> None:
    p = LruPolicy(10)
    for page in "abcde":
        p.admit(page, 2)
    assert p.admit("big", 7) == ["a", "b", "c", "d"]
    assert p.pages() == ["e", "big"]
    assert p.used_bytes == 9


def test_lru_refuses_a_page_larger_than_capacity() -> None:
    p = LruPolicy(4)
    p.admit("a", 2)
    assert p.admit("huge", 5) is None
    assert p.pages() == ["a"] and p.used_bytes == 2  # nothing evicted for a refused page
    assert p.admit("exact", 4) == ["a"]


def test_lru_readmit_moves_to_end_and_updates_size() -> None:
    p = LruPolicy(10)
    p.admit("a", 2)
    p.admit("b", 2)
    assert p.admit("a", 3) == []
    assert p.pages() == ["b", "a"]
    assert p.used_bytes == 5


def test_lru_resize_evicts_to_fit() -> None:
    p = LruPolicy(10)
    for page in "abcde":
        p.admit(page, 2)
    p.touch("a")
    assert p.resize(5) == ["b", "c", "d"]
    assert p.pages() == ["e", "a"]
    assert p.capacity_bytes == 5 and p.used_bytes == 4
    assert p.resize(100) == []
    assert p.resize(-3) == ["e", "a"]
    assert p.capacity_bytes == 0 and p.used_bytes == 0


def test_lru_load_order_is_recency() -> None:
    """``load`` is called least recent first: the first loaded are the first evicted."""
    p = LruPolicy(3)
    assert p.load("old", 1) == []
    assert p.load("mid", 1) == []
    assert p.load("new", 1) == []
    assert p.load("newest", 1) == ["old"]  # capacity lowered since the last run
    assert p.pages() == ["mid", "new", "newest"]
    assert p.admit("x", 1) == ["mid"]


def test_remove() -> None:
    p = LruPolicy(10)
    p.admit("a", 3)
    assert p.remove("a") is True
    assert p.remove("a") is False
    assert p.used_bytes == 0 and len(p) == 0


# ---- uniform ---------------------------------------------------------------------------------

def test_uniform_admits_until_full_then_refuses() -> None:
    p = UniformPolicy(3)
    assert p.admit("a", 1) == []
    assert p.admit("b", 1) == []
    assert p.admit("c", 1) == []
    assert p.admit("d", 1) is None
    assert p.admit("e", 1) is None
    assert p.pages() == ["a", "b", "c"]
    assert p.admit("a", 1) == []  # already resident: nothing to do
    p.touch("c")
    p.touch("a")
    assert p.pages() == ["a", "b", "c"]  # touch never reorders a uniform set


def test_uniform_fills_gaps_but_never_evicts_on_admit() -> None:
    p = UniformPolicy(5)
    p.admit("a", 2)
    p.admit("b", 2)
    assert p.admit("c", 2) is None
    assert p.admit("small", 1) == []
    p.remove("a")  # e.g. a corrupt page was forgotten
    assert p.admit("c", 2) == []
    assert p.pages() == ["b", "small", "c"]


def test_uniform_resize_evicts_to_fit() -> None:
    p = UniformPolicy(4)
    for page in "abcd":
        p.admit(page, 1)
    assert p.resize(2) == ["a", "b"]
    assert p.pages() == ["c", "d"]


# ---- invariants under random operation sequences ---------------------------------------------

PAGES = st.sampled_from("abcdefgh")
OPS = st.lists(st.one_of(
    st.tuples(st.just("admit"), PAGES, st.integers(0, 6)),
    st.tuples(st.just("touch"), PAGES, st.just(0)),
    st.tuples(st.just("remove"), PAGES, st.just(0)),
    st.tuples(st.just("resize"), st.just(""), st.integers(-1, 20)),
    st.tuples(st.just("load"), PAGES, st.integers(0, 6)),
), max_size=60)


class ReferenceLru:
    """The obvious LRU on a list: first is least recent."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.order: list[Hashable] = []
        self.sizes: dict[Hashable, int] = {}

    def _drop(self, page: Hashable) -> None:
        if page in self.sizes:
            self.order.remove(page)
            del self.sizes[page]

    def _fit(self, extra: int = 0) -> list[Hashable]:
        victims = []
        while sum(self.sizes.values()) + extra > self.capacity:
            victim = self.order[0]
            self._drop(victim)
            victims.append(victim)
        return victims

    def admit(self, page: Hashable, size: int) -> list[Hashable] | None:
        if size > self.capacity:
            return None
        self._drop(page)
        victims = self._fit(size)
        self.order.append(page)
        self.sizes[page] = size
        return victims

    def touch(self, page: Hashable) -> None:
        if page in self.sizes:
            self.order.remove(page)
            self.order.append(page)


def apply(p: EvictionPolicy, op: str, page: Hashable, n: int,
          resident: dict[Hashable, int]) -> None:
    """Run one op on ``p`` and mirror its reported effect in ``resident`` (page -> size)."""
    if op == "admit":
        before = dict(resident)
        used = p.used_bytes
        victims = p.admit(page, n)
        if victims is None:  # refused: nothing changed
            if isinstance(p, UniformPolicy):
                assert page not in resident and used + n > p.capacity_bytes
            else:
                assert n > p.capacity_bytes
            return
        assert page not in victims
        for v in victims:
            assert v in before, "a victim must have been resident"
            del resident[v]
        if isinstance(p, UniformPolicy):
            assert victims == [], "uniform never evicts on admit"
            resident.setdefault(page, n)
        else:
            resident[page] = n
    elif op == "touch":
        p.touch(page)
    elif op == "remove":
        assert p.remove(page) == (page in resident)
        resident.pop(page, None)
    elif op == "resize":
        for v in p.resize(n):
            del resident[v]
    elif op == "load":
        resident[page] = n
        for v in p.load(page, n):
            del resident[v]


def check(p: EvictionPolicy, resident: dict[Hashable, int]) -> None:
    assert p.used_bytes == sum(resident.values())
    assert p.used_bytes <= p.capacity_bytes
    assert set(p.pages()) == set(resident)
    assert len(p) == len(resident)
    assert all(page in p for page in resident)


@pytest.mark.parametrize("name", ["lru", "uniform"])
@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 16), ops=OPS)
def test_used_bytes_invariant(name: str, capacity: int, ops: list) -> None:
    p = make_policy(name, capacity)
    resident: dict[Hashable, int] = {}
    for op, page, n in ops:
        apply(p, op, page, n, resident)
        check(p, resident)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 16),
       ops=st.lists(st.tuples(st.sampled_from(["admit", "touch"]), PAGES, st.integers(0, 6)),
                    max_size=60))
def test_lru_matches_reference(capacity: int, ops: list) -> None:
    p, ref = LruPolicy(capacity), ReferenceLru(capacity)
    for op, page, n in ops:
        if op == "admit":
            assert p.admit(page, n) == ref.admit(page, n)
        else:
            p.touch(page)
            ref.touch(page)
        assert p.pages() == ref.order
        assert p.used_bytes == sum(ref.sizes.values())


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(0, 16), ops=OPS)
def test_uniform_resident_set_only_grows_between_resizes(capacity: int, ops: list) -> None:
    """Admission alone never removes a uniform page: only remove/resize/load do."""
    p = UniformPolicy(capacity)
    for op, page, n in ops:
        before = set(p.pages())
        if op == "admit":
            p.admit(page, n)
            assert before <= set(p.pages())
        elif op == "touch":
            p.touch(page)
            assert set(p.pages()) == before


# ---- the shuffled multi-epoch trace ----------------------------------------------------------

DATASET_PAGES = 1000
CACHE_PAGES = 500
EPOCHS = 3
PAGE = 1024 * 1024 + 4096  # a page file: 1 MiB plus its header


def simulate(name: str, seed: int = 20261123) -> list[float]:
    """Hit ratio of each epoch of a shuffled read of the dataset (miss -> admit, hit ->
    touch), each epoch a fresh permutation from a fixed seed."""
    rng = random.Random(seed)
    policy = make_policy(name, CACHE_PAGES * PAGE)
    ratios = []
    for _ in range(EPOCHS):
        order = list(range(DATASET_PAGES))
        rng.shuffle(order)
        hits = 0
        for page in order:
            if page in policy:
                hits += 1
                policy.touch(page)
            else:
                policy.admit(page, PAGE)
            assert policy.used_bytes <= policy.capacity_bytes
        ratios.append(hits / DATASET_PAGES)
    return ratios


def test_uniform_beats_lru_on_shuffled_epochs() -> None:
    lru = simulate("lru")
    uniform = simulate("uniform")
    print(f"\nhit ratio per epoch, {DATASET_PAGES} pages, cache {CACHE_PAGES}: "
          f"lru={lru} uniform={uniform}")
    assert lru[0] == uniform[0] == 0.0  # a cold first epoch
    expected = CACHE_PAGES / DATASET_PAGES
    for epoch in (1, 2):
        assert uniform[epoch] == pytest.approx(expected, abs=0.02)
        assert uniform[epoch] > 0.4
        assert lru[epoch] < 0.25
        assert uniform[epoch] > lru[epoch] + 0.2
    assert sum(uniform[1:]) / 2 > 2 * (sum(lru[1:]) / 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_trace_relation_holds_for_other_seeds(seed: int) -> None:
    lru, uniform = simulate("lru", seed), simulate("uniform", seed)
    assert min(uniform[1:]) > max(lru[1:]) + 0.2


# ---- replica-aware eviction --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lru", "uniform"])
def test_copies_are_evicted_before_owned_pages(name: str) -> None:
    p = make_policy(name, 6)
    for page, owned in (("o1", True), ("c1", False), ("o2", True), ("c2", False),
                        ("o3", True), ("c3", False)):
        assert p.admit(page, 1, owned=owned) == []
    assert p.copies == 3 and p.is_copy("c1") and not p.is_copy("o1")
    assert p.pages() == ["c1", "c2", "c3", "o1", "o2", "o3"]
    assert p.resize(4) == ["c1", "c2"]  # shrinking (uniform's only eviction): copies first
    assert p.resize(2) == ["c3", "o1"]
    assert p.pages() == ["o2", "o3"]


def test_lru_admission_evicts_least_recent_copy_first_then_least_recent_owned() -> None:
    p = LruPolicy(4)
    p.admit("o1", 1)
    p.admit("c1", 1, owned=False)
    p.admit("o2", 1)
    p.admit("c2", 1, owned=False)
    p.touch("c1")  # c2 is now the least recently used copy
    assert p.admit("o3", 1) == ["c2"]
    assert p.admit("c3", 1, owned=False) == ["c1"]
    assert p.admit("o4", 1) == ["c3"]
    p.touch("o1")
    assert p.admit("o5", 1) == ["o2"]  # no copies left: plain LRU among owned pages
    assert p.pages() == ["o3", "o4", "o1", "o5"]


def test_uniform_holds_its_set_whatever_the_class() -> None:
    p = UniformPolicy(2)
    p.admit("c1", 1, owned=False)
    p.admit("c2", 1, owned=False)
    assert p.admit("o1", 1) is None  # admission never evicts, even a copy
    assert p.pages() == ["c1", "c2"]


def test_reclassify_after_a_membership_change() -> None:
    p = LruPolicy(10)
    for page in ("o1", "o2", "o3"):
        p.admit(page, 1)
    for page in ("c1", "c2"):
        p.admit(page, 1, owned=False)
    moved = p.reclassify([("o2", False), ("c2", True), ("o1", True), ("gone", False)])
    assert moved == 2
    # o2 became a copy: first to go; c2 became owned: last among the owned.
    assert p.pages() == ["o2", "c1", "o1", "o3", "c2"]
    assert p.copies == 2 and p.used_bytes == 5 and len(p) == 5
    assert p.sizes() == {"o1": 1, "o2": 1, "o3": 1, "c1": 1, "c2": 1}


def test_load_restores_the_class() -> None:
    p = LruPolicy(3)
    p.load("o1", 1)
    p.load("c1", 1, owned=False)
    p.load("o2", 1)
    assert p.load("o3", 1) == ["c1"]  # over capacity after a restart: the copy goes


def test_owned_pages_survive_a_scan_of_copies() -> None:
    """The point of it: a host keeps the pages the cluster expects it to have while it
    streams through copies of everyone else's."""
    p = LruPolicy(100)
    owned = [f"o{i}" for i in range(60)]
    for page in owned:
        p.admit(page, 1)
    for i in range(1000):
        p.admit(f"c{i}", 1, owned=False)
    assert set(owned) <= set(p.pages()) and p.copies == 40


# ---- pins (preload) ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", [LruPolicy, UniformPolicy])
def test_pinned_pages_are_never_evicted_and_admission_refuses_instead(policy) -> None:
    p = policy(4)
    for page in ("a", "b"):
        p.pin(page)          # pinned before they are resident: admitted pinned
        assert p.admit(page, 1) == []
    p.admit("x", 1)
    p.admit("y", 1, owned=False)
    assert p.pinned == 2 and p.pinned_bytes == 2 and p.evictable_bytes == 2
    assert p.resize(1) == ["y", "x"]  # resize evicts around the pins, never below them
    assert p.used_bytes == 2 and set(p.pages()) == {"a", "b"}
    p.resize(2)
    p.pin("c")
    assert p.admit("c", 1) is None     # only by evicting pinned pages: refused
    assert "c" not in p and p.used_bytes == 2


def test_a_job_never_evicts_its_own_pages_under_lru() -> None:
    """A preload of more than fits: the first pages stay, the rest is refused."""
    p = LruPolicy(10)
    for i in range(5):
        p.admit(f"old{i}", 1)
    kept = []
    for i in range(14):
        p.pin(f"job{i}")
        if p.admit(f"job{i}", 1) is not None:
            kept.append(f"job{i}")
    assert kept == [f"job{i}" for i in range(10)]   # the others' pages went first
    assert set(p.pages()) == set(kept)


def test_unpinned_pages_return_as_most_recent_and_pins_count() -> None:
    p = LruPolicy(3)
    p.admit("a", 1)
    p.admit("b", 1)
    p.pin("a")
    p.pin("a")             # two holders
    p.admit("c", 1)
    p.unpin("a")
    assert p.is_pinned("a") and p.admit("d", 1) == ["b"]
    p.unpin("a")
    assert not p.is_pinned("a")
    assert p.pages() == ["c", "d", "a"]  # back as the most recently used
    p.unpin("never-pinned")              # harmless
    assert p.used_bytes == 3 and p.pinned_bytes == 0


def test_pins_survive_removal_and_reclassify_keeps_them() -> None:
    p = LruPolicy(4)
    p.pin("a")
    p.admit("a", 1, owned=False)
    assert p.copies == 1 and p.is_copy("a")
    assert p.reclassify([("a", True)]) == 1
    assert p.copies == 0 and not p.is_copy("a") and p.pinned == 1
    assert p.remove("a") and p.pinned_bytes == 0 and p.used_bytes == 0
    p.admit("a", 1)        # refetched after a corruption: pinned again
    assert p.pinned == 1
    p.unpin("a")
    assert p.pages() == ["a"] and not p.is_copy("a")
