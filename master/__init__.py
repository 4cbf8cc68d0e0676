"""objfs master: cluster membership and preload jobs (not built yet)."""
