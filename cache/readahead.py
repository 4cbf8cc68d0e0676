"""Per-open-handle access pattern: is the reader sequential, and how far ahead to fetch.

The kernel splits a sequential ``read()`` into 128 KiB FUSE requests and may deliver its own
readahead slightly out of order on several worker threads, so "sequential" means "within two
pages of where the last read ended". While a reader stays sequential its window doubles up to
the maximum; one random read resets it to a single page, so random readers never trigger
large fetches.
"""

from __future__ import annotations

from objfs.cache.pages import PAGE_SIZE

_SLACK = 2 * PAGE_SIZE


class ReadStream:
    """Owned by one file handle. Concurrent readers of one handle race on these fields; that
    only makes the window guess worse, never the bytes wrong."""

    def __init__(self, max_window_pages: int, initial_window_pages: int = 1) -> None:
        if max_window_pages < 1 or initial_window_pages < 1:
            raise ValueError("readahead windows must be >= 1 page")
        self._max = max_window_pages
        self._initial = min(initial_window_pages, max_window_pages)
        self.next_offset = 0
        self.window_pages = self._initial
        self.ahead_until = 0  # page index up to which readahead was already issued
        self.warm_until = 0   # page index up to which READY pages were warmed (page files)
        self.jumps = 0        # reads that did not follow the one before (a random reader)
        self._last_page = -1  # the furthest page entered while sequential

    def observe(self, offset: int, size: int) -> int:
        """Record a read; return how many pages, from the read's first page on, to have."""
        page = offset // PAGE_SIZE
        if offset >= 0 and abs(offset - self.next_offset) <= _SLACK:
            if page > self._last_page:  # grow once per new page, not per 128 KiB request
                self.window_pages = min(self._max, self.window_pages * 2)
                self._last_page = page
        else:
            self.window_pages = 1
            self.ahead_until = 0
            self.warm_until = 0
            self.jumps += 1
            self._last_page = page
        self.next_offset = offset + size
        return self.window_pages
