"""Sequential multipart uploads and staged files against a real S3 server (moto in server mode,
which enforces S3's 5 MiB minimum for every part but the last), mostly through the fault proxy.
"""

from __future__ import annotations

import dataclasses
import errno
import random
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from objfs.errors import InvalidArgument, OriginError
from objfs.metrics import Metrics
from objfs.writer import (
    NotSequential,
    PartSchedule,
    SequentialUpload,
    StagedFile,
    UploadFailed,
    UploadSettings,
    WriteBudget,
)
from tests.faultproxy import Fault
from tests.integration.support import blob, make_store

MiB = 1024 * 1024
BLOCK = 4 * MiB
PART = 8 * MiB


def write_all(upload: SequentialUpload, data: bytes, chunks: list[int]) -> None:
    pos, i = 0, 0
    view = memoryview(data)
    while pos < len(data):
        n = chunks[i % len(chunks)]
        upload.write(pos, view[pos:pos + n])
        pos += min(n, len(data) - pos)
        i += 1


def get(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def exists(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except s3.exceptions.ClientError as exc:
        assert exc.response["Error"]["Code"] in ("404", "NoSuchKey")
        return False


def open_uploads(s3, bucket: str) -> list:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def part_sizes(proxy) -> list[int]:
    sizes = {}
    for kind, path_qs, n in proxy.sizes:
        if kind == "upload_part":
            sizes[int(parse_qs(urlsplit(path_qs).query)["partNumber"][0])] = n
    return [sizes[k] for k in sorted(sizes)]


@pytest.mark.parametrize("size, chunks", [
    (0, [1]),
    (1, [1]),
    (BLOCK - 1, [128 * 1024]),
    (BLOCK, [1_000_003]),
    (BLOCK + 1, [128 * 1024, 7]),
    (PART - 1, [131_071]),
    (PART, [PART]),
    (PART + 1, [3 * MiB + 5]),
    (30 * MiB + 12_345, [128 * 1024, 1 * MiB + 17, 4095]),
])
def test_round_trip_is_byte_exact(s3, bucket, proxy, loop, size, chunks):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    metrics = Metrics()
    budget = WriteBudget(64 * MiB, metrics=metrics)
    data = blob(size, seed=size)
    upload = SequentialUpload(store, loop, "ckpt/model.pt", budget=budget, metrics=metrics,
                              metadata={"mode": "0644"})
    write_all(upload, data, chunks)
    info = upload.finish()
    assert info.size == size and info.etag
    assert get(s3, bucket, "ckpt/model.pt") == data
    head = s3.head_object(Bucket=bucket, Key="ckpt/model.pt")
    assert head["ETag"] == info.etag and head["Metadata"] == {"mode": "0644"}
    assert upload.finish() is info  # idempotent
    if size < PART:
        assert proxy.requests["put"] == 1 and proxy.requests["create_multipart"] == 0
        assert metrics.get("upload_single_put_total") == 1
    else:
        expected = [PART] * (size // PART) + ([size % PART] if size % PART else [])
        assert part_sizes(proxy) == expected
        assert proxy.requests["put"] == 0 and proxy.requests["complete_multipart"] == 1
        assert metrics.get("upload_parts_total") == len(expected)
    assert budget.used_bytes == 0
    assert metrics.get("upload_parts_inflight") == 0
    assert metrics.get("upload_bytes") == size
    assert metrics.get("upload_completed_total") == 1
    assert open_uploads(s3, bucket) == []


def test_moto_enforces_the_5_mib_part_minimum(s3_endpoint, s3, bucket, loop):
    """The server the tests run against rejects a 4 MiB non-last part (EntityTooSmall), so a
    schedule that ignores S3's rule fails here instead of in production; the default works."""
    import os
    assert "S3_UPLOAD_PART_MIN_SIZE" not in os.environ
    store, _ = make_store(s3_endpoint, bucket, loop)
    data = blob(10 * MiB)
    us3 = PartSchedule(blocks_per_part=1, min_part_bytes=4 * MiB)  # what US3 would take
    upload = SequentialUpload(store, loop, "small-parts", budget=WriteBudget(64 * MiB),
                              schedule=us3)
    write_all(upload, data, [MiB])
    with pytest.raises(UploadFailed) as info:
        upload.finish()
    assert info.value.errno == errno.EIO
    assert isinstance(info.value.__cause__, OriginError)
    assert "EntityTooSmall" in str(info.value)
    assert not exists(s3, bucket, "small-parts")
    assert open_uploads(s3, bucket) == []  # the failed completion was aborted

    upload = SequentialUpload(store, loop, "default-parts", budget=WriteBudget(64 * MiB))
    write_all(upload, data, [MiB])
    upload.finish()
    assert get(s3, bucket, "default-parts") == data


def test_parts_go_out_while_the_writer_keeps_writing(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    metrics = Metrics()
    proxy.delay_next("upload_part", 100, 0.3)
    upload = SequentialUpload(store, loop, "overlap", budget=WriteBudget(256 * MiB),
                              concurrency=3, metrics=metrics)
    data = blob(6 * PART)
    write_all(upload, data, [MiB])
    # Every write has returned while the last parts are still on the wire (each takes at
    # least 0.3 s): the writer waited for free slots, never for its own parts.
    assert metrics.get("upload_parts_total") <= 3
    assert metrics.get("upload_parts_inflight") >= 1
    upload.finish()
    assert get(s3, bucket, "overlap") == data
    assert proxy.max_inflight["upload_part"] == 3  # the concurrency bound, reached
    assert metrics.get("upload_parts_total") == 6


def test_several_uploads_from_threads(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    budget = WriteBudget(48 * MiB)
    sizes = [0, 5, PART - 3, PART + 4 * MiB + 1, 2 * PART + 17, 3 * PART]
    datas = {f"t/{i}": blob(size, seed=i) for i, size in enumerate(sizes)}
    errors: list[BaseException] = []

    def run(key: str) -> None:
        try:
            upload = SequentialUpload(store, loop, key, budget=budget, concurrency=2)
            write_all(upload, datas[key], [256 * 1024 + len(key)])
            upload.finish()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(key,)) for key in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for key, data in datas.items():
        assert get(s3, bucket, key) == data
    assert budget.used_bytes == 0 and budget.peak_bytes <= 48 * MiB


def test_the_budget_bounds_memory_and_write_waits(s3, bucket, proxy, loop):
    """72 MiB written by three threads through a 16 MiB budget: the budget is never exceeded
    and writers block (backpressure) until parts are uploaded."""
    store, _ = make_store(proxy.endpoint, bucket, loop)
    metrics = Metrics()
    budget = WriteBudget(16 * MiB, metrics=metrics)
    proxy.delay_next("upload_part", 1000, 0.05)
    datas = {f"b/{i}": blob(3 * PART, seed=10 + i) for i in range(3)}
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(metrics.get("upload_bytes_buffered"))
            time.sleep(0.002)

    def run(key: str) -> None:
        upload = SequentialUpload(store, loop, key, budget=budget, concurrency=4,
                                  metrics=metrics)
        write_all(upload, datas[key], [128 * 1024])
        upload.finish()

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=run, args=(key,)) for key in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sampler.join()
    for key, data in datas.items():
        assert get(s3, bucket, key) == data
    assert budget.peak_bytes <= 16 * MiB
    assert max(samples) <= 16 * MiB
    assert metrics.get("upload_budget_wait_s") > 0
    assert metrics.get("upload_budget_overcommit_total") == 0
    assert budget.used_bytes == 0


def test_a_seek_back_is_not_sequential(s3, bucket, proxy, loop):
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    upload = SequentialUpload(store, loop, "seek", budget=WriteBudget(64 * MiB),
                              reorder_wait_s=0.01)
    upload.write(0, b"a" * 1000)
    with pytest.raises(NotSequential) as info:
        upload.write(10, b"b")
    assert (info.value.offset, info.value.expected) == (10, 1000)
    with pytest.raises(NotSequential):
        upload.write(5000, b"c")  # a hole forward is not sequential either
    upload.write(1000, b"d")  # the upload is still usable
    assert upload.finish().size == 1001
    assert get(s3, bucket, "seek") == b"a" * 1000 + b"d"


def test_writes_delivered_out_of_order_by_two_threads_are_accepted(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    upload = SequentialUpload(store, loop, "reorder", budget=WriteBudget(64 * MiB),
                              reorder_wait_s=2.0)
    later = threading.Thread(target=upload.write, args=(100, b"y" * 100))
    later.start()
    time.sleep(0.1)
    upload.write(0, b"x" * 100)
    later.join(5)
    assert upload.finish().size == 200
    assert get(s3, bucket, "reorder") == b"x" * 100 + b"y" * 100


def test_a_part_failing_after_retries_is_eio_and_leaves_nothing(s3, bucket, proxy, loop):
    store, store_metrics = make_store(proxy.endpoint, bucket, loop, max_attempts=3)
    metrics = Metrics()
    budget = WriteBudget(64 * MiB)
    upload = SequentialUpload(store, loop, "broken", budget=budget, concurrency=2,
                              metrics=metrics)
    proxy.fail_next("upload_part", 100, 500, "InternalError")
    data = blob(5 * PART)
    with pytest.raises(UploadFailed) as info:
        write_all(upload, data, [MiB])  # the error latches; a later write reports it
        upload.finish()
    assert info.value.errno == errno.EIO
    with pytest.raises(UploadFailed) as again:
        upload.finish()
    assert again.value.errno == errno.EIO
    with pytest.raises(UploadFailed):
        upload.write(upload.written, b"more")
    assert not exists(s3, bucket, "broken")
    assert open_uploads(s3, bucket) == []
    assert proxy.requests["abort_multipart"] >= 1
    assert proxy.requests["complete_multipart"] == 0
    assert store_metrics.get("origin_upload_part_retries_total") >= 2
    assert metrics.get("upload_failed_total") == 1
    assert metrics.get("upload_parts_inflight") == 0
    assert budget.used_bytes == 0


def test_a_retryable_part_failure_is_retried(s3, bucket, proxy, loop):
    store, store_metrics = make_store(proxy.endpoint, bucket, loop)
    proxy.fail_next("upload_part", 1, 503, "SlowDown")
    upload = SequentialUpload(store, loop, "retried", budget=WriteBudget(64 * MiB))
    data = blob(2 * PART + 100)
    write_all(upload, data, [MiB])
    upload.finish()
    assert get(s3, bucket, "retried") == data
    assert store_metrics.get("origin_upload_part_retries_total") == 1


def test_a_broken_connection_during_a_part_is_retried(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    proxy.cut_next("upload_part", 1, after_bytes=0)  # the answer never arrives
    upload = SequentialUpload(store, loop, "cut", budget=WriteBudget(64 * MiB))
    data = blob(PART + 5)
    write_all(upload, data, [MiB])
    upload.finish()
    assert get(s3, bucket, "cut") == data


def test_a_failing_small_put_is_eio_and_publishes_nothing(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop, max_attempts=2)
    proxy.fail_next("put", 10, 500, "InternalError")
    upload = SequentialUpload(store, loop, "small", budget=WriteBudget(64 * MiB))
    upload.write(0, b"tiny")
    with pytest.raises(UploadFailed) as info:
        upload.finish()
    assert info.value.errno == errno.EIO
    assert proxy.requests["put"] == 2
    assert not exists(s3, bucket, "small")


def test_a_failing_create_or_complete_leaves_nothing(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop, max_attempts=2)
    proxy.fail_next("create_multipart", 10, 500, "InternalError")
    upload = SequentialUpload(store, loop, "nocreate", budget=WriteBudget(64 * MiB))
    with pytest.raises(UploadFailed):
        write_all(upload, blob(3 * PART), [MiB])
        upload.finish()
    assert not exists(s3, bucket, "nocreate") and open_uploads(s3, bucket) == []

    proxy.reset()
    proxy.fail_next("complete_multipart", 10, 400, "InvalidPart")
    upload = SequentialUpload(store, loop, "nocomplete", budget=WriteBudget(64 * MiB))
    write_all(upload, blob(PART + 1), [MiB])
    with pytest.raises(UploadFailed) as info:
        upload.finish()
    assert info.value.errno == errno.EIO
    assert proxy.requests["complete_multipart"] == 1  # a 400 is not retried
    assert not exists(s3, bucket, "nocomplete") and open_uploads(s3, bucket) == []


def test_a_complete_answering_200_with_an_error_is_retried(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    proxy.fail_next("complete_multipart", 1, 200, "InternalError")
    upload = SequentialUpload(store, loop, "ok200", budget=WriteBudget(64 * MiB))
    data = blob(PART + 3)
    write_all(upload, data, [MiB])
    upload.finish()
    assert proxy.requests["complete_multipart"] == 2
    assert get(s3, bucket, "ok200") == data


def test_a_completion_whose_answer_is_lost_is_recognised(s3, bucket, proxy, loop):
    """The server completed, the answer broke, the retry finds no upload: the object's ETag
    is the multipart ETag of our parts, so this is success (not EIO for a published file)."""
    store, store_metrics = make_store(proxy.endpoint, bucket, loop)
    proxy.cut_next("complete_multipart", 1, after_bytes=0)
    proxy.then("complete_multipart", Fault(1, 404, "NoSuchUpload"))  # what S3 answers then
    upload = SequentialUpload(store, loop, "lost-answer", budget=WriteBudget(64 * MiB))
    data = blob(2 * PART + 1)
    write_all(upload, data, [MiB])
    info = upload.finish()
    assert proxy.requests["complete_multipart"] == 2
    assert store_metrics.get("origin_complete_multipart_recovered_total") == 1
    assert info.size == len(data) and info.etag.endswith('-3"')
    assert get(s3, bucket, "lost-answer") == data


def test_abort_cancels_and_leaves_nothing(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    budget = WriteBudget(64 * MiB)
    metrics = Metrics()
    proxy.delay_next("upload_part", 100, 0.5)
    upload = SequentialUpload(store, loop, "cancel", budget=budget, metrics=metrics)
    write_all(upload, blob(2 * PART + 10), [MiB])
    upload.abort()
    upload.abort()
    with pytest.raises(UploadFailed):
        upload.finish()
    assert not exists(s3, bucket, "cancel") and open_uploads(s3, bucket) == []
    assert budget.used_bytes == 0
    assert metrics.get("upload_cancelled_total") == 1
    assert metrics.get("upload_failed_total") == 0


def test_a_file_larger_than_the_schedule_is_efbig(s3, bucket, proxy, loop):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    schedule = PartSchedule(block_size=5 * MiB, blocks_per_part=1, max_parts=2,
                            parts_per_step=1, min_object_bytes=0)
    upload = SequentialUpload(store, loop, "huge", budget=WriteBudget(64 * MiB),
                              schedule=schedule)
    assert schedule.max_object_bytes == 15 * MiB
    with pytest.raises(UploadFailed) as info:
        write_all(upload, blob(16 * MiB), [MiB])
    assert info.value.errno == errno.EFBIG
    with pytest.raises(UploadFailed):
        upload.finish()
    assert not exists(s3, bucket, "huge") and open_uploads(s3, bucket) == []


# ---- staged files ---------------------------------------------------------------------------


def staged(tmp_path, store, loop, key, metadata=None, **kw) -> StagedFile:
    kw.setdefault("budget", WriteBudget(64 * MiB))
    return StagedFile(tmp_path, key, UploadSettings(store, loop, **kw), metadata=metadata)


def test_staged_file_matches_a_model_under_random_operations(s3, bucket, proxy, loop,
                                                             tmp_path):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    rng = random.Random(4)
    model = bytearray()
    f = staged(tmp_path, store, loop, "random")
    assert list(tmp_path.iterdir()) == []  # unlinked at once: a crash leaves nothing
    for _ in range(300):
        op = rng.random()
        if op < 0.6:
            offset = rng.randrange(0, 20 * MiB)
            data = rng.randbytes(rng.choice([1, 100, 4096, 70_000, 1_000_000]))
            f.pwrite(offset, data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + len(data)] = data
        elif op < 0.7:
            size = rng.randrange(0, 22 * MiB)
            f.truncate(size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        else:
            offset = rng.randrange(0, 22 * MiB)
            n = rng.randrange(0, 200_000)
            assert f.pread(offset, n) == bytes(model[offset:offset + n])
        assert f.size == len(model)
    info = f.upload()
    assert info.size == len(model)
    assert get(s3, bucket, "random") == bytes(model)
    assert len(model) >= PART  # multipart, from the file
    assert proxy.requests["upload_part"] >= 1
    with pytest.raises(InvalidArgument):
        f.pwrite(0, b"closed")


def test_staged_file_from_an_existing_object_overwrites_a_middle_range(s3, bucket, proxy,
                                                                      loop, tmp_path):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    original = blob(9 * MiB + 7, seed=3)
    s3.put_object(Bucket=bucket, Key="existing", Body=original)
    info = store.head("existing")
    f = staged(tmp_path, store, loop, "existing")
    f.init_from(info, chunk_bytes=2 * MiB)
    assert f.size == len(original)
    assert f.pread(3 * MiB, 10) == original[3 * MiB:3 * MiB + 10]
    f.pwrite(4 * MiB - 3, b"X" * 1000)
    expected = original[:4 * MiB - 3] + b"X" * 1000 + original[4 * MiB - 3 + 1000:]
    new = f.upload()
    assert get(s3, bucket, "existing") == expected
    assert new.etag != info.etag


def test_staged_upload_failure_is_eio_and_leaves_the_old_object(s3, bucket, proxy, loop,
                                                                tmp_path):
    store, _ = make_store(proxy.endpoint, bucket, loop, max_attempts=2)
    s3.put_object(Bucket=bucket, Key="keep", Body=b"old")
    f = staged(tmp_path, store, loop, "keep")
    f.pwrite(0, blob(PART * 2 + 1))
    proxy.fail_next("upload_part", 100, 500, "InternalError")
    with pytest.raises(UploadFailed) as info:
        f.upload()
    assert info.value.errno == errno.EIO
    assert get(s3, bucket, "keep") == b"old"
    assert open_uploads(s3, bucket) == []


def spooled(tmp_path, store, loop, key, **kw) -> SequentialUpload:
    kw.setdefault("budget", WriteBudget(64 * MiB))
    free = kw.pop("free_bytes", None)
    settings = UploadSettings(store, loop, staging_dir=str(tmp_path), **kw)
    if free is not None:
        settings = dataclasses.replace(settings, free_bytes=free)
    return settings.upload(key, spooled=True)


def test_spill_hands_a_sequential_upload_to_a_staged_file(s3, bucket, proxy, loop, tmp_path):
    store, _ = make_store(proxy.endpoint, bucket, loop)
    budget = WriteBudget(64 * MiB)
    # Nothing uploaded yet: the buffered bytes move to disk, no request is made.
    upload = spooled(tmp_path, store, loop, "spill-small", budget=budget)
    upload.write(0, b"header--" + b"body" * 1000)
    f = upload.spill()
    assert budget.used_bytes == 0 and sum(proxy.requests.values()) == 0
    f.pwrite(0, b"HEADER")  # the seek back that caused the fallback
    f.upload()
    assert get(s3, bucket, "spill-small") == b"HEADER--" + b"body" * 1000

    # Parts already uploaded: discarded (the multipart upload is aborted), nothing is
    # published or downloaded, and the local copy becomes the staged file.
    proxy.reset()
    data = blob(PART * 2 + MiB)
    upload = spooled(tmp_path, store, loop, "spill-big", budget=budget)
    write_all(upload, data, [MiB])
    f = upload.spill()
    assert proxy.requests["complete_multipart"] == 0 and proxy.requests["get"] == 0
    assert proxy.requests["abort_multipart"] == 1 and open_uploads(s3, bucket) == []
    assert not exists(s3, bucket, "spill-big")
    assert f.size == len(data) and f.pread(0, len(data)) == data
    f.pwrite(10, b"patched")
    f.upload()
    assert get(s3, bucket, "spill-big") == data[:10] + b"patched" + data[17:]
    assert budget.used_bytes == 0


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "copied"])
def test_a_streaming_upload_reads_back_from_its_local_copy(s3, bucket, proxy, loop, tmp_path,
                                                           monkeypatch, mapped):
    if not mapped:  # a filesystem that cannot preallocate: parts are copied into the spool
        def no_fallocate(self, offset, size):
            raise OSError(errno.EOPNOTSUPP, "not supported")
        monkeypatch.setattr(StagedFile, "map_range", no_fallocate)
    store, _ = make_store(proxy.endpoint, bucket, loop)
    data = blob(PART * 2 + 3 * MiB + 5, seed=3)
    upload = spooled(tmp_path, store, loop, "streamed")
    write_all(upload, data[:PART + 3 * MiB], [MiB])  # one part shipped, one being filled
    for offset, size in ((0, 100), (PART - 10, 20), (PART + MiB, 2 * MiB), (0, len(data))):
        assert upload.read(offset, size) == data[offset:min(offset + size, PART + 3 * MiB)]
    assert not exists(s3, bucket, "streamed") and proxy.requests["complete_multipart"] == 0
    pos = PART + 3 * MiB
    upload.write(pos, data[pos:])
    assert upload.read(len(data) - 7, 100) == data[-7:]
    upload.finish()
    assert get(s3, bucket, "streamed") == data
    assert list(tmp_path.iterdir()) == []  # the local copy is gone with the upload


def test_without_room_for_its_local_copy_a_stream_still_publishes_whole(s3, bucket, proxy,
                                                                         loop, tmp_path):
    """Past the cache disk's free-space floor the local copy is given up: reading back or
    rewriting out of order is then ENOSPC and publishes nothing; plain streaming is fine."""
    store, metrics = make_store(proxy.endpoint, bucket, loop)
    data = blob(PART * 3, seed=5)
    asked: list[str] = []

    def free(path: str) -> int:  # room for the first part's copy, then the disk is full
        asked.append(path)
        return 10 * PART if len(asked) == 1 else PART // 2

    upload = spooled(tmp_path, store, loop, "full-disk", free_bytes=free)
    write_all(upload, data, [MiB])
    upload.finish()
    assert get(s3, bucket, "full-disk") == data
    assert asked == [str(tmp_path)] * 2  # not asked again once given up

    asked.clear()
    upload = spooled(tmp_path, store, loop, "rewritten", free_bytes=free)
    write_all(upload, data, [MiB])  # the second part found no room
    assert upload.read(0, 10) == data[:10]
    with pytest.raises(UploadFailed) as info:
        upload.read(PART + 10, 10)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(UploadFailed) as info:
        upload.spill()
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(UploadFailed):
        upload.finish()
    assert not exists(s3, bucket, "rewritten") and open_uploads(s3, bucket) == []
