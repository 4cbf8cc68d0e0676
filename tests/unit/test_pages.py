"""Unit tests of ``objfs.cache.pages``: mapping reads to pages and pages to ranged GETs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objfs.cache.pages import (
    PAGE_SIZE,
    ObjectVersion,
    PageKey,
    byte_range,
    coalesce,
    page_span,
)

P = PAGE_SIZE


def version(size: int, etag: str = '"e1"') -> ObjectVersion:
    return ObjectVersion("bkt", "data/x", etag, size)


def test_page_size_is_one_mib() -> None:
    assert P == 1024 * 1024


@pytest.mark.parametrize(("offset", "size", "object_size", "expected"), [
    (0, 1, 10 * P, range(0, 1)),
    (0, P, 10 * P, range(0, 1)),           # exactly one page
    (0, P + 1, 10 * P, range(0, 2)),
    (P - 1, 1, 10 * P, range(0, 1)),       # last byte of page 0
    (P - 1, 2, 10 * P, range(0, 2)),       # straddles the boundary
    (P, 1, 10 * P, range(1, 2)),           # offset at a page boundary
    (P, P, 10 * P, range(1, 2)),
    (3 * P, 2 * P, 10 * P, range(3, 5)),
    (0, 0, 10 * P, range(0)),              # size 0
    (5 * P, 0, 10 * P, range(0)),
    (10 * P, 1, 10 * P, range(0)),         # at EOF
    (11 * P, P, 10 * P, range(0)),         # beyond EOF
    (9 * P, 5 * P, 10 * P, range(9, 10)),  # clipped at EOF
    (0, 100, 0, range(0)),                 # empty object
    (0, 10 * P, P + 5, range(0, 2)),       # last partial page
    (P + 4, 100, P + 5, range(1, 2)),      # inside the last partial page
    (P + 5, 100, P + 5, range(0)),
    (0, -1, 10 * P, range(0)),
])
def test_page_span(offset: int, size: int, object_size: int, expected: range) -> None:
    assert page_span(offset, size, object_size) == expected


@pytest.mark.parametrize(("indexes", "max_pages", "expected"), [
    ([], 4, []),
    ([3], 4, [range(3, 4)]),
    ([0, 1, 2], 4, [range(0, 3)]),
    ([0, 1, 3, 4, 7], 8, [range(0, 2), range(3, 5), range(7, 8)]),  # gaps split runs
    ([0, 1, 2, 3, 4, 5, 6], 3, [range(0, 3), range(3, 6), range(6, 7)]),  # max_pages split
    ([0, 1, 2, 3], 4, [range(0, 4)]),
    ([0, 1, 2, 3, 4], 4, [range(0, 4), range(4, 5)]),
    ([5, 6, 8, 9, 10, 11], 2, [range(5, 7), range(8, 10), range(10, 12)]),
    ([1, 2, 3], 1, [range(1, 2), range(2, 3), range(3, 4)]),
])
def test_coalesce(indexes: list[int], max_pages: int, expected: list[range]) -> None:
    assert list(coalesce(indexes, max_pages)) == expected


@pytest.mark.parametrize("max_pages", [0, -1])
def test_coalesce_rejects_bad_max_pages(max_pages: int) -> None:
    with pytest.raises(ValueError):
        list(coalesce([1, 2], max_pages))


@given(indexes=st.sets(st.integers(0, 300), max_size=80), max_pages=st.integers(1, 20))
@settings(deadline=None)
def test_coalesce_property(indexes: set[int], max_pages: int) -> None:
    runs = list(coalesce(sorted(indexes), max_pages))
    assert [i for run in runs for i in run] == sorted(indexes)  # every page once, in order
    assert all(1 <= len(run) <= max_pages and run.step == 1 for run in runs)
    for a, b in zip(runs, runs[1:]):
        # A new run starts only at a gap or when the previous run is full.
        assert b.start > a.stop or len(a) == max_pages


def test_byte_range() -> None:
    v = version(3 * P + 10)
    assert byte_range(v, range(0, 1)) == (0, P)
    assert byte_range(v, range(1, 3)) == (P, 3 * P)
    assert byte_range(v, range(3, 4)) == (3 * P, 3 * P + 10)  # the last, short page
    assert byte_range(v, range(2, 4)) == (2 * P, 3 * P + 10)
    exact = version(2 * P)
    assert byte_range(exact, range(1, 2)) == (P, 2 * P)


def test_page_count_and_length() -> None:
    assert version(0).page_count() == 0
    assert version(1).page_count() == 1
    assert version(P).page_count() == 1
    assert version(P + 1).page_count() == 2
    v = version(2 * P + 7)
    assert [v.page_length(i) for i in range(v.page_count())] == [P, P, 7]
    assert version(P).page_length(0) == P


@pytest.mark.parametrize(("size", "index"), [
    (2 * P + 7, 3), (2 * P + 7, -1), (2 * P, 2), (0, 0), (P, 1), (1, 1),
])
def test_page_length_outside_object(size: int, index: int) -> None:
    with pytest.raises(ValueError):
        version(size).page_length(index)


def test_versions_with_another_etag_never_share_pages() -> None:
    a, b = version(5 * P, '"e1"'), version(5 * P, '"e2"')
    assert PageKey(a, 0) != PageKey(b, 0)
    assert PageKey(a, 0) == PageKey(version(5 * P, '"e1"'), 0)
    assert len({PageKey(a, 0), PageKey(b, 0), PageKey(a, 1)}) == 3


_SIZE = st.one_of(st.integers(0, 4 * P + 17), st.sampled_from([0, 1, P - 1, P, P + 1, 3 * P]))


@given(offset=_SIZE, size=_SIZE, object_size=_SIZE)
@settings(max_examples=500, deadline=None)
def test_span_covers_exactly_the_clipped_bytes(offset: int, size: int, object_size: int) -> None:
    span = page_span(offset, size, object_size)
    start, end = offset, min(offset + size, object_size)
    if start >= end:
        assert len(span) == 0
        return
    assert span.step == 1 and len(span) >= 1
    v = version(object_size)
    lo, hi = byte_range(v, span)
    assert lo <= start and end <= hi  # covers every requested byte
    assert hi <= object_size  # never past EOF
    # Minimal: the first and last pages each hold a requested byte.
    assert start < (span.start + 1) * P and (span.stop - 1) * P < end
    for index in span:
        assert 0 < v.page_length(index) <= P  # every page exists in the object
