"""Helpers of the integration tests (the ``loop`` fixture is in conftest.py)."""

from __future__ import annotations

import random

import boto3

from objfs.config import RetryConfig, StoreConfig
from objfs.metrics import Metrics
from objfs.store import ObjectStore
from objfs.uploads import UploadLedger


def make_store(endpoint: str, bucket: str, loop, session: boto3.Session | None = None,
               uploads: UploadLedger | None = None, **retry) -> tuple[ObjectStore, Metrics]:
    """A store on ``loop`` (closed with it) with fast retries; ``retry`` overrides them."""
    metrics = Metrics()
    config = StoreConfig(bucket=bucket, endpoint=endpoint,
                         retry=RetryConfig(base_delay_s=0.01, max_delay_s=0.05, **retry))
    store = ObjectStore(config, loop, metrics=metrics, session=session, uploads=uploads)
    loop.stores.append(store)
    return store, metrics


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)
