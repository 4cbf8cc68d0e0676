"""PartSchedule (pure) and WriteBudget (threads, no network)."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objfs.errors import ConfigError
from objfs.metrics import Metrics
from objfs.writer import PartSchedule, WriteBudget

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB


def all_parts(s: PartSchedule) -> list[int]:
    return [s.part_bytes(n) for n in range(1, s.max_parts + 1)]


@pytest.mark.parametrize("schedule", [
    PartSchedule(),
    PartSchedule(blocks_per_part=1, min_part_bytes=4 * MiB),  # a store taking 4 MiB parts
    PartSchedule(block_size=8 * MiB, blocks_per_part=2),
])
def test_real_schedules_hold_5_tib_in_10000_whole_block_parts(schedule):
    parts = all_parts(schedule)
    assert len(parts) == 10_000
    assert all(p % schedule.block_size == 0 for p in parts)
    assert all(p >= 5 * MiB or schedule.min_part_bytes < 5 * MiB for p in parts)
    assert all(a <= b for a, b in zip(parts, parts[1:]))
    assert max(parts) <= 5 * GiB
    assert sum(parts) == schedule.max_object_bytes >= 5 * TiB
    assert schedule.part_start(10_001) == sum(parts)


def test_the_default_schedule_is_the_documented_one():
    s = PartSchedule()
    assert (s.block_size, s.first_part_bytes, s.parts_per_step) == (4 * MiB, 8 * MiB, 1000)
    assert s.part_bytes(1000) == 8 * MiB and s.part_bytes(1001) == 16 * MiB
    assert s.part_bytes(10_000) == 4 * GiB
    assert s.describe().splitlines()[1].split() == ["1-1000", "8", "MiB", "7.8", "GiB"]
    assert s.describe().splitlines()[-1].split() == ["9001-10000", "4", "GiB", "7.8", "TiB"]
    import objfs.writer
    assert s.describe() in objfs.writer.__doc__.replace("\n    ", "\n")


@settings(max_examples=200, deadline=None)
@given(block_mib=st.integers(1, 64), blocks=st.integers(1, 8),
       step=st.one_of(st.none(), st.integers(1, 10_000)), max_parts=st.integers(1, 10_000),
       cap_gib=st.integers(1, 5), numbers=st.lists(st.integers(1, 10_000), max_size=30))
def test_any_valid_schedule_keeps_its_invariants(block_mib, blocks, step, max_parts, cap_gib,
                                                  numbers):
    block = block_mib * MiB
    try:
        s = PartSchedule(block_size=block, blocks_per_part=blocks, max_parts=max_parts,
                         max_part_bytes=cap_gib * GiB, parts_per_step=step,
                         min_object_bytes=0, min_part_bytes=block)
    except ConfigError:
        assert block * blocks > cap_gib * GiB  # the only way these can be invalid
        return
    numbers = sorted({min(n, max_parts) for n in numbers} | {1, max_parts})
    for n in numbers:
        size = s.part_bytes(n)
        assert size % block == 0 and size >= block * blocks  # whole blocks, never shrinking
        assert size <= cap_gib * GiB
        if n < max_parts:
            assert s.part_bytes(n + 1) >= size
        assert s.part_start(n + 1) - s.part_start(n) == size
    assert s.part_start(1) == 0
    assert s.max_object_bytes == s.part_start(max_parts + 1)
    rows = s.rows()
    assert rows[0][0] == 1 and rows[-1][1] == max_parts
    assert all(a[1] + 1 == b[0] for a, b in zip(rows, rows[1:]))
    assert rows[-1][3] == s.max_object_bytes


@pytest.mark.parametrize("kwargs, message", [
    ({"blocks_per_part": 1}, "minimum part size"),          # 4 MiB < S3's 5 MiB
    ({"max_parts": 10_001}, "10000"),
    ({"block_size": 0}, "positive"),
    ({"parts_per_step": 0}, "positive"),
    ({"parts_per_step": 10_000}, "less than 5 TiB"),       # never grows: 78 GiB at most
    ({"block_size": 6 * GiB, "blocks_per_part": 1}, "exceeds max_part_bytes"),
    ({"max_parts": 50}, "no growth step"),
])
def test_bad_schedules_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PartSchedule(**kwargs)


# ---- WriteBudget ----------------------------------------------------------------------------


def in_thread(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def test_budget_blocks_until_released_and_reports_a_gauge():
    metrics = Metrics()
    budget = WriteBudget(10, metrics=metrics)
    budget.acquire(6)
    budget.acquire(4)
    assert metrics.get("upload_bytes_buffered") == 10
    t = in_thread(budget.acquire, 3)
    t.join(0.2)
    assert t.is_alive()  # waits: it does not grow past the limit
    budget.release(6)
    t.join(2)
    assert not t.is_alive()
    assert budget.used_bytes == 7 and budget.peak_bytes == 10
    assert metrics.get("upload_budget_wait_s") > 0.1
    assert metrics.get("upload_budget_limit_bytes") == 10
    with pytest.raises(AssertionError):
        budget.release(8)


def test_a_request_larger_than_the_limit_waits_for_an_empty_budget_only():
    budget = WriteBudget(10)
    budget.acquire(5)
    t = in_thread(budget.acquire, 25)
    t.join(0.2)
    assert t.is_alive()
    budget.release(5)
    t.join(2)
    assert not t.is_alive() and budget.used_bytes == 25


def test_admission_is_first_come_first_served():
    budget = WriteBudget(10)
    budget.acquire(6)
    order: list[str] = []
    big = in_thread(lambda: (budget.acquire(8), order.append("big")))
    time.sleep(0.1)
    small = in_thread(lambda: (budget.acquire(2), order.append("small")))
    small.join(0.2)
    assert small.is_alive()  # 2 would fit, but it queues behind the big request
    budget.release(6)
    big.join(2)
    small.join(2)
    assert order == ["big", "small"] and budget.used_bytes == 10


def test_a_budget_held_only_by_parts_being_filled_overcommits_after_the_stall_timeout():
    metrics = Metrics()
    budget = WriteBudget(10, metrics=metrics, stall_timeout_s=0.3)
    budget.acquire(10)  # e.g. another file of the same single-threaded writer
    started = time.monotonic()
    budget.acquire(5)
    assert time.monotonic() - started >= 0.3
    assert budget.used_bytes == 15
    assert metrics.get("upload_budget_overcommit_total") == 1


def test_a_budget_held_by_uploads_in_flight_never_overcommits():
    metrics = Metrics()
    budget = WriteBudget(10, metrics=metrics, stall_timeout_s=0.1)
    budget.acquire(10)
    budget.handed_off(10)  # a part being uploaded: it comes back by itself
    t = in_thread(budget.acquire, 5)
    t.join(0.5)
    assert t.is_alive()
    budget.release(10, uploaded=True)
    t.join(2)
    assert not t.is_alive() and budget.used_bytes == 5
    assert metrics.get("upload_budget_overcommit_total") == 0


@pytest.mark.parametrize("limit", [0, -1, 1.5])
def test_bad_budgets_are_rejected(limit):
    with pytest.raises(ConfigError):
        WriteBudget(limit)
