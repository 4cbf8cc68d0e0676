"""objfs benchmark harness.

Run with ``python -m bench`` from the repository root (see bench/README.md). The package is
split by concern so that more workloads and more filesystems (s3fs-fuse, rclone) can be added
without touching the rest:

- ``bench.common``    subprocess helpers with timeouts, step errors, small utilities
- ``bench.machine``   machine / software description stored with every result
- ``bench.origin``    the S3 origin (SeaweedFS) and dataset population (done once, cached)
- ``bench.objfs``     driving the ``objfs`` CLI: mount, umount, cleanup, daemon stats
- ``bench.report``    aggregation (median/min/max), markdown table, JSON file
- ``bench.workloads`` one module per workload, registered in ``bench.workloads.WORKLOADS``
"""
