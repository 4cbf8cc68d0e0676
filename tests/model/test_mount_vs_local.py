"""A real read-write mount against a local directory: the same random operations on both.

A Hypothesis state machine creates, writes, appends, overwrites in place, truncates, reads,
stats, lists, renames and removes small files and directories on a small set of paths (so
operations collide: a name is a file in one step and a directory in the next), on the mount
and on a local temp directory, and compares every result and every errno. After each example
the two trees are compared whole, and with the origin: every file of the local tree is an
object with the same bytes, every directory a marker or a prefix, and nothing else exists.

Relists happen at random points (``objfs refresh``: local changes must survive a relist, and
a relist must not make anything stale), and files are read while they are still being
written (another descriptor sees what was written so far). The machine runs against moto and
against SeaweedFS, the embedded default origin, whose answers differ (unquoted ETags after a
copy, no copy of keys ending with '/'). One mount per server serves the whole run; each
example starts from empty trees on both sides.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, rule,
                                 run_state_machine_as_test)

from tests.conftest import OBJFS, Mount, Mounter

PATHS = ["a", "b", "d", "e", "d/a", "d/b", "d/e", "e/a", "d/e/a", "d/e/b"]
payloads = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"x" * 5000]))
offsets = st.integers(min_value=0, max_value=6000)

# Shrinking replays many sequences against a real mount (minutes); the unshrunk failing
# steps are printed anyway. OBJFS_MODEL_SHRINK=1 turns it on to minimise a failure.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("OBJFS_MODEL_SHRINK") == "1":
    _PHASES.append(Phase.shrink)


@pytest.fixture(scope="module", params=["moto", "seaweed"])
def model_mount(request, tmp_path_factory) -> Iterator[tuple[Mount, Any, str]]:
    endpoint = request.getfixturevalue("s3_endpoint" if request.param == "moto"
                                       else "seaweed_endpoint")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"model-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    mounter = Mounter(tmp_path_factory.mktemp("model"), endpoint)
    try:
        yield mounter(f"s3://{bucket}"), s3, bucket
    finally:
        mounter.cleanup()


def outcome(action: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", action()
    except OSError as exc:
        return "errno", errno.errorcode.get(exc.errno, exc.errno)


def clear(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def tree(root: Path) -> dict[str, bytes | None]:
    """relpath -> bytes (files) or None (directories)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = None
        for f in filenames:
            out[os.path.normpath(os.path.join(rel, f))] = Path(dirpath, f).read_bytes()
    return out


class MountVsLocal(RuleBasedStateMachine):
    mount: Mount
    s3: Any
    bucket: str
    local_root: Path

    def __init__(self) -> None:
        super().__init__()
        clear(self.mount.path)
        clear(self.local_root)
        self.roots = (self.mount.path, self.local_root)

    def pick(self, data: st.DataObject, kind: str | None = None) -> str:
        """Mostly a path that exists (a file or a directory, as asked), else any path."""
        existing = [rel for rel, content in tree(self.local_root).items()
                    if kind is None or (kind == "f") == (content is not None)]
        if existing and data.draw(st.integers(0, 9), label="existing?") < 7:
            return data.draw(st.sampled_from(sorted(existing)), label="path")
        return data.draw(st.sampled_from(PATHS), label="path")

    @initialize()
    def start(self) -> None:
        self.same(lambda root: os.mkdir(root / "d"))
        self.same(lambda root: (root / "a").write_bytes(b"first"))

    def same(self, op: Callable[[Path], Any]) -> Any:
        """Run ``op`` on both roots; results (or errnos) must be equal."""
        got, want = (outcome(lambda root=root: op(root)) for root in self.roots)
        assert got == want, f"mount {got} != local {want}"
        return want

    @rule(data=st.data(), content=payloads)
    def write_file(self, data: st.DataObject, content: bytes) -> None:
        path = self.pick(data)
        self.same(lambda root: (root / path).write_bytes(content))

    @rule(data=st.data(), content=payloads)
    def append(self, data: st.DataObject, content: bytes) -> None:
        path = self.pick(data, "f")

        def op(root: Path) -> None:
            with open(root / path, "ab") as f:
                f.write(content)
        self.same(op)

    @rule(data=st.data(), content=payloads, offset=offsets)
    def write_in_place(self, data: st.DataObject, content: bytes, offset: int) -> None:
        path = self.pick(data, "f")

        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                os.pwrite(fd, content, offset)
            finally:
                os.close(fd)
        self.same(op)

    @rule(data=st.data(), length=offsets)
    def truncate(self, data: st.DataObject, length: int) -> None:
        path = self.pick(data, "f")
        self.same(lambda root: os.truncate(root / path, length))

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        path = self.pick(data, "f")
        self.same(lambda root: (root / path).read_bytes())

    @rule(data=st.data(), offset=offsets, size=st.integers(min_value=0, max_value=7000))
    def pread(self, data: st.DataObject, offset: int, size: int) -> None:
        path = self.pick(data, "f")

        def op(root: Path) -> bytes:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        self.same(op)

    @rule(data=st.data())
    def stat(self, data: st.DataObject) -> None:
        path = self.pick(data)

        def op(root: Path) -> tuple[str, int, int]:
            st_ = os.stat(root / path)
            kind = "d" if stat.S_ISDIR(st_.st_mode) else "f"
            return kind, stat.S_IMODE(st_.st_mode), st_.st_size if kind == "f" else 0
        self.same(op)

    @rule(path=st.sampled_from(["", *PATHS]))
    def listdir(self, path: str) -> None:
        self.same(lambda root: sorted(os.listdir(root / path)))

    @rule(path=st.sampled_from(PATHS))
    def mkdir(self, path: str) -> None:
        self.same(lambda root: os.mkdir(root / path))

    @rule()
    def relist(self) -> None:
        """A relist of the origin now (on the mount; the local directory has nothing to do)."""
        result = subprocess.run([OBJFS, "refresh", str(self.mount.path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr

    @rule(data=st.data(), first=payloads, second=payloads)
    def read_while_writing(self, data: st.DataObject, first: bytes, second: bytes) -> None:
        """Another descriptor reads a file while it is being written."""
        path = self.pick(data)

        def op(root: Path) -> tuple[bytes, bytes]:
            fd = os.open(root / path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, first)
                with open(root / path, "rb") as reader:
                    seen_first = reader.read()
                os.write(fd, second)
                with open(root / path, "rb") as reader:
                    seen_both = reader.read()
            finally:
                os.close(fd)
            return seen_first, seen_both
        self.same(op)

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.pick(data, "d")
        self.same(lambda root: os.rmdir(root / path))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.pick(data, "f")
        self.same(lambda root: os.unlink(root / path))

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        src = self.pick(data)
        dst = self.pick(data)
        self.same(lambda root: os.rename(root / src, root / dst))

    def teardown(self) -> None:
        local = tree(self.local_root)
        assert tree(self.mount.path) == local
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        keys = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
        files = {rel for rel, data in local.items() if data is not None}
        dirs = {rel for rel, data in local.items() if data is None}
        assert {k for k in keys if not k.endswith("/")} == files
        for rel in files:
            body = self.s3.get_object(Bucket=self.bucket, Key=rel)["Body"].read()
            assert body == local[rel], rel
        # Directories made by mkdir have markers; no marker outlives its directory.
        assert {k[:-1] for k in keys if k.endswith("/")} <= dirs


def test_mount_behaves_like_a_local_directory(model_mount, tmp_path) -> None:
    mount, s3, bucket = model_mount
    local = tmp_path / "local"
    local.mkdir()
    MountVsLocal.mount, MountVsLocal.s3, MountVsLocal.bucket = mount, s3, bucket
    MountVsLocal.local_root = local
    run_state_machine_as_test(MountVsLocal, settings=settings(
        max_examples=20, stateful_step_count=25, deadline=None, phases=_PHASES,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture]))
