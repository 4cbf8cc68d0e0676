"""The store's write calls (PUT, multipart, copy, delete) against a real S3 server, through the
counting/faulting proxy; signatures checked by a second server with IAM auth switched on."""

from __future__ import annotations

import errno
import hashlib
import json

import boto3
import pytest

from objfs.errors import InvalidArgument, OriginError
from objfs.uploads import UploadLedger
from tests.conftest import put_many, start_moto
from tests.integration.support import blob, make_store

MiB = 1024 * 1024
KEY = "dir/a b+c~\u00fc.bin"  # needs quoting in the path, the copy source and the XML


def get(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def exists(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except s3.exceptions.ClientError:
        return False


def test_put_signs_the_payload_and_round_trips_metadata(s3, bucket, proxy, loop):
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    data = blob(3 * MiB)
    info = loop.run(store.put_object(KEY, memoryview(data), {"mode": "0640", "uid": "12"}))
    assert info.size == len(data) and info.etag == f'"{hashlib.md5(data).hexdigest()}"'
    assert info.mtime_ns > 0
    assert get(s3, bucket, KEY) == data
    (_, _, sent), = [e for e in proxy.log if e[0] == "put"]
    headers = {name.lower(): value for name, value in sent.items()}
    assert headers["x-amz-content-sha256"] == hashlib.sha256(data).hexdigest()  # http: signed
    assert "x-amz-meta-mode" in headers["authorization"]  # metadata is signed too
    meta = store.head_meta(KEY)
    assert meta.metadata == {"mode": "0640", "uid": "12"}
    assert meta.info.etag == info.etag and meta.info.size == len(data)
    assert metrics.get("origin_put_requests_total") == 1
    assert metrics.get("origin_put_bytes") == len(data)
    empty = loop.run(store.put_object("dir/", b""))
    assert empty.size == 0 and get(s3, bucket, "dir/") == b""


def test_put_retries_and_resends_the_body(s3, bucket, proxy, loop):
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    proxy.fail_next("put", 2, 503, "SlowDown")
    data = blob(2 * MiB + 1)
    loop.run(store.put_object("retry", data))
    assert get(s3, bucket, "retry") == data
    assert proxy.requests["put"] == 3
    assert metrics.get("origin_put_retries_total") == 2
    assert metrics.get("origin_put_bytes") == len(data)  # counted once, when it landed


def test_bad_metadata_is_rejected_before_sending(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    for metadata in ({"m": "caf\u00e9"}, {"bad name": "x"}, {"m": "a\nb"}):
        with pytest.raises(InvalidArgument):
            loop.run(store.put_object("k", b"x", metadata))
    assert proxy.requests["put"] == 0


def test_multipart_calls_and_the_5_mib_minimum(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    data = blob(11 * MiB)
    upload_id = loop.run(store.create_multipart(KEY, {"k": "v"}))
    assert loop.run(store.list_multipart_uploads("dir/")) == [(KEY, upload_id)]
    assert loop.run(store.list_multipart_uploads("other/")) == []
    e1 = loop.run(store.upload_part(KEY, upload_id, 1, data[:6 * MiB]))
    e2 = loop.run(store.upload_part(KEY, upload_id, 2, memoryview(data)[6 * MiB:]))
    with pytest.raises(InvalidArgument):
        loop.run(store.complete_multipart(KEY, upload_id, [(2, e2), (1, e1)]))
    info = loop.run(store.complete_multipart(KEY, upload_id, [(1, e1), (2, e2)]))
    assert info.etag.endswith('-2"') and info.size == len(data)
    assert get(s3, bucket, KEY) == data
    assert store.head_meta(KEY).metadata == {"k": "v"}
    assert loop.run(store.list_multipart_uploads("")) == []

    # A 4 MiB part that is not the last: the server refuses the completion (not retried).
    upload_id = loop.run(store.create_multipart("small"))
    e1 = loop.run(store.upload_part("small", upload_id, 1, data[:4 * MiB]))
    e2 = loop.run(store.upload_part("small", upload_id, 2, data[:10]))
    proxy.reset()
    with pytest.raises(OriginError) as err:
        loop.run(store.complete_multipart("small", upload_id, [(1, e1), (2, e2)]))
    assert err.value.code == "EntityTooSmall" and err.value.errno == errno.EIO
    assert proxy.requests["complete_multipart"] == 1
    loop.run(store.abort_multipart("small", upload_id))
    loop.run(store.abort_multipart("small", upload_id))  # already gone: still fine
    assert loop.run(store.list_multipart_uploads("")) == []
    assert not exists(s3, bucket, "small")


def test_complete_without_a_size_heads_the_object(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    upload_id = loop.run(store.create_multipart("k"))
    e1 = loop.run(store.upload_part("k", upload_id, 1, b"last part may be small"))
    info = loop.run(store.complete_multipart("k", upload_id, [(1, e1)]))
    assert info.size == 22 and proxy.requests["head"] == 1


def test_copy_keeps_or_replaces_metadata_and_pins_the_source(s3, bucket, proxy, loop):
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    data = blob(MiB + 3)
    src = loop.run(store.put_object(KEY, data, {"mode": "0600"}))
    kept = loop.run(store.copy_object(KEY, "copy/kept", len(data)))
    assert kept.size == len(data) and kept.etag
    replaced = store.copy(KEY, "copy/replaced", len(data), {"mode": "0644"}, src_etag=src.etag)
    assert replaced.etag
    assert get(s3, bucket, "copy/kept") == data == get(s3, bucket, "copy/replaced")
    assert store.head_meta("copy/kept").metadata == {"mode": "0600"}
    assert store.head_meta("copy/replaced").metadata == {"mode": "0644"}
    assert proxy.requests["copy"] == 2 and proxy.body_bytes["copy"] < 1000  # no data here
    # The version pin is sent (moto ignores x-amz-copy-source-if-match; S3 answers 412 there,
    # which classify_origin_error makes ESTALE).
    pins = [h.get("x-amz-copy-source-if-match") for k, _, h in proxy.log if k == "copy"]
    assert pins == [None, src.etag]
    assert metrics.get("origin_copy_requests_total") == 2


def test_large_copy_is_a_multipart_copy_of_ranges(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    data = blob(13 * MiB, seed=5)
    loop.run(store.put_object("big", data, {"owner": "me"}))
    info = loop.run(store.copy_object("big", "big-copy", len(data),
                                      multipart_threshold_bytes=8 * MiB, part_bytes=5 * MiB))
    assert info.size == len(data) and info.etag.endswith('-3"')
    assert get(s3, bucket, "big-copy") == data
    assert store.head_meta("big-copy").metadata == {"owner": "me"}  # carried over
    ranges = sorted((h["x-amz-copy-source-range"] for k, _, h in proxy.log
                     if k == "upload_part_copy"), key=lambda r: int(r[6:].split("-")[0]))
    assert ranges == [f"bytes=0-{5 * MiB - 1}", f"bytes={5 * MiB}-{10 * MiB - 1}",
                      f"bytes={10 * MiB}-{13 * MiB - 1}"]
    pins = {h["x-amz-copy-source-if-match"] for k, _, h in proxy.log if k == "upload_part_copy"}
    assert pins == {s3.head_object(Bucket=bucket, Key="big")["ETag"]}


def test_a_failing_multipart_copy_is_aborted(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop, max_attempts=2)
    data = blob(11 * MiB, seed=6)
    loop.run(store.put_object("src", data))
    proxy.fail_next("upload_part_copy", 100, 500, "InternalError")
    with pytest.raises(OriginError) as err:
        loop.run(store.copy_object("src", "dst", len(data), {"a": "b"},
                                   multipart_threshold_bytes=5 * MiB, part_bytes=5 * MiB))
    assert err.value.errno == errno.EIO
    assert not exists(s3, bucket, "dst")
    assert loop.run(store.list_multipart_uploads("")) == []
    assert proxy.requests["abort_multipart"] == 1


def test_the_ledger_holds_exactly_the_uploads_in_progress(s3, bucket, proxy, loop, tmp_path):
    """What a mount killed mid-write leaves for the next start to abort: every upload created
    and neither completed nor aborted, and nothing else."""
    ledger = UploadLedger(tmp_path / "uploads", bucket)
    store, _ = make_store(proxy.endpoint, bucket, loop, uploads=ledger, max_attempts=2)

    def recorded() -> list[tuple[str, str]]:
        return [(p.key, p.upload_id) for p in ledger.pending()]

    done = loop.run(store.create_multipart("done"))
    aborted = loop.run(store.create_multipart("aborted"))
    stuck = loop.run(store.create_multipart("stuck"))
    assert sorted(recorded()) == sorted([("done", done), ("aborted", aborted), ("stuck", stuck)])
    e1 = loop.run(store.upload_part("done", done, 1, b"tail"))
    loop.run(store.complete_multipart("done", done, [(1, e1)], size=4))
    loop.run(store.abort_multipart("aborted", aborted))
    proxy.fail_next("abort_multipart", 100, 500, "InternalError")
    with pytest.raises(OriginError):
        loop.run(store.abort_multipart("stuck", stuck))   # the origin refuses: kept
    assert recorded() == [("stuck", stuck)]
    assert loop.run(store.list_multipart_uploads("")) == [("stuck", stuck)]
    proxy.reset()
    store.abort("stuck", stuck)
    assert recorded() == [] and loop.run(store.list_multipart_uploads("")) == []
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == []


def test_a_ledger_that_cannot_be_written_does_not_fail_the_upload(s3, bucket, proxy, loop,
                                                                   tmp_path):
    ledger = UploadLedger(tmp_path / "uploads", bucket)
    (tmp_path / "uploads").rmdir()
    (tmp_path / "uploads").write_text("not a directory")
    store, _ = make_store(proxy.endpoint, bucket, loop, uploads=ledger)
    upload_id = loop.run(store.create_multipart("k"))
    e1 = loop.run(store.upload_part("k", upload_id, 1, b"x"))
    assert loop.run(store.complete_multipart("k", upload_id, [(1, e1)], size=1)).size == 1
    assert get(s3, bucket, "k") == b"x"
    assert ledger.write_errors == 2          # recording and crossing out failed: counted


def test_delete_is_idempotent_and_batched(s3, bucket, proxy, loop):
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    loop.run(store.put_object(KEY, b"x"))
    store.delete(KEY)
    store.delete(KEY)
    assert not exists(s3, bucket, KEY)
    assert proxy.requests["delete"] == 2
    keys = [f"many/{i:05d}&<{i}>" for i in range(250)]
    put_many(s3, bucket, {k: b"" for k in keys[:240]}, workers=32)
    loop.run(store.delete_objects(keys, batch_size=100))  # the last 10 never existed: fine
    assert proxy.requests["delete_batch"] == 3
    assert s3.list_objects_v2(Bucket=bucket, Prefix="many/")["KeyCount"] == 0
    assert metrics.get("origin_delete_batch_requests_total") == 3
    with pytest.raises(InvalidArgument):
        loop.run(store.delete_objects(keys, batch_size=1001))


def test_write_calls_pass_a_server_that_checks_signatures(loop):
    """Every write call's signature (path, query, x-amz-* headers, payload hash) is accepted
    by a server with IAM auth on; a wrong secret is EACCES and not retried."""
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="writer")
        key = iam.create_access_key(UserName="writer")["AccessKey"]
        iam.put_user_policy(UserName="writer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        session = boto3.Session(aws_access_key_id=key["AccessKeyId"],
                                aws_secret_access_key=key["SecretAccessKey"],
                                region_name="us-east-1")
        session.client("s3", endpoint_url=endpoint).create_bucket(Bucket="signed")
        store, _ = make_store(endpoint, "signed", loop, session=session)
        data = blob(6 * MiB)
        loop.run(store.put_object(KEY, data, {"m": "1"}))
        upload_id = loop.run(store.create_multipart("mp", {"m": "2"}))
        e1 = loop.run(store.upload_part("mp", upload_id, 1, data))
        e2 = loop.run(store.upload_part("mp", upload_id, 2, b"tail"))
        assert loop.run(store.list_multipart_uploads("")) == [("mp", upload_id)]
        loop.run(store.complete_multipart("mp", upload_id, [(1, e1), (2, e2)], size=6 * MiB + 4))
        loop.run(store.copy_object(KEY, "copied", len(data), {"m": "3"}))
        loop.run(store.copy_object("mp", "mp-copied", 6 * MiB + 4,
                                   multipart_threshold_bytes=MiB, part_bytes=5 * MiB))
        assert store.head_meta("mp-copied").metadata == {"m": "2"}
        loop.run(store.delete_object("copied"))
        loop.run(store.delete_objects([KEY, "mp"]))
        upload_id = loop.run(store.create_multipart("aborted"))
        loop.run(store.abort_multipart("aborted", upload_id))

        wrong = boto3.Session(aws_access_key_id=key["AccessKeyId"],
                              aws_secret_access_key="wrong", region_name="us-east-1")
        bad, metrics = make_store(endpoint, "signed", loop, session=wrong)
        with pytest.raises(OriginError) as err:
            loop.run(bad.put_object("nope", b"x"))
        assert err.value.errno == errno.EACCES
        assert metrics.get("origin_put_requests_total") == 1
    finally:
        proc.terminate()
        proc.wait(10)
