"""The filesystem core without a mount: ``Filesystem`` over a real store on a real S3 server.

Races between a relist, a release and the next open can only be driven deterministically
here: the tests call the core's methods from threads they control, hold requests at the
proxy, and pause listings between pages. What the kernel would do (invalidate its cache) is
recorded instead of done.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import boto3
import pytest

from objfs.config import MiB, MountConfig, RetryConfig, StoreConfig
from objfs.daemon import open_page_cache
from objfs.fs import Filesystem
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from objfs.store import ObjectInfo, ObjectStore
from objfs.tree import ROOT_INO, Inode, MetadataTree
from tests.faultproxy import FaultProxy


@dataclasses.dataclass
class Core:
    fs: Filesystem
    tree: MetadataTree
    store: ObjectStore
    metrics: Metrics
    proxy: FaultProxy
    s3: object
    bucket: str
    invalidated: list[int]
    invalidated_now: list[int]
    invalidated_entries: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)
    invalidated_attrs: list[int] = dataclasses.field(default_factory=list)

    def relist(self, pages: Iterable[list[ObjectInfo]] | None = None):
        """What the daemon's Refresher does."""
        return self.tree.refresh(self.store.list_pages() if pages is None else pages,
                                 on_changed=self.fs.changed, on_changing=self.fs.changing,
                                 on_removed=self.fs.entries_removed,
                                 on_attrs=self.fs.attrs_changed)

    def listing(self) -> list[ObjectInfo]:
        """Everything the origin holds now, as a relist would see it."""
        return [obj for page in self.store.list_pages() for obj in page]

    def node(self, rel: str) -> Inode:
        return self.tree.resolve(rel)

    def parent_and_name(self, rel: str) -> tuple[int, bytes]:
        head, _, name = rel.rpartition("/")
        return (self.node(head).ino if head else ROOT_INO), name.encode()

    def create(self, rel: str, mode: int = 0o644) -> int:
        parent, name = self.parent_and_name(rel)
        fh, _ = self.fs.create(parent, name, mode, os.O_WRONLY | os.O_CREAT, 0, 0)
        return fh

    def open(self, rel: str, flags: int = os.O_RDONLY) -> int:
        return self.fs.open(self.node(rel).ino, flags)

    def close(self, fh: int) -> None:
        try:
            self.fs.flush(fh)
        finally:
            self.fs.release(fh)

    def write_file(self, rel: str, data: bytes, chunk: int = 128 * 1024) -> None:
        fh = self.create(rel)
        for pos in range(0, len(data), chunk):
            self.fs.write(fh, pos, data[pos:pos + chunk])
        self.close(fh)

    def read(self, fh: int, size: int | None = None, offset: int = 0) -> bytes:
        return self.fs.read(fh, offset, size if size is not None else 1 << 40)

    def read_file(self, rel: str) -> bytes:
        fh = self.open(rel)
        try:
            return self.read(fh)
        finally:
            self.fs.release(fh)

    def origin(self, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None


def paused_pages(pages: list[list[ObjectInfo]], after: int, reached: threading.Event,
                 resume: threading.Event) -> Iterator[list[ObjectInfo]]:
    """Yield ``pages``; after page ``after`` set ``reached`` and wait for ``resume``."""
    for n, page in enumerate(pages):
        yield page
        if n == after:
            reached.set()
            assert resume.wait(60), "the test never resumed the listing"


@pytest.fixture(params=["moto"])
def origin_endpoint(request) -> str:
    """The S3 server under the proxy: moto by default; tests that must also run against
    SeaweedFS parametrize this fixture with ``["moto", "seaweed"]`` (indirect)."""
    return request.getfixturevalue("s3_endpoint" if request.param == "moto"
                                   else "seaweed_endpoint")


@pytest.fixture
def make_core(origin_endpoint: str, tmp_path: Path):
    loops: list[EventLoopThread] = []
    cleanups = []
    proxy = FaultProxy(origin_endpoint).start()
    s3 = boto3.client("s3", endpoint_url=origin_endpoint, region_name="us-east-1")
    bucket = f"core-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)

    def make(**overrides) -> Core:
        n = len(loops)
        loop = EventLoopThread().start()
        loops.append(loop)
        metrics = Metrics()
        store_config = StoreConfig(bucket=bucket, endpoint=proxy.endpoint,
                                   retry=RetryConfig(base_delay_s=0.01, max_delay_s=0.05,
                                                     max_attempts=3))
        settings = dict(store=store_config, mountpoint=tmp_path / f"mnt{n}",
                        cache_dir=tmp_path / f"cache{n}", cache_free_floor_bytes=0,
                        write_buffer_bytes=128 * MiB)
        settings.update(overrides)
        config = MountConfig(**settings)
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        store = ObjectStore(store_config, loop, metrics=metrics)
        tree = MetadataTree(config.cache_dir / "tree", prefix="", identity=store_config.identity,
                            metrics=metrics)
        cache = open_page_cache(config, store, loop, metrics)
        fs = Filesystem(config, tree, cache, metrics=metrics, store=store, loop=loop)
        invalidated: list[int] = []
        invalidated_now: list[int] = []
        fs.invalidate_inodes = invalidated.extend
        fs.invalidate_inodes_now = invalidated_now.extend
        core = Core(fs, tree, store, metrics, proxy, s3, bucket, invalidated, invalidated_now)
        fs.invalidate_entries_now = core.invalidated_entries.extend
        fs.invalidate_attrs_now = core.invalidated_attrs.extend
        core.relist()

        def close() -> None:
            cache.close()
            store.close()
            loop.stop()
            tree.close()
        cleanups.append(close)
        return core

    try:
        yield make
    finally:
        for close in reversed(cleanups):
            close()
        proxy.stop()


@pytest.fixture
def core(make_core) -> Core:
    return make_core()
