"""ListObjectsV2 pages: the regular-expression reader and ElementTree give the same objects,
and anything the fast reader does not fully understand goes to ElementTree."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from objfs import store
from objfs.store import ObjectInfo, _parse_listing, _parse_listing_regex

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def page(contents: list[str], encoding: str | None = "url", token: str | None = None) -> bytes:
    enc = f"<EncodingType>{encoding}</EncodingType>" if encoding else ""
    tail = (f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}"
            "</NextContinuationToken>" if token else "<IsTruncated>false</IsTruncated>")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult {NS}><Name>b</Name>'
            f"<Prefix></Prefix><KeyCount>{len(contents)}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"{enc}{tail}{''.join(contents)}</ListBucketResult>").encode()


def entry(key: str, etag: str = "&quot;abc&quot;", size: int = 3,
          modified: str = "2026-11-23T13:19:07.000Z", extra: str = "",
          order: tuple[str, ...] = ("Key", "LastModified", "ETag", "Size")) -> str:
    fields = {"Key": quote(key, safe="/"), "LastModified": modified, "ETag": etag,
              "Size": str(size)}
    return ("<Contents>\n  " + "\n  ".join(f"<{f}>{fields[f]}</{f}>" for f in order)
            + extra + "<StorageClass>STANDARD</StorageClass></Contents>")


def slow(body: bytes) -> tuple[list[ObjectInfo], str | None]:
    original = store._parse_listing_regex
    store._parse_listing_regex = lambda b: None
    try:
        return _parse_listing(body)
    finally:
        store._parse_listing_regex = original


KEYS = ["plain", "a b", "a+b", "p%20q", "t&u<v>", "é/x", "ctl\x01char", "dir/", "x" * 300]


@pytest.mark.parametrize("token", [None, "tok/en=="])
def test_both_readers_agree(token: str | None) -> None:
    body = page([entry(k, size=i) for i, k in enumerate(KEYS)] +
                [entry("sum", extra="", order=("Key", "LastModified", "ETag", "Size"))],
                token=token)
    fast = _parse_listing_regex(body)
    assert fast is not None
    assert fast == slow(body)
    assert [o.key for o in fast[0]][:len(KEYS)] == KEYS
    assert fast[1] == token


def test_checksum_elements_are_understood() -> None:
    body = page([entry("k", extra="").replace(
        "<Size>", "<ChecksumAlgorithm>CRC32</ChecksumAlgorithm><ChecksumType>FULL_OBJECT"
        "</ChecksumType><Size>")])
    fast = _parse_listing_regex(body)
    assert fast is not None and fast == slow(body)


def test_any_field_order_and_numeric_quote_entities() -> None:
    """SeaweedFS writes Key, ETag, Size, StorageClass, LastModified, and &#34; for quotes."""
    body = page([entry(k, etag="&#34;abc&#34;", order=("Key", "ETag", "Size", "LastModified"))
                 for k in KEYS])
    fast = _parse_listing_regex(body)
    assert fast is not None and fast == slow(body)
    assert fast[0][0].etag == '"abc"'


@pytest.mark.parametrize("body", [
    page([entry("k")], encoding=None),                                   # not URL-encoded
    page([entry("k", etag="&amp;x")]),                                   # another entity
    page([entry("k"), "<Contents><Key>odd</Key><Size>1</Size></Contents>"]),  # incomplete
])
def test_anything_unusual_goes_to_elementtree(body: bytes) -> None:
    assert _parse_listing_regex(body) is None
    objects, _ = _parse_listing(body)
    assert [o.key for o in objects][0] == "k"


def test_an_empty_page() -> None:
    assert _parse_listing(page([])) == ([], None)
