"""Unit tests of ``objfs.cache.readahead.ReadStream``: when a reader counts as sequential and
how far ahead the page cache should fetch for it."""

from __future__ import annotations

import pytest

from objfs.cache.pages import PAGE_SIZE
from objfs.cache.readahead import ReadStream

P = PAGE_SIZE
K128 = 128 * 1024


def sequential_reads(start: int, count: int, size: int = K128) -> list[tuple[int, int]]:
    return [(start + n * size, size) for n in range(count)]


def test_invalid_windows() -> None:
    with pytest.raises(ValueError):
        ReadStream(0)
    with pytest.raises(ValueError):
        ReadStream(4, initial_window_pages=0)
    assert ReadStream(4, initial_window_pages=10).window_pages == 4  # capped at max


def test_window_doubles_once_per_page_for_128k_reads() -> None:
    s = ReadStream(max_window_pages=32)
    assert s.window_pages == 1
    windows_by_page: dict[int, set[int]] = {}
    for offset, size in sequential_reads(0, 8 * 8):  # 8 pages of 128 KiB reads
        w = s.observe(offset, size)
        windows_by_page.setdefault(offset // P, set()).add(w)
    # One window per page (it grows on entering a page, not on every 128 KiB request) ...
    assert all(len(ws) == 1 for ws in windows_by_page.values())
    # ... doubling from the first page on, capped at the maximum.
    assert [windows_by_page[p].pop() for p in range(8)] == [2, 4, 8, 16, 32, 32, 32, 32]


def test_window_capped_at_max() -> None:
    s = ReadStream(max_window_pages=4)
    windows = [s.observe(o, n) for o, n in sequential_reads(0, 10 * 8)]
    assert max(windows) == 4
    assert windows[-1] == 4


def test_whole_page_reads_grow_the_window_too() -> None:
    s = ReadStream(max_window_pages=64)
    assert [s.observe(p * P, P) for p in range(7)] == [2, 4, 8, 16, 32, 64, 64]


def test_initial_window() -> None:
    s = ReadStream(max_window_pages=64, initial_window_pages=4)
    assert s.window_pages == 4
    assert s.observe(0, K128) == 8


def test_random_jump_resets() -> None:
    s = ReadStream(max_window_pages=32)
    for offset, size in sequential_reads(0, 5 * 8):
        s.observe(offset, size)
    assert s.window_pages == 32
    s.ahead_until = 37  # the page cache records how far it already fetched ahead
    assert s.observe(500 * P, K128) == 1
    assert s.ahead_until == 0
    # Further 128 KiB reads in the same page do not grow the window ...
    assert s.observe(500 * P + K128, K128) == 1
    # ... and the new sequential run grows from 1 again.
    assert s.observe(501 * P, K128) == 2
    assert s.observe(502 * P, K128) == 4


def test_backward_jump_resets() -> None:
    s = ReadStream(max_window_pages=32)
    for offset, size in sequential_reads(40 * P, 3 * 8):
        s.observe(offset, size)
    assert s.window_pages == 4  # the first read at 40 MiB was itself a jump: 1, 2, 4
    assert s.observe(10 * P, K128) == 1


def test_random_reader_never_grows() -> None:
    s = ReadStream(max_window_pages=32)
    offsets = [900 * P, 17 * P, 400 * P, 3000 * P, 250 * P, 1200 * P, 60 * P]
    assert [s.observe(o, K128) for o in offsets] == [1] * len(offsets)


def test_out_of_order_within_two_pages_is_tolerated() -> None:
    """The kernel delivers its readahead on several worker threads, slightly out of order."""
    s = ReadStream(max_window_pages=64)
    order = [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10]  # 128 KiB requests, pairs swapped
    windows = [s.observe(n * K128, K128) for n in order]
    assert 1 not in windows  # never reset
    assert windows == sorted(windows)

    s = ReadStream(max_window_pages=64)
    order = [0, 1, 3, 2, 5, 4, 7, 6]  # whole pages, pairs swapped
    windows = [s.observe(n * P, P) for n in order]
    assert 1 not in windows
    assert windows == sorted(windows)
    assert windows[-1] >= 32  # grew on (nearly) every new page


def test_skip_of_exactly_two_pages_is_sequential_but_more_is_not() -> None:
    s = ReadStream(max_window_pages=64)
    s.observe(0, K128)  # next_offset = 128 KiB
    assert s.observe(K128 + 2 * P, K128) == 4  # 2 pages past the expected offset: tolerated
    s = ReadStream(max_window_pages=64)
    s.observe(0, K128)
    assert s.observe(K128 + 2 * P + 1, K128) == 1  # one byte more: a jump


def test_reread_of_same_offset_is_sequential() -> None:
    s = ReadStream(max_window_pages=64)
    s.observe(0, K128)
    assert s.observe(0, K128) == 2
    assert s.window_pages == 2


def test_reordering_across_a_page_boundary_grows_once_per_page() -> None:
    """The window grows "once per page, not once per 128 KiB request" (readahead.py), also
    when the kernel's requests around a page boundary arrive out of order: 128 KiB requests
    7 and 8 straddle the boundary of pages 0 and 1, delivered as 6, 8, 7, 9, 10, 11 only pages
    0 and 1 were entered, so the window must have doubled twice (1 -> 2 -> 4)."""
    s = ReadStream(max_window_pages=64)
    windows = [s.observe(n * K128, K128) for n in [0, 1, 2, 3, 4, 5, 6, 8, 7, 9, 10, 11]]
    assert windows[-1] == 4, f"window grew on every boundary flip-flop: {windows}"
