"""Local changes against a relist in progress, what a relist writes, and directory counts.

A relist's pages may have been fetched before a change this host made: the rename, unlink,
create or publish must win over them (issue 13, item 3). The listings are generators that
make the local change between two pages, which is exactly when a real relist would see it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from objfs.errors import NotFound
from objfs.store import ObjectInfo
from objfs.tree import ROOT_INO, MetadataTree
from tests.unit.test_tree import PREFIX, FakeClock, obj, open_tree, resolve, walk


def paused(pages: list[list[ObjectInfo]], after: int,
           action: Callable[[], None]) -> Iterator[list[ObjectInfo]]:
    """Yield ``pages``, running ``action`` after page number ``after`` (0-based)."""
    for n, page in enumerate(pages):
        yield page
        if n == after:
            action()


def names(tree: MetadataTree) -> set[str]:
    return set(walk(tree))


def test_a_directory_renamed_during_a_relist_keeps_its_new_name(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    tree.refresh(iter([[obj("d/a"), obj("d/b"), obj("z")]]))
    d = resolve(tree, "d")

    def rename() -> None:
        with tree.local_change(PREFIX + "d/", PREFIX + "e/"):
            tree.rename(d.ino, ROOT_INO, b"e")

    # The listing was taken before the rename: it still names d/a and d/b.
    tree.refresh(paused([[obj("d/a")], [obj("d/b"), obj("z")]], 0, rename))
    assert names(tree) == {"e", "e/a", "e/b", "z"}
    assert resolve(tree, "e").ino == d.ino
    # The next relist sees the origin after the rename.
    tree.refresh(iter([[obj("e/a"), obj("e/b"), obj("z")]]))
    assert names(tree) == {"e", "e/a", "e/b", "z"}


def test_an_unlink_during_a_relist_does_not_come_back(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    tree.refresh(iter([[obj("a"), obj("k")]]))
    k = resolve(tree, "k")

    def unlink() -> None:
        with tree.local_change(PREFIX + "k"):
            tree.remove(k.ino)

    tree.refresh(paused([[obj("a")], [obj("k")]], 0, unlink))
    assert names(tree) == {"a"}


def test_an_unlink_registered_only_by_the_tree_still_wins(tmp_path: Path) -> None:
    """Even without ``local_change`` around it, a removal during a relist is remembered."""
    tree = open_tree(tmp_path)
    tree.refresh(iter([[obj("a"), obj("k")]]))
    k = resolve(tree, "k")
    tree.refresh(paused([[obj("a")], [obj("k")]], 0, lambda: tree.remove(k.ino)))
    assert names(tree) == {"a"}


def test_a_publish_during_a_relist_is_not_reverted(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    tree.refresh(iter([[obj("k", size=1, etag='"old"')]]))
    changed: list[int] = []

    def publish() -> None:
        tree.upsert("k", size=2, etag='"new"', mtime_ns=1)

    tree.refresh(paused([[obj("a")], [obj("k", size=1, etag='"old"')]], 0, publish),
                 on_changed=changed.extend)
    assert resolve(tree, "k").etag == '"new"'
    assert changed == []  # nothing told open handles that k went back


def test_a_file_created_during_a_relist_is_not_swept(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    tree.refresh(iter([[obj("a")]]))
    tree.refresh(paused([[obj("a")], [obj("b")]], 0,
                        lambda: tree.upsert("new", size=3, etag='"n"', mtime_ns=1)))
    assert names(tree) == {"a", "b", "new"}


def test_a_change_in_progress_is_left_alone_by_a_later_relist(tmp_path: Path) -> None:
    """A long local change (a directory rename copying objects) that started before a relist
    protects its keys for that relist too, until it ends."""
    tree = open_tree(tmp_path)
    tree.refresh(iter([[obj("d/a"), obj("z")]]))
    with tree.local_change(PREFIX + "d/", PREFIX + "e/"):
        # Mid-copy: the origin has e/a already and d/a is gone.
        tree.refresh(iter([[obj("e/a"), obj("z")]]))
        assert names(tree) == {"d", "d/a", "z"}  # neither swept nor duplicated
    tree.refresh(iter([[obj("e/a"), obj("z")]]))
    assert names(tree) == {"e", "e/a", "z"}


def test_a_directory_holding_a_file_being_written_is_not_swept(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    tree.refresh(iter([[obj("d/old")]]))
    new = tree.upsert("d/new", size=0, etag="", mtime_ns=1)
    tree.pin(new.ino)
    tree.refresh(iter([[obj("z")]]))  # d/old was deleted at the origin meanwhile
    assert names(tree) == {"d", "d/new", "z"}


def test_relisting_an_unchanged_bucket_writes_no_records(tmp_path: Path) -> None:
    tree = open_tree(tmp_path)
    listing = [[obj(f"d{i % 10}/f{i}") for i in range(j, j + 1000)] for j in range(0, 5000, 1000)]
    tree.refresh(iter(listing))
    env = tree._env
    before = env.info()["last_txnid"]
    tree.refresh(iter(listing))
    # The generation and the listing time are written; no page writes a record.
    assert env.info()["last_txnid"] - before <= 3
    assert len(names(tree)) == 5010


def test_directory_link_counts_and_times_follow_local_changes(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    tree = open_tree(tmp_path, clock=clock)
    tree.refresh(iter([[obj("a/b/c"), obj("a/d/"), obj("a/e"), obj("f")]]))
    root, a = tree.get(ROOT_INO), resolve(tree, "a")
    assert (root.size, a.size) == (1, 2)  # subdirectories: root has a; a has b and d
    clock.now = 2_000.0
    tree.upsert("a/new", size=1, etag='"x"', mtime_ns=5)
    assert resolve(tree, "a").mtime_ns == 2_000 * 10**9
    clock.now = 3_000.0
    tree.upsert("a/sub", mtime_ns=7, is_dir=True)
    a = resolve(tree, "a")
    assert (a.size, a.mtime_ns) == (3, 3_000 * 10**9)
    clock.now = 4_000.0
    tree.remove(resolve(tree, "a/d").ino)
    a = resolve(tree, "a")
    assert (a.size, a.mtime_ns) == (2, 4_000 * 10**9)
    clock.now = 5_000.0
    tree.rename(resolve(tree, "a/sub").ino, ROOT_INO, b"moved")
    assert resolve(tree, "a").size == 1 and tree.get(ROOT_INO).size == 2
    assert tree.get(ROOT_INO).mtime_ns == resolve(tree, "a").mtime_ns == 5_000 * 10**9
    # A relist (of what the origin now holds) keeps the counts and the newer local times.
    tree.refresh(iter([[obj("a/b/c"), obj("a/e"), obj("a/new"), obj("moved/"), obj("f")]]))
    assert resolve(tree, "a").size == 1 and tree.get(ROOT_INO).size == 2
    assert resolve(tree, "a").mtime_ns == 5_000 * 10**9  # a lost sub at 5000
    try:
        resolve(tree, "a/d")
        raise AssertionError("a/d should be gone")
    except NotFound:
        pass
