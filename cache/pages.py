"""Page arithmetic over object versions.

Every byte objfs reads belongs to a 1 MiB page of one *object version* ``(bucket, key, etag)``.
Keying by ETag means a changed object never shares pages with its previous version, so mixed
bytes are impossible by construction. Reads are mapped to page spans here; contiguous spans of
missing pages are coalesced into ranged GETs of whole pages.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator

PAGE_SIZE = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One immutable version of an object. ``size`` is the size of that version."""

    bucket: str
    key: str
    etag: str
    size: int

    def page_count(self) -> int:
        return (self.size + PAGE_SIZE - 1) // PAGE_SIZE

    def page_length(self, index: int) -> int:
        """Bytes in page ``index`` (the last page may be short)."""
        start = index * PAGE_SIZE
        if index < 0 or start >= self.size:
            raise ValueError(f"page {index} outside object of {self.size} bytes")
        return min(PAGE_SIZE, self.size - start)


@dataclasses.dataclass(frozen=True, slots=True)
class PageKey:
    version: ObjectVersion
    index: int


def page_span(offset: int, size: int, object_size: int) -> range:
    """Indexes of the pages that hold bytes [offset, offset+size) clipped to the object."""
    end = min(offset + size, object_size)
    if size <= 0 or offset >= end:
        return range(0)
    return range(offset // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1)


def coalesce(indexes: list[int], max_pages: int) -> Iterator[range]:
    """Group sorted page indexes into runs of consecutive pages, each at most ``max_pages``."""
    if max_pages < 1:
        raise ValueError("max_pages must be >= 1")
    run_start = prev = None
    for index in indexes:
        if run_start is None:
            run_start = prev = index
            continue
        assert prev is not None
        if index == prev + 1 and index - run_start < max_pages:
            prev = index
            continue
        yield range(run_start, prev + 1)
        run_start = prev = index
    if run_start is not None:
        assert prev is not None
        yield range(run_start, prev + 1)


def byte_range(version: ObjectVersion, pages: range) -> tuple[int, int]:
    """[start, end) bytes of a run of pages of ``version``."""
    start = pages.start * PAGE_SIZE
    end = min(pages.stop * PAGE_SIZE, version.size)
    return start, end


@functools.lru_cache(maxsize=8192)
def version_digest(version: ObjectVersion) -> bytes:
    """16 bytes naming (bucket, key, etag): the stem of every page id of this version."""
    name = f"{version.bucket}\0{version.key}\0{version.etag}".encode()
    return hashlib.blake2b(name, digest_size=16).digest()


def page_id(version: ObjectVersion, index: int) -> bytes:
    """The 20-byte id of a page: version digest + big-endian page index."""
    return version_digest(version) + index.to_bytes(4, "big")
