"""Workloads: one module each, registered here by name (in the order ``python -m bench`` runs
them).

A workload class has ``name``, ``description``, ``metrics`` (list of report.Metric) and
``__init__(ctx)``, ``settings() -> dict``, ``setup() -> dict`` (once, before the runs; e.g.
populate the origin), ``run_once(rec: RunRecord)`` (fills ``rec.metrics``; raises
common.StepError / StepTimeout on failure, keeping what it measured so far) and
``teardown()``. Most derive from ``base.Workload``.
"""

from __future__ import annotations

from bench.workloads.listing import ListingWorkload
from bench.workloads.pagecache import PagecacheWorkload

WORKLOADS = {w.name: w for w in (PagecacheWorkload, ListingWorkload)}
