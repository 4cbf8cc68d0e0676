"""Store answers that broke hosts before: keys XML cannot carry, ETags in two spellings,
credentials that refresh, listings parsed on the event loop."""

from __future__ import annotations

import datetime
import threading

import pytest
from botocore.credentials import RefreshableCredentials

import objfs.store
from objfs.store import ObjectInfo, _CredentialCache, normalize_etag
from tests.integration.support import make_store

ODD_KEYS = ["ctl\x01char", "a b", "a+b", "p%20q", "t&u<v>", "é/x", "tab\tkey"]


def test_etags_are_kept_in_one_spelling() -> None:
    assert normalize_etag('"abc"') == '"abc"'
    assert normalize_etag("abc") == '"abc"'
    assert normalize_etag(' "abc" ') == '"abc"'
    assert normalize_etag("") == "" and normalize_etag(None) == ""
    # Every ObjectInfo, whatever answer it came from, carries the quoted form.
    assert ObjectInfo("k", 1, "d41d8cd98f00b204e9800998ecf8427e", 0).etag == \
        '"d41d8cd98f00b204e9800998ecf8427e"'
    assert ObjectInfo("k", 1, '"abc-2"', 0).etag == '"abc-2"'


def test_a_key_xml_cannot_carry_does_not_break_the_listing(s3, bucket, loop) -> None:
    for key in ODD_KEYS:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    store, _ = make_store(s3.meta.endpoint_url, bucket, loop)
    listed = [obj.key for page in store.list_pages("") for obj in page]
    assert sorted(listed) == sorted(ODD_KEYS)


def test_multipart_uploads_with_odd_keys_are_listed(s3, bucket, loop) -> None:
    store, _ = make_store(s3.meta.endpoint_url, bucket, loop)
    ids = {key: s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
           for key in ("a b", "a+b", "é x&y")}
    found = loop.run(store.list_multipart_uploads(""))
    assert sorted(found) == sorted(ids.items())


def test_keys_xml_cannot_carry_are_deleted_too(s3, bucket, loop) -> None:
    for key in ODD_KEYS:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    store, _ = make_store(s3.meta.endpoint_url, bucket, loop)
    loop.run(store.delete_objects(ODD_KEYS))
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_copied_objects_have_the_etag_a_listing_shows(s3, bucket, loop) -> None:
    s3.put_object(Bucket=bucket, Key="src", Body=b"payload")
    store, _ = make_store(s3.meta.endpoint_url, bucket, loop)
    copied = loop.run(store.copy_object("src", "dst", 7))
    listed = {obj.key: obj.etag for page in store.list_pages("") for obj in page}
    assert copied.etag == listed["dst"]
    head = loop.run(store.head_object("dst"))
    assert head.info.etag == listed["dst"]


def test_listing_pages_are_parsed_off_the_event_loop(s3, bucket, loop, monkeypatch) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    threads: list[threading.Thread] = []
    original = objfs.store._parse_listing

    def recording(body: bytes):
        threads.append(threading.current_thread())
        return original(body)

    monkeypatch.setattr(objfs.store, "_parse_listing", recording)
    store, _ = make_store(s3.meta.endpoint_url, bucket, loop)
    assert [o.key for page in store.list_pages("") for o in page] == ["k"]
    loop_thread = loop.run(_current_thread())
    assert threads and all(t is not loop_thread for t in threads)


async def _current_thread() -> threading.Thread:
    return threading.current_thread()


def test_credential_refresh_does_not_block_origin_requests(s3, bucket, loop) -> None:
    """botocore refreshes instance-role/SSO credentials inside get_frozen_credentials(): on
    the loop that would stop every origin request while it runs. Here the refresh blocks
    until the test lets it go, and a GET must complete meanwhile."""
    s3.put_object(Bucket=bucket, Key="k", Body=b"0123456789")
    etag = s3.head_object(Bucket=bucket, Key="k")["ETag"]
    release = threading.Event()
    blocked = threading.Event()
    block = False

    def metadata() -> dict[str, str]:
        nonlocal block
        if block:
            blocked.set()
            assert release.wait(30)
        # Inside botocore's advisory window (15 min) but not its mandatory one (10 min):
        # every signing asks for a refresh.
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=12)
        return {"access_key": "objfs-test", "secret_key": "objfs-test-secret", "token": None,
                "expiry_time": expiry.isoformat()}

    credentials = RefreshableCredentials.create_from_metadata(metadata(), metadata, "test")
    store, metrics = make_store(s3.meta.endpoint_url, bucket, loop)
    store._credentials = _CredentialCache(credentials, metrics)
    block = True
    data = loop.run(store.get_range("k", etag, 2, 6), timeout=15)
    assert data == b"2345"
    assert blocked.wait(10), "no refresh was started although one was due"
    assert not release.is_set()
    assert metrics.get("origin_credential_refreshes_total") == 0  # still blocked
    release.set()
    for _ in range(200):
        if metrics.get("origin_credential_refreshes_total") == 1:
            break
        threading.Event().wait(0.05)
    assert metrics.get("origin_credential_refreshes_total") == 1


@pytest.mark.parametrize("raw", ['"x"', "x"])
def test_object_info_equality_ignores_the_spelling(raw: str) -> None:
    assert ObjectInfo("k", 1, raw, 0) == ObjectInfo("k", 1, '"x"', 0)


def test_seaweedfs_listings_of_odd_keys_parse_the_same(seaweed_endpoint, loop) -> None:
    import boto3
    import uuid
    s3 = boto3.client("s3", endpoint_url=seaweed_endpoint, region_name="us-east-1")
    bucket = f"odd-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    keys = ODD_KEYS + ["dir/", "dir/sub/x"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    store, _ = make_store(seaweed_endpoint, bucket, loop)
    listed = [obj for page in store.list_pages("") for obj in page]
    assert sorted(o.key for o in listed) == sorted(keys)
    assert all(o.etag.startswith('"') and o.mtime_ns > 0 for o in listed)
