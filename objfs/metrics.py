"""Counters with stable names, cheap enough for the per-read hot path.

Each thread increments its own shard (a plain dict reached through a ``threading.local``), so
counting takes no lock and never contends; ``snapshot`` sums the shards. Names carry their unit
(``_bytes``, ``_total``, ``_s``). Gauges are callables sampled at snapshot time.

Labelled counters (``inc_labeled``: e.g. the peer cache's counters per peer address) live in
shards of their own and are read with ``labeled``; they never appear in ``snapshot``, so a
plain name keeps one value in ``objfs stats --json``. Prometheus shows a name that has
labelled series only as those series (``objfs.control.prometheus_text``). Label values must
come from a small set (member addresses), never from file names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]  # sorted (label, value) pairs


class Metrics:
    def __init__(self) -> None:
        self._local = threading.local()
        self._shards: list[dict[str, float]] = []  # guarded by _shards_lock (appends only)
        self._labeled_shards: list[dict[tuple[str, Labels], float]] = []  # same lock
        self._shards_lock = threading.Lock()
        self._gauges: dict[str, Callable[[], float]] = {}
        self._updown: set[str] = set()  # counters that also go down (a gauge for Prometheus)

    def _shard(self) -> dict[str, float]:
        shard = getattr(self._local, "shard", None)
        if shard is None:
            shard = self._local.shard = {}
            with self._shards_lock:
                self._shards.append(shard)
        return shard

    def inc(self, name: str, value: float = 1) -> None:
        shard = self._shard()
        shard[name] = shard.get(name, 0) + value

    def inc_labeled(self, name: str, labels: Labels, value: float = 1) -> None:
        """Count ``value`` for the series ``name{labels}`` (``labels`` sorted pairs)."""
        shard = getattr(self._local, "labeled", None)
        if shard is None:
            shard = self._local.labeled = {}
            with self._shards_lock:
                self._labeled_shards.append(shard)
        key = (name, labels)
        shard[key] = shard.get(key, 0) + value

    def labeled(self) -> dict[str, dict[Labels, float]]:
        """name -> {labels: value} of every labelled counter."""
        out: dict[str, dict[Labels, float]] = {}
        with self._shards_lock:
            shards = list(self._labeled_shards)
        for shard in shards:
            for (name, labels), value in list(shard.items()):
                series = out.setdefault(name, {})
                series[labels] = series.get(labels, 0) + value
        return out

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def updown(self, name: str) -> None:
        """Declare ``name`` a count that goes up and down (``inc`` with negative values)."""
        self._updown.add(name)

    def gauge_names(self) -> frozenset[str]:
        return frozenset(self._gauges) | frozenset(self._updown)

    def snapshot(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        with self._shards_lock:
            shards = list(self._shards)
        for shard in shards:
            for name, value in list(shard.items()):
                totals[name] = totals.get(name, 0) + value
        for name, read in self._gauges.items():
            try:
                totals[name] = read()
            except Exception:  # a broken gauge must not break the snapshot
                continue
        return totals

    def get(self, name: str) -> float:
        return self.snapshot().get(name, 0)
