"""Labelled counters (``Metrics.inc_labeled``) and their Prometheus text."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families

from objfs.control import prometheus_text
from objfs.metrics import Metrics


def test_labelled_counters_sum_across_threads_and_stay_out_of_the_snapshot() -> None:
    m = Metrics()

    def work() -> None:
        for _ in range(1000):
            m.inc("peer_in_bytes", 10)
            m.inc_labeled("peer_in_bytes", (("peer", "a:1"),), 10)
        m.inc_labeled("peer_requests_total", (("peer", "b:1"),))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.snapshot() == {"peer_in_bytes": 40_000}
    assert m.labeled() == {"peer_in_bytes": {(("peer", "a:1"),): 40_000},
                           "peer_requests_total": {(("peer", "b:1"),): 4}}


def test_prometheus_shows_a_labelled_name_only_as_its_series() -> None:
    text = prometheus_text(
        {"peer_in_bytes": 30, "fuse_read_total": 5, "cache_used_bytes": 7},
        {"mount": "/mnt/x"}, frozenset({"cache_used_bytes"}),
        {"peer_in_bytes": {(("peer", "10.0.0.2:9567"),): 10, (("peer", "10.0.0.3:9567"),): 20}})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    peer = families["objfs_peer_in_bytes"]
    assert peer.type == "counter"
    assert sorted((s.labels["peer"], s.value) for s in peer.samples) == [
        ("10.0.0.2:9567", 10.0), ("10.0.0.3:9567", 20.0)]
    assert all(s.labels["mount"] == "/mnt/x" for s in peer.samples)
    assert [s.labels for s in families["objfs_fuse_read"].samples] == [{"mount": "/mnt/x"}]
    assert families["objfs_cache_used_bytes"].type == "gauge"
    assert text.count("# TYPE objfs_peer_in_bytes_total") == 1
