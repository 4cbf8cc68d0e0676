"""Unit tests of ``objfs.tree.MetadataTree``: no mount, no network, a real LMDB in tmp_path.

The tree is fed listings as the store would produce them (pages of ``ObjectInfo`` with full
keys under the mount prefix) and inspected only through its reader API. The Hypothesis tests
compare it with ``model_tree``, a dict-based model of the documented semantics written here.
"""

from __future__ import annotations

import errno
import itertools
import random
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, rule
from hypothesis import strategies as st

from objfs.errors import NotFound
from objfs.store import ObjectInfo
from objfs.tree import ROOT_INO, Inode, Kind, MetadataTree, RefreshStats

PREFIX = "data/"
IDENTITY = "http://127.0.0.1:9000|us-east-1|bkt|data/"
MTIME_NS = 1_700_000_000_000_000_000

Walk = dict[str, tuple[str, int, str]]  # relpath (no trailing '/') -> (kind, size, etag)


# ---- helpers --------------------------------------------------------------------------------

def obj(rel: str, size: int = 1, etag: str | None = None, mtime_ns: int = MTIME_NS) -> ObjectInfo:
    """An object listed under the mount prefix; ``rel`` ending with '/' is a marker."""
    if etag is None:
        etag = f'"{size:x}-{len(rel)}"'
    return ObjectInfo(PREFIX + rel, 0 if rel.endswith("/") else size, etag, mtime_ns)


def pages_of(objs: list[ObjectInfo], per_page: int = 1000) -> list[list[ObjectInfo]]:
    return [objs[i:i + per_page] for i in range(0, len(objs), per_page)]


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_tree(path: Path, identity: str = IDENTITY, clock: FakeClock | None = None) -> MetadataTree:
    return MetadataTree(path, prefix=PREFIX, identity=identity, clock=clock or FakeClock())


def resolve(tree: MetadataTree, relpath: str) -> Inode:
    """Look ``relpath`` up segment by segment from the root, as the kernel would."""
    node = tree.get(ROOT_INO)
    for segment in relpath.split("/"):
        node = tree.lookup(node.ino, segment.encode())
    return node


def walk(tree: MetadataTree) -> Walk:
    """Every visible entry, found through readdir, cross-checked against lookup and get."""
    out: Walk = {}
    pending: list[tuple[int, str]] = [(ROOT_INO, "")]
    while pending:
        ino, path = pending.pop()
        names = []
        for entry in tree.readdir(ino):
            names.append(entry.name)
            child = tree.get(entry.ino)
            assert child.kind is entry.kind
            assert child.parent == ino
            assert tree.lookup(ino, entry.name) == child
            rel = path + entry.name.decode()
            assert child.relpath == (rel + "/" if child.is_dir else rel)
            if child.is_dir:
                out[rel] = ("dir", 0, "")
                pending.append((child.ino, rel + "/"))
            else:
                out[rel] = ("file", child.size, child.etag)
        assert names == sorted(names), "readdir is not in byte order"
    return out


def refresh(tree: MetadataTree, objs: Iterable[ObjectInfo] | list[list[ObjectInfo]],
            scope: str = "", changed: list[int] | None = None) -> RefreshStats:
    items = list(objs)
    pages = items if items and isinstance(items[0], list) else pages_of(items)
    return tree.refresh(iter(pages), scope=scope,
                        on_changed=(changed.extend if changed is not None else None))


# ---- the reference model --------------------------------------------------------------------

def model_valid(path: str) -> bool:
    return all(seg not in ("", ".", "..") and "\0" not in seg and len(seg.encode()) <= 255
               for seg in path.split("/"))


def model_split(keys: dict[str, tuple[int, str]]) -> tuple[set[str], dict[str, tuple[int, str]]]:
    """Directories and file objects (visible or hidden) that a set of full keys describes."""
    dirs: set[str] = set()
    files: dict[str, tuple[int, str]] = {}
    for key, (size, etag) in keys.items():
        if not key.startswith(PREFIX):
            continue
        rel = key[len(PREFIX):]
        if rel == "":
            continue
        marker = rel.endswith("/")
        path = rel[:-1] if marker else rel
        if not model_valid(path):
            continue
        segments = path.split("/")
        dirs.update("/".join(segments[:i]) for i in range(1, len(segments)))
        if marker:
            dirs.add(path)
        else:
            files[path] = (size, etag)
    return dirs, files


def model_tree(keys: dict[str, tuple[int, str]]) -> Walk:
    """Directories from prefixes and markers; a file and a directory of one name: the dir."""
    dirs, files = model_split(keys)
    out: Walk = {d: ("dir", 0, "") for d in dirs}
    for path, (size, etag) in files.items():
        if path not in dirs:
            out[path] = ("file", size, etag)
    return out


def model_hidden(keys: dict[str, tuple[int, str]]) -> int:
    dirs, files = model_split(keys)
    return sum(1 for path in files if path in dirs)


def as_objects(keys: dict[str, tuple[int, str]]) -> list[ObjectInfo]:
    return [ObjectInfo(k, size, etag, MTIME_NS) for k, (size, etag) in keys.items()]


# ---- building ------------------------------------------------------------------------------

def test_nested_keys_infer_directories_and_strip_prefix(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("x/y/z.bin", 7), obj("x/top", 3), obj("root.txt", 5)])
    assert walk(tree) == {
        "x": ("dir", 0, ""),
        "x/y": ("dir", 0, ""),
        "x/y/z.bin": ("file", 7, obj("x/y/z.bin", 7).etag),
        "x/top": ("file", 3, obj("x/top", 3).etag),
        "root.txt": ("file", 5, obj("root.txt", 5).etag),
    }
    node = resolve(tree, "x/y/z.bin")
    assert node.relpath == "x/y/z.bin"  # the prefix "data/" is not part of it
    with pytest.raises(NotFound):
        tree.lookup(ROOT_INO, b"data")
    assert tree.count() == 1 + 5


def test_markers_are_directories_even_when_empty(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    marker_mtime = MTIME_NS + 123
    stats = refresh(tree, [obj("empty/", mtime_ns=marker_mtime), obj("m/"), obj("m/f", 2)])
    assert walk(tree) == {"empty": ("dir", 0, ""), "m": ("dir", 0, ""),
                          "m/f": ("file", 2, obj("m/f", 2).etag)}
    empty = resolve(tree, "empty")
    assert empty.is_dir and list(tree.readdir(empty.ino)) == []
    assert empty.mtime_ns == marker_mtime
    assert stats.skipped_invalid == 0


def test_prefix_own_marker_is_ignored(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    stats = refresh(tree, [ObjectInfo(PREFIX, 0, '"d41d8"', MTIME_NS), obj("f")])
    assert walk(tree) == {"f": ("file", 1, obj("f").etag)}
    assert stats.skipped_invalid == 0
    assert tree.count() == 2


@pytest.mark.parametrize("rel", [
    "a//b",
    "./x",
    "a/./x",
    "a/../b",
    "..",
    "/lead",
    "trail//",
    "a\0b",
    "d/" + "x" * 256,
    "é" * 128,  # 128 characters, 256 bytes
])
def test_invalid_keys_are_skipped_and_counted(tmp_path: Path, rel: str) -> None:
    tree = open_tree(tmp_path)
    stats = refresh(tree, [obj("ok", 1), obj(rel, 9)])
    assert stats.skipped_invalid == 1
    assert walk(tree) == {"ok": ("file", 1, obj("ok", 1).etag)}
    assert tree.count() == 2  # no directory was made on the way to the bad segment


def test_name_length_limit_counts_bytes(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    ascii_255 = "y" * 255
    utf8_255 = "é" * 127 + "a"  # 128 characters, 255 bytes
    stats = refresh(tree, [obj(ascii_255, 1), obj("d/" + utf8_255, 2), obj("é" * 128, 3)])
    assert stats.skipped_invalid == 1
    assert resolve(tree, ascii_255).size == 1
    assert resolve(tree, "d/" + utf8_255).size == 2
    assert tree.lookup(ROOT_INO, ascii_255.encode()).relpath == ascii_255


def test_key_longer_than_lmdb_key_limit(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    rel = "/".join(["s" * 60] * 12) + "/" + "f" * 200  # ~930 bytes, 13 segments
    assert len((PREFIX + rel).encode()) > 511
    stats = refresh(tree, [obj(rel, 42)])
    assert stats.skipped_invalid == 0
    node = resolve(tree, rel)
    assert (node.kind, node.size, node.relpath) == (Kind.FILE, 42, rel)
    # And it survives a second refresh (found again through its dentries, not re-added).
    stats = refresh(tree, [obj(rel, 42)])
    assert (stats.added, stats.removed) == (0, 0)
    assert resolve(tree, rel).ino == node.ino


# ---- file/directory conflicts --------------------------------------------------------------

def test_directory_wins_then_file_comes_back(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("a", 10), obj("a/b", 2)])
    assert walk(tree) == {"a": ("dir", 0, ""), "a/b": ("file", 2, obj("a/b", 2).etag)}
    refresh(tree, [obj("a", 10)])
    assert walk(tree) == {"a": ("file", 10, obj("a", 10).etag)}
    assert resolve(tree, "a").size == 10


def test_directory_first_then_same_named_file(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("a/b", 2)])
    assert resolve(tree, "a").is_dir
    # The file appears while the directory still exists: the directory still wins.
    refresh(tree, [obj("a/b", 2), obj("a", 10)])
    assert walk(tree) == {"a": ("dir", 0, ""), "a/b": ("file", 2, obj("a/b", 2).etag)}
    # The directory goes away: the file shows.
    refresh(tree, [obj("a", 10)])
    assert walk(tree) == {"a": ("file", 10, obj("a", 10).etag)}


def test_file_replaced_by_directory_in_one_refresh_and_back(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("a", 10)])
    file_ino = resolve(tree, "a").ino
    refresh(tree, [obj("a/b", 2)])  # the file is gone, a directory took its name
    assert walk(tree) == {"a": ("dir", 0, ""), "a/b": ("file", 2, obj("a/b", 2).etag)}
    with pytest.raises(NotFound):
        tree.get(file_ino)
    refresh(tree, [obj("a", 11)])
    assert walk(tree) == {"a": ("file", 11, obj("a", 11).etag)}
    assert tree.count() == 2


def test_hidden_file_keeps_its_inode(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("a", 10)])
    file_ino = resolve(tree, "a").ino
    refresh(tree, [obj("a", 10), obj("a/b", 2)])
    assert resolve(tree, "a").is_dir
    refresh(tree, [obj("a", 10)])
    assert resolve(tree, "a").ino == file_ino


# ---- refresh: stability, changes, deletions ------------------------------------------------

def test_inode_numbers_stable_across_refreshes_and_reopen(tmp_path: Path) -> None:
    objs = [obj("d/e/f", 1), obj("d/g", 2), obj("m/"), obj("top", 3)]
    tree = open_tree(tmp_path)
    refresh(tree, objs)
    paths = ["d", "d/e", "d/e/f", "d/g", "m", "top"]
    inos = {p: resolve(tree, p).ino for p in paths}
    assert len(set(inos.values())) == len(paths)
    stats = refresh(tree, list(reversed(objs)))
    assert (stats.added, stats.changed, stats.removed) == (0, 0, 0)
    assert {p: resolve(tree, p).ino for p in paths} == inos
    tree.close()

    tree = open_tree(tmp_path)
    assert tree.listed_at() is not None
    assert {p: resolve(tree, p).ino for p in paths} == inos  # served before any refresh
    refresh(tree, objs + [obj("new", 4)])
    assert {p: resolve(tree, p).ino for p in paths} == inos
    # Numbers are never reused: the new entry gets a number no earlier entry had.
    assert resolve(tree, "new").ino > max(inos.values())
    tree.close()


def test_changed_etag_or_size_is_reported(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("same", 1, '"e1"'), obj("etag", 1, '"e1"'), obj("size", 1, '"e1"'),
                   obj("mtime", 1, '"e1"')])
    inos = {p: resolve(tree, p).ino for p in ("same", "etag", "size", "mtime")}
    changed: list[int] = []
    stats = refresh(tree, [obj("same", 1, '"e1"'), obj("etag", 1, '"e2"'),
                           obj("size", 2, '"e1"'), obj("mtime", 1, '"e1"', MTIME_NS + 5)],
                    changed=changed)
    assert sorted(changed) == sorted([inos["etag"], inos["size"]])
    assert stats.changed == 2
    assert (resolve(tree, "etag").etag, resolve(tree, "size").size) == ('"e2"', 2)
    # The same version listed with another LastModified (stored again, copied) keeps the
    # mtime it has: the listing's time is when it was stored, not when it was written.
    assert resolve(tree, "mtime").mtime_ns == MTIME_NS
    assert {p: resolve(tree, p).ino for p in inos} == inos


def test_changing_is_announced_before_the_tree_shows_it_then_changed_after(
        tmp_path: Path) -> None:
    """The mount holds opens of a file between the two calls (fs.changing/changed): the
    first must come while readers still see the old version, the second once they see the
    new one."""
    tree = open_tree(tmp_path)
    refresh(tree, [obj("a", 1, '"e1"'), obj("b", 1, '"e1"')])
    ino = resolve(tree, "a").ino
    events: list[tuple[str, list[int], str]] = []
    tree.refresh(iter([[obj("a", 1, '"e2"'), obj("b", 1, '"e1"')]]),
                 on_changing=lambda inos: events.append(("changing", inos, tree.get(ino).etag)),
                 on_changed=lambda inos: events.append(("changed", inos, tree.get(ino).etag)))
    assert events == [("changing", [ino], '"e1"'), ("changed", [ino], '"e2"')]


def test_changed_follows_changing_even_if_the_page_fails_to_apply(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("a", 1, '"e1"')])
    ino = resolve(tree, "a").ino
    changed: list[int] = []

    def refuse(inos: list[int]) -> None:
        raise OSError(errno.EIO, "refused")

    with pytest.raises(OSError):
        tree.refresh(iter([[obj("a", 1, '"e2"')]]), on_changing=refuse,
                     on_changed=changed.extend)
    assert changed == [ino]                  # whoever waits on on_changing is let go
    assert resolve(tree, "a").etag == '"e1"'  # the page was not applied


def test_deleted_keys_are_removed_and_reported(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("keep", 1), obj("gone", 1), obj("p/q/r", 1), obj("m/"), obj("m/x", 1)])
    gone = {p: resolve(tree, p).ino for p in ("gone", "p", "p/q", "p/q/r", "m/x")}
    changed: list[int] = []
    stats = refresh(tree, [obj("keep", 1), obj("m/")], changed=changed)
    assert sorted(changed) == sorted(gone.values())
    assert stats.removed == len(gone)
    for ino in gone.values():
        with pytest.raises(NotFound):
            tree.get(ino)
    with pytest.raises(NotFound) as excinfo:
        tree.lookup(ROOT_INO, b"gone")
    assert excinfo.value.errno == errno.ENOENT
    with pytest.raises(NotFound):
        tree.lookup(ROOT_INO, b"p")  # inferred directory without children disappears
    # The marker directory stays while its marker exists, even with no children...
    assert walk(tree) == {"keep": ("file", 1, obj("keep", 1).etag), "m": ("dir", 0, "")}
    # ...and goes with it.
    refresh(tree, [obj("keep", 1)])
    assert walk(tree) == {"keep": ("file", 1, obj("keep", 1).etag)}
    assert tree.count() == 2


def test_failed_listing_sweeps_nothing(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    tree = open_tree(tmp_path, clock=clock)
    refresh(tree, [obj("a", 1), obj("b", 1), obj("c/d", 1)])
    assert tree.listed_at() == 1_000.0
    before = walk(tree)
    clock.now = 2_000.0

    def broken_pages() -> Iterator[list[ObjectInfo]]:
        yield [obj("a", 1)]
        raise ConnectionError("listing broke")

    changed: list[int] = []
    with pytest.raises(ConnectionError):
        tree.refresh(broken_pages(), on_changed=changed.extend)
    assert walk(tree) == before
    assert changed == []
    assert tree.listed_at() == 1_000.0  # not a complete listing
    # The next complete listing sweeps as usual.
    refresh(tree, [obj("a", 1)])
    assert walk(tree) == {"a": ("file", 1, obj("a", 1).etag)}
    assert tree.listed_at() == 2_000.0


def test_subtree_refresh_only_touches_its_scope(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    tree = open_tree(tmp_path, clock=clock)
    refresh(tree, [obj("d1/x", 1), obj("d1/y", 1), obj("d1/s/z", 1), obj("d10/x", 1),
                   obj("d2/z", 1), obj("top", 1)])
    clock.now = 2_000.0
    changed: list[int] = []
    y_ino = resolve(tree, "d1/y").ino
    stats = refresh(tree, [obj("d1/x", 5), obj("d1/new", 1)], scope="d1/", changed=changed)
    assert walk(tree) == {
        "d1": ("dir", 0, ""),
        "d1/x": ("file", 5, obj("d1/x", 5).etag),
        "d1/new": ("file", 1, obj("d1/new", 1).etag),
        "d10": ("dir", 0, ""),
        "d10/x": ("file", 1, obj("d10/x", 1).etag),
        "d2": ("dir", 0, ""),
        "d2/z": ("file", 1, obj("d2/z", 1).etag),
        "top": ("file", 1, obj("top", 1).etag),
    }
    assert stats.removed == 3  # d1/y, d1/s, d1/s/z
    assert y_ino in changed
    assert tree.listed_at() == 1_000.0  # only a full listing sets it
    with pytest.raises(ValueError):
        tree.refresh(iter([]), scope="d1")


# ---- readdir -------------------------------------------------------------------------------

def test_readdir_byte_order_and_resume(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    names = ["b", "a-b", "a", "A", "a.b", "é", "z", "a0"]
    refresh(tree, [obj("a/sub", 1)] + [obj("d/" + n, 1) for n in names])
    d = resolve(tree, "d").ino
    expected = sorted(n.encode() for n in names)
    assert [e.name for e in tree.readdir(d)] == expected
    for i, name in enumerate(expected):
        assert [e.name for e in tree.readdir(d, after=name)] == expected[i + 1:]
    # Resuming after a name that no longer exists continues at the next greater name.
    assert [e.name for e in tree.readdir(d, after=b"a1")] == [n for n in expected if n > b"a1"]
    assert list(tree.readdir(d, after=expected[-1])) == []
    # Entries carry their kind; other directories' children never leak in.
    root = {e.name: e.kind for e in tree.readdir(ROOT_INO)}
    assert root == {b"a": Kind.DIR, b"d": Kind.DIR}
    assert list(tree.readdir(resolve(tree, "d/b").ino)) == []


def test_readdir_streams_5000_entries(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    names = [f"f{i:05d}" for i in range(5000)]
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    refresh(tree, [obj("big/" + n, i) for i, n in enumerate(shuffled)])
    big = resolve(tree, "big").ino
    entries = list(tree.readdir(big))
    assert [e.name.decode() for e in entries] == names
    assert all(e.kind is Kind.FILE for e in entries)
    assert len({e.ino for e in entries}) == 5000
    resumed: list[bytes] = []
    after = None
    while True:
        chunk = [e.name for e in itertools.islice(tree.readdir(big, after), 333)]
        if not chunk:
            break
        resumed.extend(chunk)
        after = chunk[-1]
    assert resumed == [e.name for e in entries]


def test_readdir_resume_costs_one_seek(tmp_path: Path) -> None:
    # 20,000 entries read 100 at a time: 200 resumes. With a seek each this is ~20k steps; a
    # resume that rescans from the start of the directory would be ~2M steps (seconds).
    tree = open_tree(tmp_path)
    n = 20_000
    refresh(tree, [obj(f"big/f{i:06d}", 1) for i in range(n)])
    big = resolve(tree, "big").ino
    t0 = time.perf_counter()
    seen = 0
    after = None
    while True:
        chunk = [e.name for e in itertools.islice(tree.readdir(big, after), 100)]
        if not chunk:
            break
        seen += len(chunk)
        after = chunk[-1]
    elapsed = time.perf_counter() - t0
    assert seen == n
    assert elapsed < 1.0, f"resuming readdir took {elapsed:.2f}s"


# ---- identity ------------------------------------------------------------------------------

def test_identity_change_rebuilds_an_empty_tree(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    refresh(tree, [obj("a/b", 1)])
    assert tree.listed_at() is not None
    tree.close()
    tree = open_tree(tmp_path, identity="aws|us-east-1|other|")
    assert tree.listed_at() is None
    assert tree.count() == 1
    assert list(tree.readdir(ROOT_INO)) == []
    assert tree.get(ROOT_INO).is_dir
    refresh(tree, [obj("c", 1)])
    assert walk(tree) == {"c": ("file", 1, obj("c", 1).etag)}
    tree.close()
    # Same identity again: kept.
    tree = open_tree(tmp_path, identity="aws|us-east-1|other|")
    assert walk(tree) == {"c": ("file", 1, obj("c", 1).etag)}
    tree.close()


# ---- model-based: listing order and paging do not matter -----------------------------------

# Few distinct segments so that keys collide: conflicts (a and a/b), markers of existing dirs,
# names that sort differently by byte and by '/' position ("a-b" < "a/b" < "a0"), and invalid
# segments ("", ".", "..").
_SEGMENT = st.sampled_from(["a", "b", "a-b", "a0", "é", "", ".", ".."])
_REL = st.builds(lambda segs, marker: "/".join(segs) + ("/" if marker else ""),
                 st.lists(_SEGMENT, min_size=1, max_size=3), st.booleans())
_KEY = st.one_of(_REL.map(lambda rel: PREFIX + rel), st.just(PREFIX))
_VALUE = st.tuples(st.integers(0, 3), st.sampled_from(['"e1"', '"e2"']))
_KEYS = st.dictionaries(_KEY, _VALUE, max_size=25)


def _paged(data: st.DataObject, objs: list[ObjectInfo]) -> list[list[ObjectInfo]]:
    """``objs`` in shuffled order, split into pages of random sizes (empty pages included)."""
    order = data.draw(st.permutations(objs))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=6)))
    bounds = [0, *cuts, len(order)]
    return [order[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


# Examples make their own trees; on tmpfs the fsyncs of each refresh cost nothing.
_EXAMPLE_TMP = "/dev/shm" if Path("/dev/shm").is_dir() else None

_SETTINGS = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(keys=_KEYS, data=st.data())
def test_any_listing_order_builds_the_model_tree(keys: dict[str, tuple[int, str]],
                                                 data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(dir=_EXAMPLE_TMP) as tmp:
        tree = open_tree(Path(tmp))
        try:
            stats = tree.refresh(iter(_paged(data, as_objects(keys))))
            expected = model_tree(keys)
            assert walk(tree) == expected
            assert tree.count() == 1 + len(expected) + model_hidden(keys)
            assert stats.objects == len(keys)
        finally:
            tree.close()


@_SETTINGS
@given(first=_KEYS, second=_KEYS, data=st.data())
def test_refresh_after_refresh_matches_the_model(first: dict[str, tuple[int, str]],
                                                 second: dict[str, tuple[int, str]],
                                                 data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(dir=_EXAMPLE_TMP) as tmp:
        tree = open_tree(Path(tmp))
        try:
            tree.refresh(iter(_paged(data, as_objects(first))))
            before = {p: resolve(tree, p) for p in model_tree(first)}
            reported: list[int] = []
            tree.refresh(iter(_paged(data, as_objects(second))), on_changed=reported.extend)
            expected = model_tree(second)
            assert walk(tree) == expected
            # No leaked records: every inode is the root, a visible entry or a hidden file.
            assert tree.count() == 1 + len(expected) + model_hidden(second)
            for path, old in before.items():
                kind = "dir" if old.is_dir else "file"
                if path in expected and expected[path][0] == kind:
                    assert resolve(tree, path).ino == old.ino, f"{path} changed inode"
                if kind == "file":
                    if PREFIX + path not in second:
                        assert old.ino in reported, f"deleted {path} not reported"
                    elif second[PREFIX + path] != (old.size, old.etag):
                        assert old.ino in reported, f"changed {path} not reported"
        finally:
            tree.close()


class TreeMachine(RuleBasedStateMachine):
    """Random sequences of complete listings, broken listings and restarts against the model.

    The model is the set of keys the tree has seen: a complete listing replaces it, a listing
    that breaks after some pages only adds (a partial listing never deletes).
    """

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(dir=_EXAMPLE_TMP)
        self.tree = open_tree(Path(self._tmp.name))
        self.keys: dict[str, tuple[int, str]] = {}
        self.inos: dict[str, tuple[str, int]] = {}  # visible path -> (kind, ino)

    def _settle(self, reported: list[int], old_keys: dict[str, tuple[int, str]]) -> None:
        expected = model_tree(self.keys)
        assert walk(self.tree) == expected
        assert self.tree.count() == 1 + len(expected) + model_hidden(self.keys)
        inos = {p: (kind, resolve(self.tree, p).ino) for p, (kind, _, _) in expected.items()}
        for path, (kind, ino) in self.inos.items():
            if path in inos and inos[path][0] == kind:
                assert inos[path][1] == ino, f"{path} changed inode"
            if kind == "file":
                new = self.keys.get(PREFIX + path)
                if new is None or new != old_keys[PREFIX + path]:
                    assert ino in reported, f"deleted or changed {path} not reported"
        self.inos = inos

    @rule(keys=_KEYS, data=st.data())
    def complete_listing(self, keys: dict[str, tuple[int, str]], data: st.DataObject) -> None:
        reported: list[int] = []
        self.tree.refresh(iter(_paged(data, as_objects(keys))), on_changed=reported.extend)
        old, self.keys = self.keys, dict(keys)
        self._settle(reported, old)
        assert self.tree.listed_at() is not None

    @rule(keys=_KEYS, data=st.data())
    def broken_listing(self, keys: dict[str, tuple[int, str]], data: st.DataObject) -> None:
        pages = _paged(data, as_objects(keys))
        applied = data.draw(st.integers(0, len(pages)))

        def broken() -> Iterator[list[ObjectInfo]]:
            yield from pages[:applied]
            raise TimeoutError("listing broke")

        reported: list[int] = []
        with pytest.raises(TimeoutError):
            self.tree.refresh(broken(), on_changed=reported.extend)
        old = dict(self.keys)
        self.keys.update((o.key, (o.size, o.etag)) for page in pages[:applied] for o in page)
        self._settle(reported, old)

    @rule()
    def restart(self) -> None:
        self.tree.close()
        self.tree = open_tree(Path(self._tmp.name))
        self._settle([], self.keys)

    def teardown(self) -> None:
        self.tree.close()
        self._tmp.cleanup()


TreeMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=8, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_tree_state_machine = TreeMachine.TestCase
