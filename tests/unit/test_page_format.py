"""Unit tests of ``objfs.cache.format``: the on-disk page header, pinned byte for byte.

The golden test below fails on any change to the layout of format version 1. Such a change
must bump ``FORMAT_VERSION`` (old page files then fail verification and are refetched) and
then get a new golden value here.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
import xxhash

from objfs.cache.format import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    CorruptPage,
    PageHeader,
    decode_header,
    encode_header,
    verify_chunks,
)

BUCKET = "bkt"
KEY = "data/train/shard-0001.bin"
ETAG = '"0123456789abcdef0123456789abcdef"'
INDEX = 5
# 300,000 bytes: nine whole 32 KiB chunks and a short tenth one (like an object's last page).
DATA = bytes((i * 7 + 3) % 251 for i in range(300_000))

# The first 182 bytes of the golden header (fixed fields, 10 chunk checksums, names); the rest
# of the 4096 bytes are zero.
GOLDEN_PREFIX_HEX = (
    "4f424a46535047000002100000000005000493e000008000000a000300190022"
    "81a866816780c87510bbb52d608a931083cb77cc7bf132bac70cfe22ce46c417"
    "bc3272823cdf6376ff2d03f637f4ba0241fcd81b161565156ef448cd8fe45a1c"
    "a61d43ea99849e803cba0c1e73228495d459fcb1e7e16db9626b74646174612f"
    "747261696e2f73686172642d303030312e62696e223031323334353637383961"
    "62636465663031323334353637383961626364656622"
)
GOLDEN_SHA256 = "66e326c2a72ad2f92797be680ecc6f23a42831e627c306065d833a79d626990e"


def golden_header() -> bytes:
    return encode_header(BUCKET, KEY, ETAG, INDEX, DATA)


def test_constants() -> None:
    assert MAGIC == b"OBJFSPG\0"
    assert FORMAT_VERSION == 2
    assert HEADER_SIZE == 4096
    assert CHUNK_SIZE == 32 * 1024


def test_golden_header_bytes() -> None:
    header = golden_header()
    assert len(header) == HEADER_SIZE
    prefix = bytes.fromhex(GOLDEN_PREFIX_HEX)
    assert header[:len(prefix)].hex() == GOLDEN_PREFIX_HEX
    assert header[len(prefix):] == bytes(HEADER_SIZE - len(prefix))
    assert hashlib.sha256(header).hexdigest() == GOLDEN_SHA256


def test_golden_header_fields() -> None:
    """The documented layout, field by field, read with plain struct calls."""
    h = golden_header()
    assert h[0:8] == b"OBJFSPG\0"
    assert struct.unpack_from(">H", h, 8)[0] == 2            # format version
    assert struct.unpack_from(">H", h, 10)[0] == 4096        # header size = data offset
    assert struct.unpack_from(">I", h, 12)[0] == INDEX
    assert struct.unpack_from(">I", h, 16)[0] == len(DATA)
    assert struct.unpack_from(">I", h, 20)[0] == CHUNK_SIZE
    assert struct.unpack_from(">H", h, 24)[0] == 10          # chunk count
    assert struct.unpack_from(">HHH", h, 26) == (len(BUCKET), len(KEY), len(ETAG))
    zeroed = bytearray(h)
    zeroed[32:40] = bytes(8)
    assert struct.unpack_from(">Q", h, 32)[0] == xxhash.xxh3_64_intdigest(bytes(zeroed))
    expected_sums = [xxhash.xxh3_64_intdigest(DATA[o:o + CHUNK_SIZE])
                     for o in range(0, len(DATA), CHUNK_SIZE)]
    assert list(struct.unpack_from(">10Q", h, 40)) == expected_sums
    names = 40 + 10 * 8
    assert h[names:names + len(BUCKET) + len(KEY) + len(ETAG)] == \
        (BUCKET + KEY + ETAG).encode()


def test_round_trip() -> None:
    header = decode_header(golden_header())
    assert header == PageHeader(BUCKET, KEY, ETAG, INDEX, len(DATA), header.chunk_checksums)
    assert len(header.chunk_checksums) == 10
    verify_chunks(header, 0, DATA)
    verify_chunks(header, 1, DATA[CHUNK_SIZE:])
    verify_chunks(header, 9, DATA[9 * CHUNK_SIZE:])
    verify_chunks(header, 1, DATA[CHUNK_SIZE:2 * CHUNK_SIZE])


@pytest.mark.parametrize("length", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1,
                                    1024 * 1024])
def test_round_trip_lengths(length: int) -> None:
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    header = decode_header(encode_header("b", "k/é", "etag-1", 0, data))
    assert (header.bucket, header.key, header.etag, header.index, header.length) == \
        ("b", "k/é", "etag-1", 0, length)
    assert len(header.chunk_checksums) == (length + CHUNK_SIZE - 1) // CHUNK_SIZE
    verify_chunks(header, 0, data)


def test_header_accepts_trailing_data() -> None:
    """The page cache may hand decode_header more than the header (header + data)."""
    assert decode_header(golden_header() + DATA).key == KEY


def test_chunk_range() -> None:
    header = decode_header(golden_header())
    assert header.chunk_range(0, 1) == (0, 1)
    assert header.chunk_range(0, CHUNK_SIZE) == (0, 1)
    assert header.chunk_range(CHUNK_SIZE - 1, CHUNK_SIZE + 1) == (0, 2)
    assert header.chunk_range(CHUNK_SIZE, len(DATA)) == (1, 10)


def test_every_header_byte_flip_is_detected() -> None:
    header = golden_header()
    for pos in range(HEADER_SIZE):
        for mask in (0x01, 0x80):
            bad = bytearray(header)
            bad[pos] ^= mask
            with pytest.raises(CorruptPage):
                decode_header(bytes(bad))


def _data_positions() -> list[int]:
    edges = [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE - 1,
             2 * CHUNK_SIZE, len(DATA) - 1]
    return sorted(set(edges + list(range(0, len(DATA), 4999))))


def test_every_sampled_data_byte_flip_is_detected() -> None:
    header = decode_header(golden_header())
    for pos in _data_positions():
        bad = bytearray(DATA)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptPage):
            verify_chunks(header, 0, bytes(bad))
        # Verifying only the chunk that holds the flipped byte finds it too.
        chunk = pos // CHUNK_SIZE
        start = chunk * CHUNK_SIZE
        with pytest.raises(CorruptPage, match=f"chunk {chunk}"):
            verify_chunks(header, chunk, bytes(bad[start:start + CHUNK_SIZE]))


def test_data_of_another_page_is_detected() -> None:
    header = decode_header(golden_header())
    other = bytes(b ^ 1 for b in DATA)
    with pytest.raises(CorruptPage):
        verify_chunks(header, 0, other)
    # A chunk in the wrong place is wrong too.
    with pytest.raises(CorruptPage):
        verify_chunks(header, 1, DATA[:CHUNK_SIZE])


def test_more_chunks_than_the_header_lists() -> None:
    header = decode_header(golden_header())
    with pytest.raises(CorruptPage):
        verify_chunks(header, 0, DATA + bytes(CHUNK_SIZE))
    with pytest.raises(CorruptPage):
        verify_chunks(header, 3, b"x")


@pytest.mark.parametrize("length", [0, 1, 40, HEADER_SIZE - 1])
def test_short_header(length: int) -> None:
    with pytest.raises(CorruptPage, match="short header"):
        decode_header(golden_header()[:length])


def _resealed(header: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``header`` with one field changed and its header checksum recomputed, so only the field
    itself can make it fail."""
    bad = bytearray(header)
    struct.pack_into(fmt, bad, offset, value)
    struct.pack_into(">Q", bad, 32, 0)
    struct.pack_into(">Q", bad, 32, xxhash.xxh3_64_intdigest(bytes(bad)))
    return bytes(bad)


def test_resealed_helper_is_faithful() -> None:
    assert _resealed(golden_header(), 12, ">I", INDEX) == golden_header()


def test_wrong_magic() -> None:
    bad = bytearray(golden_header())
    bad[0:8] = b"OBJFSPG1"
    with pytest.raises(CorruptPage, match="magic"):
        decode_header(bytes(bad))
    with pytest.raises(CorruptPage, match="magic"):
        decode_header(bytes(HEADER_SIZE))


@pytest.mark.parametrize("version", [0, 1, 3, 0xFFFF])
def test_wrong_version(version: int) -> None:
    with pytest.raises(CorruptPage, match="unsupported page format"):
        decode_header(_resealed(golden_header(), 8, ">H", version))


def test_wrong_header_or_chunk_size() -> None:
    with pytest.raises(CorruptPage, match="unsupported page format"):
        decode_header(_resealed(golden_header(), 10, ">H", 8192))
    with pytest.raises(CorruptPage, match="unsupported page format"):
        decode_header(_resealed(golden_header(), 20, ">I", 65536))


def test_chunk_count_must_match_length() -> None:
    with pytest.raises(CorruptPage, match="chunk count"):
        decode_header(_resealed(golden_header(), 24, ">H", 2))


def test_header_too_large_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_header("b", "k" * 5000, "e", 0, bytes(CHUNK_SIZE))


def test_longest_s3_names_fit() -> None:
    """S3 keys are at most 1024 bytes and buckets 63: a full page header still fits."""
    data = bytes(1024 * 1024)
    header = decode_header(encode_header("b" * 63, "k" * 1024, '"' + "e" * 40 + '-10000"', 7,
                                         data))
    assert header.key == "k" * 1024
