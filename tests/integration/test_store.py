"""The object-store client against a real S3 server, through the counting/faulting proxy."""

from __future__ import annotations

import errno
import random
import time

import pytest

from objfs.errors import ObjfsError, OriginError, StaleObject
from tests.integration.support import make_store

MiB = 1024 * 1024


@pytest.fixture
def data(s3, bucket):
    blob = random.Random(7).randbytes(3 * MiB + 123)
    s3.put_object(Bucket=bucket, Key="dir/blob.bin", Body=blob)
    return blob


def etag_of(s3, bucket, key):
    return s3.head_object(Bucket=bucket, Key=key)["ETag"]


def test_ranged_get_is_pinned_to_the_etag(s3, bucket, data, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    etag = etag_of(s3, bucket, "dir/blob.bin")
    assert store.read_range("dir/blob.bin", etag, 1000, 2 * MiB) == data[1000:2 * MiB]
    (_, _, headers), = [entry for entry in proxy.log if entry[0] == "get"]
    assert headers["If-Match"] == etag and headers["Range"] == f"bytes=1000-{2 * MiB - 1}"
    assert "AWS4-HMAC-SHA256" in headers["Authorization"]
    s3.put_object(Bucket=bucket, Key="dir/blob.bin", Body=b"replaced")
    with pytest.raises(StaleObject) as info:
        store.read_range("dir/blob.bin", etag, 0, 100)
    assert info.value.errno == errno.ESTALE


def test_5xx_and_slowdown_are_retried(s3, bucket, data, proxy, loop):
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    etag = etag_of(s3, bucket, "dir/blob.bin")
    proxy.fail_next("get", 3, status=503, code="SlowDown")
    assert store.read_range("dir/blob.bin", etag, 0, MiB) == data[:MiB]
    assert proxy.requests["get"] == 4
    assert metrics.get("origin_get_retries_total") == 3


def test_retries_stop_at_the_attempt_limit(s3, bucket, data, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop, max_attempts=4)
    etag = etag_of(s3, bucket, "dir/blob.bin")
    proxy.fail_next("get", 100, status=500, code="InternalError")
    with pytest.raises(OriginError) as info:
        store.read_range("dir/blob.bin", etag, 0, 10)
    assert info.value.errno == errno.EIO
    assert proxy.requests["get"] == 4


def test_access_denied_is_not_retried(s3, bucket, data, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    etag = etag_of(s3, bucket, "dir/blob.bin")
    proxy.fail_next("get", 1, status=403, code="AccessDenied")
    with pytest.raises(ObjfsError) as info:
        store.read_range("dir/blob.bin", etag, 0, 10)
    assert info.value.errno == errno.EACCES
    assert proxy.requests["get"] == 1


def test_a_body_broken_mid_stream_resumes_where_it_stopped(s3, bucket, data, proxy, loop):
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    etag = etag_of(s3, bucket, "dir/blob.bin")
    proxy.cut_next("get", 1, after_bytes=300_000)
    assert store.read_range("dir/blob.bin", etag, 0, 2 * MiB) == data[:2 * MiB]
    ranges = [headers["Range"] for kind, _, headers in proxy.log if kind == "get"]
    assert ranges[0] == f"bytes=0-{2 * MiB - 1}"
    assert ranges[1] == f"bytes=300000-{2 * MiB - 1}"   # only the missing tail again
    assert proxy.body_bytes["get"] == 2 * MiB
    assert metrics.get("origin_get_retries_total") == 1


def test_listing_streams_pages_and_retries_a_failed_page(s3, bucket, proxy, loop):
    from tests.conftest import put_many
    put_many(s3, bucket, {f"k/{i:05d}": b"" for i in range(2100)}, workers=32)
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    proxy.fail_next("list", 2, status=503, code="SlowDown")
    pages = store.list_pages("k/")
    first = next(pages)
    time.sleep(0.5)
    # Streamed: the page in hand plus at most one prefetched, never the third.
    assert len(first) == 1000 and proxy.requests["list"] <= 2 + 2
    rest = [info for page in pages for info in page]
    keys = [info.key for info in first + rest]
    assert keys == [f"k/{i:05d}" for i in range(2100)]
    assert proxy.requests["list"] == 3 + 2
    assert metrics.get("origin_list_retries_total") == 2


def test_check_access_reports_a_missing_bucket(s3_endpoint, loop):
    store, _ = make_store(s3_endpoint, "bucket-that-is-not-there", loop)
    with pytest.raises(OriginError) as info:
        store.check_access()
    assert "does not exist" in str(info.value)
