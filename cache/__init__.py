"""objfs.cache: pages of object versions and (next) their on-disk store, states and eviction.

Nothing here imports the FUSE side of objfs; the daemon uses this package, never the reverse.
"""
