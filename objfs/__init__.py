"""objfs: an S3-compatible bucket mounted as a POSIX directory for AI training hosts.

The daemon is layered so that everything but ``objfs.fuse_adapter`` can be driven without a
mount: ``config`` (validated settings) -> ``store`` (object-store client) -> ``tree``
(metadata tree in LMDB) -> ``fs`` (filesystem core) -> ``fuse_adapter`` (llfuse glue).
"""

__version__ = "0.1.0"
