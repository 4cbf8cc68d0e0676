"""Workload ``relist``: what a relist of a big prefix costs the daemon, without the network.

A relist is one flat ListObjectsV2 of the prefix, page by page, applied to the LMDB tree.
At millions of objects its CPU matters twice: it runs every TTL, and the listing's XML must
be parsed off the event loop (which it is, in a worker thread) so it does not stall reads.
This workload measures, on N synthetic objects (1,000,000 in the full run; 1,000 directories
of 1,000 files, keys like a dataset's) in 1,000-key pages:

- **parse**: ``objfs.store._parse_listing`` of every page as S3 sends it (URL-encoded keys),
  the CPU the worker thread spends per relist;
- **build**: the first refresh into an empty tree (what a cold mount does after listing);
- **unchanged**: a relist of the same listing: every record is read, none is written
  (LMDB write transactions counted);
- **churn**: a relist where 1% of the objects changed, 0.1% were deleted and 0.1% are new.

All in this process, timed with ``time.process_time`` and ``perf_counter``; RSS is the
process's peak (the tree itself holds no Python dict of the namespace: only a bitmap of the
inodes a refresh saw, 1 bit per inode).
"""

from __future__ import annotations

import random
import resource
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from bench.report import Metric, RunRecord
from bench.workloads.base import Workload
from objfs.store import ObjectInfo, _parse_listing
from objfs.tree import MetadataTree

PAGE = 1000
MTIME = "2026-11-23T13:19:07.000Z"


def _objects(n: int, seed: int = 0) -> list[ObjectInfo]:
    rng = random.Random(seed)
    return [ObjectInfo(f"data/d{i // 1000:05d}/shard-{i:08d}.bin", rng.randrange(1, 1 << 20),
                       f'"{rng.getrandbits(128):032x}"', 1_700_000_000_000_000_000)
            for i in range(n)]


def _xml_page(objs: list[ObjectInfo], token: str | None) -> bytes:
    contents = "".join(
        f"<Contents><Key>{quote(o.key, safe='/')}</Key><LastModified>{MTIME}</LastModified>"
        f"<ETag>&quot;{o.etag.strip(chr(34))}&quot;</ETag><Size>{o.size}</Size>"
        f"<StorageClass>STANDARD</StorageClass></Contents>" for o in objs)
    tail = (f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}"
            f"</NextContinuationToken>" if token else "<IsTruncated>false</IsTruncated>")
    return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns='
            f'"http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>data/</Prefix>'
            f"<KeyCount>{len(objs)}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<EncodingType>url</EncodingType>{tail}{contents}</ListBucketResult>").encode()


def _pages(objs: list[ObjectInfo]) -> list[list[ObjectInfo]]:
    return [objs[i:i + PAGE] for i in range(0, len(objs), PAGE)]


class RelistWorkload(Workload):
    name = "relist"
    full_runs = 1
    description = ("A relist of a big prefix, in the daemon's own code and without the "
                   "network: XML parsing (off the loop), the first build of the tree, a "
                   "relist of an unchanged prefix, a relist with 1% churn.")
    metrics = [
        Metric("objects", "objects in the listing", "", 0),
        Metric("parse_cpu_s", "parse every page (URL-encoded XML -> ObjectInfo), CPU", "s", 2,
               summary=True),
        Metric("build_s", "first build of the tree (empty cache dir)", "s", 2),
        Metric("unchanged_s", "relist of the unchanged prefix", "s", 2, summary=True),
        Metric("unchanged_cpu_s", "same, CPU", "s", 2),
        Metric("unchanged_txns", "LMDB write transactions of that relist", "", 0),
        Metric("churn_s", "relist with 1% changed, 0.1% deleted, 0.1% new", "s", 2),
        Metric("churn_txns", "LMDB write transactions of that relist", "", 0),
        Metric("peak_rss_MiB", "peak RSS of the process (harness included)", "MiB", 0),
    ]

    def __init__(self, ctx):
        super().__init__(ctx)
        self.count = 20_000 if ctx.args.smoke else 1_000_000

    def settings(self) -> dict:
        return {"objects": self.count, "page_keys": PAGE,
                "keys": "data/dNNNNN/shard-NNNNNNNN.bin (1,000 per directory)"}

    def run_once(self, rec: RunRecord) -> None:
        m = rec.metrics
        objs = _objects(self.count)
        m["objects"] = len(objs)
        pages = _pages(objs)
        xml = [_xml_page(p, f"t{n}" if n + 1 < len(pages) else None)
               for n, p in enumerate(pages)]
        c0 = time.process_time()
        parsed = [_parse_listing(body)[0] for body in xml]
        m["parse_cpu_s"] = time.process_time() - c0
        first = parsed[0][0]
        assert sum(map(len, parsed)) == len(objs)
        assert (first.key, first.etag, first.size) == (objs[0].key, objs[0].etag, objs[0].size)
        del xml, parsed
        with tempfile.TemporaryDirectory(dir=self.ctx.work_dir) as tmp:
            tree = MetadataTree(Path(tmp) / "tree", prefix="data/", identity="bench",
                                map_size=1 << 34)
            try:
                t0 = time.perf_counter()
                tree.refresh(iter(pages))
                m["build_s"] = time.perf_counter() - t0
                txn0 = tree._env.info()["last_txnid"]
                t0, c0 = time.perf_counter(), time.process_time()
                stats = tree.refresh(iter(pages))
                m["unchanged_s"] = time.perf_counter() - t0
                m["unchanged_cpu_s"] = time.process_time() - c0
                m["unchanged_txns"] = tree._env.info()["last_txnid"] - txn0
                assert stats.changed == stats.removed == stats.added == 0
                rng = random.Random(1)
                churned = []
                for o in objs:
                    r = rng.random()
                    if r < 0.001:
                        continue  # deleted at the origin
                    if r < 0.011:  # replaced
                        o = ObjectInfo(o.key, o.size + 1, f'"{rng.getrandbits(128):032x}"',
                                       o.mtime_ns)
                    churned.append(o)
                churned += [ObjectInfo(f"data/new/shard-{i:08d}.bin", 1, '"n"', 1)
                            for i in range(self.count // 1000)]
                txn0 = tree._env.info()["last_txnid"]
                t0 = time.perf_counter()
                stats = tree.refresh(iter(_pages(churned)))
                m["churn_s"] = time.perf_counter() - t0
                m["churn_txns"] = tree._env.info()["last_txnid"] - txn0
            finally:
                tree.close()
        m["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.log(f"  {len(objs):,} objects: parse {m['parse_cpu_s']:.1f} s CPU, build "
                 f"{m['build_s']:.1f} s, unchanged relist {m['unchanged_s']:.1f} s "
                 f"({m['unchanged_txns']:.0f} write txns), churn {m['churn_s']:.1f} s "
                 f"({stats.changed} changed, {stats.removed} removed, {stats.added} added)")
