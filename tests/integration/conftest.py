"""Shared by the integration tests: the event loop the store runs on, and stores on it."""

from __future__ import annotations

import pytest

from objfs.loop import EventLoopThread
from objfs.store import ObjectStore


@pytest.fixture
def loop():
    """An event loop thread; stores made with ``support.make_store`` are closed with it."""
    loop = EventLoopThread().start()
    stores: list[ObjectStore] = []
    loop.stores = stores  # type: ignore[attr-defined]
    yield loop
    for store in stores:
        store.close()
    loop.stop()
