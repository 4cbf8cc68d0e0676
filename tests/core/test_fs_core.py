"""The filesystem core driven directly (no mount), one test per promise a review broke
(issue 13), each written to fail on the code before its fix. Races are made deterministic:
listings pause between pages, requests are held at the proxy, a thread is held inside a tree
read."""

from __future__ import annotations

import errno
import os
import random
import stat
import threading

import pytest

from objfs import writer
from objfs.errors import ObjfsError
from objfs.tree import ROOT_INO
from tests.core.conftest import Core, paused_pages

MiB = 1024 * 1024
PART = 8 * MiB


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def errno_of(call) -> int | None:
    try:
        call()
    except ObjfsError as exc:
        return exc.errno
    return None


# ---- 1. a file being written is readable and rewritable without a partial publish ----------

def test_reading_a_file_while_it_streams_publishes_nothing(core: Core) -> None:
    data = blob(2 * PART + 3 * MiB)
    fh = core.create("ckpt.bin")
    for pos in range(0, 2 * PART + MiB, MiB):  # two parts have left, a third is filling
        core.fs.write(fh, pos, data[pos:pos + MiB])
    core.proxy.reset()
    reader = core.open("ckpt.bin")
    assert core.read(reader, 1000) == data[:1000]  # `head` of a checkpoint being written
    assert core.read(reader, 2 * MiB, PART - MiB) == data[PART - MiB:PART + MiB]
    core.fs.release(reader)
    assert core.proxy.requests["complete_multipart"] == 0 and core.proxy.requests["get"] == 0
    assert core.origin("ckpt.bin") is None  # no other host can see a partial object
    for pos in range(2 * PART + MiB, len(data), MiB):
        core.fs.write(fh, pos, data[pos:pos + MiB])
    core.close(fh)
    assert core.origin("ckpt.bin") == data
    assert core.proxy.requests["complete_multipart"] == 1


def test_a_seek_back_after_parts_left_publishes_nothing_until_close(core: Core) -> None:
    data = bytearray(blob(2 * PART + MiB, seed=2))
    fh = core.create("rewritten.bin")
    for pos in range(0, len(data), MiB):
        core.fs.write(fh, pos, bytes(data[pos:pos + MiB]))
    core.proxy.reset()
    core.fs.write(fh, 10, b"PATCH")  # back into a part that was already uploaded
    data[10:15] = b"PATCH"
    assert core.proxy.requests["complete_multipart"] == 0 and core.proxy.requests["get"] == 0
    assert core.origin("rewritten.bin") is None
    assert core.read(fh, 20) == bytes(data[:20])
    core.close(fh)
    assert core.origin("rewritten.bin") == bytes(data)
    assert core.proxy.requests["get"] == 0  # nothing was downloaded back
    assert core.s3.list_multipart_uploads(Bucket=core.bucket).get("Uploads", []) == []


# ---- 2. ETags of copied objects ------------------------------------------------------------

@pytest.mark.parametrize("origin_endpoint", ["moto", "seaweed"], indirect=True)
def test_a_chmod_does_not_make_the_next_relist_call_the_file_changed(core: Core) -> None:
    core.s3.put_object(Bucket=core.bucket, Key="f", Body=b"content")
    core.relist()
    ino = core.node("f").ino
    fh = core.open("f")
    core.fs.setattr(ino, mode=0o600)  # a server-side self-copy
    stats = core.relist()
    assert stats.changed == 0
    assert core.read(fh) == b"content"  # not ESTALE
    core.fs.release(fh)
    assert core.invalidated_now == []


# ---- 3. local changes during a relist win ---------------------------------------------------

def relist_around(core: Core, action, after: int = 0) -> None:
    """Relist from a listing taken now, running ``action`` after page ``after`` of it."""
    listing = core.listing()
    pages = [listing[i:i + 2] for i in range(0, len(listing), 2)]
    reached, resume = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            core.relist(paused_pages(pages, after, reached, resume))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert reached.wait(30)
    try:
        action()
    finally:
        resume.set()
        thread.join(60)
    assert not errors, errors


def test_a_directory_renamed_during_a_relist_does_not_disappear(core: Core) -> None:
    for key in ("a", "d/x", "d/y", "d/z", "q"):
        core.s3.put_object(Bucket=core.bucket, Key=key, Body=key.encode())
    core.relist()
    relist_around(core, lambda: core.fs.rename(ROOT_INO, b"d", ROOT_INO, b"e"))
    assert sorted(e.name for e in core.tree.readdir(ROOT_INO)) == [b"a", b"e", b"q"]
    assert core.read_file("e/y") == b"d/y"
    core.relist()
    assert sorted(e.name for e in core.tree.readdir(ROOT_INO)) == [b"a", b"e", b"q"]


def test_an_unlink_during_a_relist_does_not_bring_the_name_back(core: Core) -> None:
    for key in ("a", "b", "k", "z"):
        core.s3.put_object(Bucket=core.bucket, Key=key, Body=b"1")
    core.relist()
    relist_around(core, lambda: core.fs.unlink(ROOT_INO, b"k"))
    assert sorted(e.name for e in core.tree.readdir(ROOT_INO)) == [b"a", b"b", b"z"]


def test_a_file_published_during_a_relist_keeps_its_new_version(core: Core) -> None:
    core.s3.put_object(Bucket=core.bucket, Key="k", Body=b"old")
    core.s3.put_object(Bucket=core.bucket, Key="z", Body=b"1")
    core.relist()
    relist_around(core, lambda: core.write_file("k", b"new content"))
    assert core.read_file("k") == b"new content"


# ---- 4. truncate, release and the next open -------------------------------------------------

def hold_first_tree_read(core: Core, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The next ``tree.get`` made by a thread named 'opener' stops until released."""
    reached, release = threading.Event(), threading.Event()
    original = core.tree.get

    def get(ino: int):
        inode = original(ino)
        if threading.current_thread().name == "opener" and not reached.is_set():
            reached.set()
            assert release.wait(30)
        return inode

    monkeypatch.setattr(core.tree, "get", get)
    return reached, release


@pytest.mark.parametrize("flags", [os.O_RDWR, os.O_RDONLY], ids=["writer", "reader"])
def test_an_open_racing_the_publish_of_a_truncate_sees_it(core: Core, monkeypatch,
                                                          flags: int) -> None:
    data = blob(3000, seed=4)
    core.s3.put_object(Bucket=core.bucket, Key="t", Body=data)
    core.relist()
    ino = core.node("t").ino
    fh = core.open("t", os.O_RDWR)
    core.fs.setattr(ino, size=1000, fh=fh)  # ftruncate with no later write
    core.fs.flush(fh)  # close(2): a handle that wrote nothing leaves it to release
    reached, release = hold_first_tree_read(core, monkeypatch)
    result: dict[str, object] = {}

    def opener() -> None:
        try:
            fh2 = core.fs.open(ino, flags)
            if flags == os.O_RDWR:
                core.fs.write(fh2, 10, b"WRITTEN")
                core.close(fh2)
            else:
                result["read"] = core.read(fh2)
                core.fs.release(fh2)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=opener, name="opener")
    thread.start()
    assert reached.wait(30)  # the open has read the tree: the pre-truncate version
    core.fs.release(fh)  # the last release publishes the truncate and forgets the state
    release.set()
    thread.join(60)
    assert "error" not in result, result.get("error")
    if flags == os.O_RDWR:
        assert core.origin("t") == data[:10] + b"WRITTEN" + data[17:1000]
    else:
        assert result["read"] == data[:1000]
        assert core.origin("t") == data[:1000]


# ---- 5. rename onto a file another handle is writing ----------------------------------------

def test_a_writer_of_a_renamed_over_file_does_not_overwrite_it(core: Core) -> None:
    core.write_file("src", b"the renamed content")
    fh = core.create("dst")
    core.fs.write(fh, 0, b"the old writer's bytes")
    core.fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst")
    core.fs.write(fh, 22, b" and more")  # the old writer goes on
    assert core.read(fh) == b"the old writer's bytes and more"
    core.close(fh)
    assert core.origin("dst") == b"the renamed content"
    assert core.read_file("dst") == b"the renamed content"


# ---- 6. handles open on an unlinked file ----------------------------------------------------

def test_handles_open_on_an_unlinked_file_keep_working(core: Core) -> None:
    data = blob(3 * MiB, seed=6)
    core.s3.put_object(Bucket=core.bucket, Key="gone", Body=data)
    core.relist()
    ino = core.node("gone").ino
    reader = core.open("gone")
    assert core.read(reader, MiB) == data[:MiB]  # its first page is cached now
    core.fs.unlink(ROOT_INO, b"gone")
    assert core.fs.getattr(ino).size == len(data)  # fstat
    assert core.read(reader, 1000, 5) == data[5:1005]  # cached bytes
    assert errno_of(lambda: core.read(reader, 100, 2 * MiB)) == errno.ESTALE  # never cached
    core.fs.release(reader)
    assert errno_of(lambda: core.fs.getattr(ino)) == errno.ENOENT


def test_an_unlinked_file_being_written_stays_usable_and_is_never_published(core: Core) -> None:
    fh = core.create("tmpfile", mode=0o600)
    ino = core.node("tmpfile").ino
    data = blob(PART + MiB, seed=7)
    core.fs.write(fh, 0, data[:MiB])
    core.fs.unlink(ROOT_INO, b"tmpfile")
    for pos in range(MiB, len(data), MiB):
        core.fs.write(fh, pos, data[pos:pos + MiB])
    attrs = core.fs.getattr(ino)
    assert attrs.size == len(data) and stat.S_IMODE(attrs.mode) == 0o600
    assert core.read(fh, 100, PART) == data[PART:PART + 100]
    core.close(fh)
    assert core.origin("tmpfile") is None
    assert core.s3.list_multipart_uploads(Bucket=core.bucket).get("Uploads", []) == []


# ---- 7. directory renames -------------------------------------------------------------------

@pytest.mark.parametrize("origin_endpoint", ["moto", "seaweed"], indirect=True)
def test_a_directory_made_by_mkdir_can_be_renamed(core: Core) -> None:
    attrs = core.fs.mkdir(ROOT_INO, b"made", 0o750, 0, 0)
    sub = core.fs.mkdir(attrs.ino, b"sub", 0o700, 0, 0)
    core.write_file("made/sub/f", b"inside")
    # What the server keeps of a marker's metadata (SeaweedFS keeps none) moves with it.
    kept = core.s3.head_object(Bucket=core.bucket, Key="made/sub/")["Metadata"]
    core.fs.rename(ROOT_INO, b"made", ROOT_INO, b"moved")
    keys = sorted(o.key for o in core.listing())
    assert keys == ["moved/", "moved/sub/", "moved/sub/f"]
    assert core.s3.head_object(Bucket=core.bucket, Key="moved/sub/")["Metadata"] == kept
    assert core.read_file("moved/sub/f") == b"inside"
    assert core.node("moved/sub").ino == sub.ino
    assert stat.S_IMODE(core.fs.getattr(sub.ino).mode) == 0o700


def test_a_directory_rename_copies_concurrently(core: Core) -> None:
    for i in range(40):
        core.s3.put_object(Bucket=core.bucket, Key=f"big/f{i:02d}", Body=b"x")
    core.relist()
    core.proxy.reset()
    core.fs.rename(ROOT_INO, b"big", ROOT_INO, b"big2")
    assert core.proxy.requests["copy"] == 40
    assert core.proxy.max_inflight["copy"] > 1
    assert len(core.listing()) == 40 and all(o.key.startswith("big2/") for o in core.listing())


def test_an_emptied_directory_stays_a_directory(core: Core) -> None:
    core.s3.put_object(Bucket=core.bucket, Key="implicit/only", Body=b"1")
    core.relist()
    d = core.node("implicit").ino
    core.fs.unlink(d, b"only")
    core.relist()  # no key names it any more, but a local disk would keep it
    assert core.node("implicit").is_dir
    assert [o.key for o in core.listing()] == ["implicit/"]


# ---- 9. failed closes -----------------------------------------------------------------------

def test_a_failed_upload_at_close_drops_the_kernels_pages_and_cleans_up(core: Core) -> None:
    fh = core.create("fails")
    ino = core.node("fails").ino
    core.fs.write(fh, 0, b"never published")
    core.proxy.fail_next("put", 100, status=500, code="InternalError")
    assert errno_of(lambda: core.fs.flush(fh)) == errno.EIO
    assert ino in core.invalidated
    core.fs.release(fh)
    assert core.fs._writes == {}
    assert core.origin("fails") is None


def test_a_local_disk_error_while_publishing_is_its_errno_and_leaks_nothing(core: Core,
                                                                              monkeypatch):
    fh = core.create("nospace")
    core.fs.write(fh, 10, b"staged, not streamed")  # a hole first: staged on disk
    staged = core.fs._writes[core.node("nospace").ino].staged

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.StagedFile, "upload", no_space)
    assert errno_of(lambda: core.fs.flush(fh)) == errno.ENOSPC
    core.fs.release(fh)
    assert core.fs._writes == {}
    assert staged._closed  # its descriptor was closed
    assert core.origin("nospace") is None


# ---- 12, 13. errnos -------------------------------------------------------------------------

def test_impossible_sizes_and_long_names_get_their_errnos(core: Core) -> None:
    core.write_file("f", b"x")
    ino = core.node("f").ino
    assert errno_of(lambda: core.fs.setattr(ino, size=1 << 62)) == errno.EFBIG
    long = b"n" * 256
    assert errno_of(lambda: core.fs.lookup(ROOT_INO, long)) == errno.ENAMETOOLONG
    assert errno_of(lambda: core.fs.unlink(ROOT_INO, long)) == errno.ENAMETOOLONG
    assert errno_of(lambda: core.fs.rmdir(ROOT_INO, long)) == errno.ENAMETOOLONG
    assert errno_of(lambda: core.fs.rename(ROOT_INO, long, ROOT_INO, b"x")) == errno.ENAMETOOLONG


# ---- 16. directory times and link counts ----------------------------------------------------

def test_directories_show_their_changes(core: Core) -> None:
    d = core.fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    before = core.fs.getattr(d.ino).mtime_ns
    core.fs.mkdir(d.ino, b"s1", 0o755, 0, 0)
    core.fs.mkdir(d.ino, b"s2", 0o755, 0, 0)
    core.write_file("d/f", b"x")
    after = core.fs.getattr(d.ino)
    assert after.nlink == 4 and after.mtime_ns > before
    core.fs.rmdir(d.ino, b"s1")
    assert core.fs.getattr(d.ino).nlink == 3


# ---- 18. a relist waits for reads in progress -----------------------------------------------

def test_changed_waits_for_the_read_in_progress_then_drops_the_pages(core: Core) -> None:
    core.s3.put_object(Bucket=core.bucket, Key="r", Body=blob(2 * MiB, seed=9))
    core.relist()
    ino = core.node("r").ino
    fh = core.open("r")
    core.proxy.delay_next("get", 1, 1.5)
    reading = threading.Thread(target=lambda: core.read(fh, MiB))
    reading.start()
    while not core.fs._reading:
        threading.Event().wait(0.01)
    core.fs.changed([ino])  # returns once the read has finished
    assert not reading.is_alive() or core.fs._reading == {}
    reading.join(30)
    assert core.invalidated_now == [ino]
    assert errno_of(lambda: core.read(fh, 10)) == errno.ESTALE
    core.fs.release(fh)


# ---- 11. symlinks and modes made through another host ---------------------------------------

@pytest.mark.parametrize("mode", ["off", "small"])
def test_symlinks_and_modes_from_another_host(make_core, mode: str) -> None:
    here = make_core()
    here.fs.symlink(ROOT_INO, b"link", b"target/of/link", 1000, 1000)
    here.write_file("private", b"secret")
    here.fs.setattr(here.node("private").ino, mode=0o600)
    here.write_file("big", b"x" * 5000)
    here.fs.setattr(here.node("big").ino, mode=0o640)
    there = make_core(object_metadata=mode)  # another host: its own cache dir, a listing
    there.proxy.reset()
    link = there.fs.lookup(ROOT_INO, b"link")
    private = there.fs.lookup(ROOT_INO, b"private")
    big = there.fs.lookup(ROOT_INO, b"big")
    if mode == "off":  # documented: the listing carries no metadata
        assert stat.S_ISREG(link.mode) and stat.S_IMODE(private.mode) == 0o644
        assert there.proxy.requests["head"] == 0
    else:
        assert stat.S_ISLNK(link.mode) and link.uid == 1000
        assert there.fs.readlink(link.ino) == b"target/of/link"
        assert stat.S_ISREG(private.mode) and stat.S_IMODE(private.mode) == 0o600
        assert stat.S_IMODE(big.mode) == 0o644  # over 4 KiB: not asked
        assert there.proxy.requests["head"] == 2
        there.fs.lookup(ROOT_INO, b"link")
        assert there.proxy.requests["head"] == 2  # once per version


# ---- the kernel may keep names and attributes for the TTL: relists tell it what changed ------

def test_a_relist_tells_the_kernel_which_names_and_attributes_changed(core: Core) -> None:
    for key in ("d/gone", "d/stays", "d/touched"):
        core.s3.put_object(Bucket=core.bucket, Key=key, Body=b"same")
    core.relist()
    d = core.node("d").ino
    touched = core.node("d/touched")
    core.s3.delete_object(Bucket=core.bucket, Key="d/gone")
    while core.listing()[-1].mtime_ns == touched.mtime_ns:  # LastModified: whole seconds
        threading.Event().wait(0.2)
        core.s3.put_object(Bucket=core.bucket, Key="d/touched", Body=b"same")
    core.s3.put_object(Bucket=core.bucket, Key="d/sub/new", Body=b"x")     # d gains a subdir
    core.invalidated_now.clear()
    core.relist()
    assert core.invalidated_entries == [(d, b"gone")]
    assert d in core.invalidated_attrs  # its link count
    # The same version stored again (same ETag and size) is the same file: its record,
    # mtime included, stands, and nothing of it is dropped.
    assert core.node("d/touched") == touched
    assert touched.ino not in core.invalidated_attrs + core.invalidated_now


# ---- found by outside suites and clients (pjdfstest, tail -f, a proxy holding answers) ------

def test_a_reader_opened_before_local_appends_reads_them(core: Core) -> None:
    """tail -f while another process appends: the reader's handle follows what this host
    publishes (a handle left on the old version read short, the kernel then shrank the file
    and the next O_APPEND writer overwrote lines)."""
    core.write_file("log", b"start\n")
    ino = core.node("log").ino
    reader = core.open("log")
    pos = len(core.read(reader))
    expected = b"start\n"
    for n in range(3):
        line = f"line {n}\n".encode()
        fh = core.fs.open(ino, os.O_WRONLY | os.O_APPEND)
        core.fs.write(fh, core.fs.getattr(ino).size, line)
        core.close(fh)
        expected += line
        got = core.read(reader, 100, pos)
        assert got == line
        pos += len(got)
    core.fs.release(reader)
    assert core.origin("log") == expected


def test_renaming_a_file_being_written_publishes_nothing_before_close(core: Core) -> None:
    data = blob(2 * PART + MiB, seed=11)
    fh = core.create("ckpt.tmp")
    for pos in range(0, 2 * PART, MiB):
        core.fs.write(fh, pos, data[pos:pos + MiB])
    core.proxy.reset()
    core.fs.rename(ROOT_INO, b"ckpt.tmp", ROOT_INO, b"ckpt")
    assert core.proxy.requests["complete_multipart"] == 0 and core.proxy.requests["put"] == 0
    assert core.origin("ckpt") is None and core.origin("ckpt.tmp") is None
    for pos in range(2 * PART, len(data), MiB):
        core.fs.write(fh, pos, data[pos:pos + MiB])
    core.close(fh)
    assert core.origin("ckpt") == data and core.origin("ckpt.tmp") is None
    assert core.proxy.requests["get"] == 0  # nothing was downloaded back


def test_a_completion_whose_answer_is_lost_is_not_reported_failed(core: Core) -> None:
    data = blob(PART + MiB, seed=12)
    fh = core.create("lost-answer")
    for pos in range(0, len(data), MiB):
        core.fs.write(fh, pos, data[pos:pos + MiB])
    core.proxy.forward_then_fail("complete_multipart", 100, 500, "InternalError")
    core.close(fh)  # no EIO: the object is exactly the completion of our parts
    assert core.origin("lost-answer") == data
    assert core.read_file("lost-answer") == data


def test_chmod_rename_and_relists_keep_a_files_mtime(core: Core) -> None:
    core.write_file("f", b"content")
    ino = core.node("f").ino
    mtime = core.fs.getattr(ino).mtime_ns
    threading.Event().wait(1.1)  # the store's own times move on
    core.fs.setattr(ino, mode=0o600)
    assert core.fs.getattr(ino).mtime_ns == mtime
    core.fs.rename(ROOT_INO, b"f", ROOT_INO, b"g")
    assert core.fs.getattr(ino).mtime_ns == mtime
    core.relist()
    assert core.fs.getattr(core.node("g").ino).mtime_ns == mtime


def test_writes_to_an_unlinked_file_open_for_writing_keep_working(core: Core) -> None:
    core.s3.put_object(Bucket=core.bucket, Key="u", Body=b"0123456789")
    core.relist()
    ino = core.node("u").ino
    fh = core.open("u", os.O_RDWR)
    core.fs.unlink(ROOT_INO, b"u")
    core.fs.write(fh, 5, b"XY")
    assert core.read(fh) == b"01234XY789"
    assert core.fs.getattr(ino).nlink == 0
    core.close(fh)
    assert core.origin("u") is None


def test_a_setgid_directory_gives_its_group_to_new_entries(core: Core) -> None:
    d = core.fs.mkdir(ROOT_INO, b"shared", 0o2775, 0, 123)
    assert d.gid == 123 and d.mode & stat.S_ISGID
    fh, attrs = core.fs.create(d.ino, b"f", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    core.close(fh)
    assert attrs.gid == 123
    sub = core.fs.mkdir(d.ino, b"sub", 0o755, 0, 0)
    assert sub.gid == 123 and sub.mode & stat.S_ISGID


# ---- read performance features (issue 14) ---------------------------------------------------

def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        deadline.wait(0.05)
    raise AssertionError("condition not met in time")


def test_files_read_in_listing_order_are_fetched_ahead(core: Core) -> None:
    names = [f"d/f{i:03d}" for i in range(40)]
    for i, name in enumerate(names):
        core.s3.put_object(Bucket=core.bucket, Key=name, Body=bytes([i]) * 5000)
    core.relist()
    core.proxy.reset()
    for name in names[:4]:  # in order: from the third on, the next files are fetched ahead
        assert core.read_file(name)[:1] == bytes([int(name[-3:])])
    wait_until(lambda: core.proxy.requests["get"] >= 12)
    assert core.metrics.get("readahead_files_total") >= 8

    def gets_of(name: str) -> int:
        return sum(1 for kind, path, _ in list(core.proxy.log)
                   if kind == "get" and path.split("?")[0].endswith(f"/{name}"))

    ahead = [name for name in names[4:12] if gets_of(name)]
    assert len(ahead) >= 4, ahead  # fetched before anyone read them
    for name in names[4:12]:
        assert core.read_file(name)[:1] == bytes([int(name[-3:])])
    # Reading them fetched none of them again: one GET each, the readahead's (further
    # files may be fetched ahead meanwhile; they are not counted here).
    assert [gets_of(name) for name in names[4:12]] == [1] * 8


def test_a_random_reader_gets_the_whole_object_fetched(core: Core) -> None:
    data = blob(24 * MiB, seed=13)
    core.s3.put_object(Bucket=core.bucket, Key="index.bin", Body=data)
    core.relist()
    fh = core.open("index.bin")
    for page in (17, 3, 11):  # jumps
        assert core.read(fh, 4096, page * MiB + 100) == data[page * MiB + 100:page * MiB + 4196]
    version = core.fs.version_of(core.node("index.bin"))
    from objfs.cache.pagecache import PageState
    wait_until(lambda: all(core.fs.cache.state(version, i) is PageState.READY
                           for i in range(24)))
    assert core.proxy.body_bytes["get"] <= len(data) + 3 * MiB  # each page fetched ~once
    core.fs.release(fh)
