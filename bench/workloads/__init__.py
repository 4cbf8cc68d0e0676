"""Workloads: one module each, registered here by name (in the order ``python -m bench`` runs
them within a network mode).

A workload class has ``name``, ``description``, ``metrics`` (list of report.Metric), ``modes``
(the network modes it runs in) and ``__init__(ctx)``, ``settings() -> dict``,
``setup() -> dict`` (once per mode, before the runs and before the emulated network is on;
e.g. populate the origin), ``run_once(rec: RunRecord)`` (fills ``rec.metrics``; raises
common.StepError / StepTimeout on failure, keeping what it measured so far) and
``teardown()``. They derive from ``base.Workload``, or ``base.ContenderWorkload`` for the
side-by-side comparisons (per-contender figures, objfs/peer ratios).
"""

from __future__ import annotations

from bench.workloads.cluster import ClusterWorkload
from bench.workloads.listing import ListingWorkload
from bench.workloads.netcal import NetcalWorkload
from bench.workloads.pagecache import PagecacheWorkload
from bench.workloads.preload import PreloadWorkload
from bench.workloads.randread import RandreadWorkload
from bench.workloads.relist import RelistWorkload
from bench.workloads.seqread import SeqreadWorkload
from bench.workloads.smallfiles import SmallfilesWorkload
from bench.workloads.write import WriteWorkload

WORKLOADS = {w.name: w for w in (NetcalWorkload, PagecacheWorkload, SeqreadWorkload,
                                 RandreadWorkload, SmallfilesWorkload, WriteWorkload,
                                 ListingWorkload, RelistWorkload, ClusterWorkload,
                                 PreloadWorkload)}
