"""The on-disk format of one cached page: a 4 KiB versioned header, then the page's bytes.

A page file must prove, on every read, that it holds the bytes it claims: the header names the
object version (bucket, key, ETag) and the page index, and carries an xxh3-64 checksum of each
32 KiB chunk of the data plus one of the header itself. A hit verifies the header and only the
chunks it returns, so a 128 KiB kernel read costs four 32 KiB checksums (~8 µs at xxh3's
~17 GB/s here) rather than the whole page, and a 4 KiB random read one (format 1 had 128 KiB
chunks: a 4 KiB hit read and hashed 128 KiB, a third of its cost). Anything that does not verify is ``CorruptPage``:
the cache treats it as a miss and refetches; the origin holds the truth.

Layout, format version 2 (big-endian; pinned by a golden-bytes test, so a change here must bump
``FORMAT_VERSION``)::

    0   8s  magic b"OBJFSPG\\0"
    8   H   format version (2)
    10  H   header size = data offset (4096)
    12  I   page index
    16  I   data length (bytes of this page; the last page of an object is short)
    20  I   chunk size (32768)
    24  H   chunk count
    26  H   bucket length      28  H  key length      30  H  etag length
    32  Q   xxh3-64 of the 4096 header bytes with this field zeroed
    40  Q*  xxh3-64 of each chunk, chunk count of them
    ..      bucket, key, etag (UTF-8), zero padding to 4096

The data starts at 4096 so it stays page-aligned in the host's page cache.
"""

from __future__ import annotations

import dataclasses
import struct

import xxhash

MAGIC = b"OBJFSPG\0"
FORMAT_VERSION = 2  # 2: 32 KiB chunks (1: 128 KiB)
HEADER_SIZE = 4096
CHUNK_SIZE = 32 * 1024

_FIXED = struct.Struct(">8sHHIIIHHHHQ")
_CHECKSUM_OFFSET = 32
_CHECKSUM = struct.Struct(">Q")


class CorruptPage(Exception):
    """A page file that does not verify (torn write, bit rot, another version's bytes)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PageHeader:
    bucket: str
    key: str
    etag: str
    index: int
    length: int
    chunk_checksums: tuple[int, ...]

    def chunk_range(self, start: int, end: int) -> tuple[int, int]:
        """First chunk and one-past-last chunk holding data bytes [start, end)."""
        return start // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1


def _chunk_checksums(data: bytes | bytearray | memoryview) -> list[int]:
    view = memoryview(data)
    return [xxhash.xxh3_64_intdigest(view[off:off + CHUNK_SIZE])
            for off in range(0, len(view), CHUNK_SIZE)]


def encode_header(bucket: str, key: str, etag: str, index: int,
                  data: bytes | bytearray | memoryview) -> bytes:
    """The 4096-byte header for ``data``, page ``index`` of version (bucket, key, etag)."""
    names = [s.encode() for s in (bucket, key, etag)]
    checksums = _chunk_checksums(data)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, index, len(data), CHUNK_SIZE,
                        len(checksums), *(len(n) for n in names), 0)
    body = fixed + b"".join(_CHECKSUM.pack(c) for c in checksums) + b"".join(names)
    if len(body) > HEADER_SIZE:
        raise ValueError(f"page header of {len(body)} bytes exceeds {HEADER_SIZE}")
    header = bytearray(body.ljust(HEADER_SIZE, b"\0"))
    _CHECKSUM.pack_into(header, _CHECKSUM_OFFSET, xxhash.xxh3_64_intdigest(header))
    return bytes(header)


def decode_header(raw: bytes) -> PageHeader:
    """Parse and verify a header. Raises ``CorruptPage``."""
    if len(raw) < HEADER_SIZE:
        raise CorruptPage(f"short header ({len(raw)} bytes)")
    (magic, version, header_size, index, length, chunk_size, chunks, bucket_len, key_len,
     etag_len, checksum) = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptPage("bad magic")
    if version != FORMAT_VERSION or header_size != HEADER_SIZE or chunk_size != CHUNK_SIZE:
        raise CorruptPage(f"unsupported page format {version} ({header_size}/{chunk_size})")
    zeroed = bytearray(raw[:HEADER_SIZE])
    _CHECKSUM.pack_into(zeroed, _CHECKSUM_OFFSET, 0)
    if xxhash.xxh3_64_intdigest(zeroed) != checksum:
        raise CorruptPage("header checksum mismatch")
    if chunks != (length + CHUNK_SIZE - 1) // CHUNK_SIZE:
        raise CorruptPage("chunk count does not match data length")
    offset = _FIXED.size
    sums = struct.unpack_from(f">{chunks}Q", raw, offset)
    offset += 8 * chunks
    names = []
    for n in (bucket_len, key_len, etag_len):
        names.append(raw[offset:offset + n].decode(errors="replace"))
        offset += n
    return PageHeader(names[0], names[1], names[2], index, length, sums)


def verify_chunks(header: PageHeader, first_chunk: int, data: bytes) -> None:
    """Check ``data`` (whole chunks from ``first_chunk`` on; the last may be short)."""
    view = memoryview(data)
    for n, off in enumerate(range(0, len(view), CHUNK_SIZE)):
        chunk = first_chunk + n
        if chunk >= len(header.chunk_checksums) or \
                xxhash.xxh3_64_intdigest(view[off:off + CHUNK_SIZE]) != \
                header.chunk_checksums[chunk]:
            raise CorruptPage(f"checksum mismatch in chunk {chunk}")
