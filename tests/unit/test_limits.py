"""Unit tests of ``objfs.cache.limits``: the priority gate and the token bucket.

Both run on an event loop; the bucket's clock and sleep are injected, so nothing here waits
for real time.
"""

from __future__ import annotations

import asyncio

import pytest

from objfs.cache.limits import Priority, PriorityGate, Ticket, TokenBucket

D, R, L = Priority.DEMAND, Priority.READAHEAD, Priority.PRELOAD


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# ---- priority gate -------------------------------------------------------------------------------

def test_priority_parse() -> None:
    assert Priority.parse("demand") is D and Priority.parse("READAHEAD") is R
    with pytest.raises(ValueError):
        Priority.parse("urgent")


def test_free_slots_are_granted_at_once_and_released() -> None:
    async def main() -> None:
        gate = PriorityGate(2, headroom={})
        a, b = Ticket(D), Ticket(L)
        await gate.acquire(a)
        await gate.acquire(b)
        assert gate.in_use == 2
        gate.release(a)
        gate.release(b)
        assert gate.in_use == 0
        with pytest.raises(RuntimeError):
            gate.release(a)
    run(main())


def test_waiters_are_served_most_urgent_first_fifo_within_a_kind() -> None:
    async def main() -> None:
        gate = PriorityGate(1)
        holder = Ticket(D)
        await gate.acquire(holder)
        order: list[str] = []

        async def want(name: str, priority: Priority) -> None:
            ticket = Ticket(priority)
            await gate.acquire(ticket)
            order.append(name)
            await asyncio.sleep(0)
            gate.release(ticket)

        tasks = [asyncio.create_task(want(n, p)) for n, p in
                 (("pre1", L), ("ra1", R), ("dem1", D), ("ra2", R), ("dem2", D), ("pre2", L))]
        await settle()
        assert order == [] and gate.waiting() == 6
        gate.release(holder)
        await asyncio.gather(*tasks)
        assert order == ["dem1", "dem2", "ra1", "ra2", "pre1", "pre2"]
    run(main())


def test_readahead_leaves_headroom_so_demand_never_queues_behind_it() -> None:
    async def main() -> None:
        gate = PriorityGate(8)  # readahead may hold 6 slots, preload 4
        readahead = [Ticket(R) for _ in range(20)]
        tasks = [asyncio.create_task(gate.acquire(t)) for t in readahead]
        await settle()
        assert gate.in_use == 6 and gate.waiting() == 14
        demand = [Ticket(D), Ticket(D)]
        for t in demand:
            await asyncio.wait_for(gate.acquire(t), 1)  # granted without any release
        assert gate.in_use == 8
        third = asyncio.create_task(gate.acquire(Ticket(D)))
        await settle()
        assert not third.done()  # every slot is busy now: it waits ...
        gate.release(readahead[0])
        await asyncio.wait_for(third, 1)  # ... and goes before the 14 queued readahead runs
        assert sum(t.done() for t in tasks) == 6
        for t in tasks:
            t.cancel()
    run(main())


def test_preload_leaves_half_the_slots() -> None:
    async def main() -> None:
        gate = PriorityGate(8)
        tasks = [asyncio.create_task(gate.acquire(Ticket(L))) for _ in range(10)]
        await settle()
        assert gate.in_use == 4
        await asyncio.wait_for(gate.acquire(Ticket(R)), 1)
        await asyncio.wait_for(gate.acquire(Ticket(R)), 1)
        assert gate.in_use == 6
        for t in tasks:
            t.cancel()
    run(main())


def test_a_single_slot_gate_has_no_headroom() -> None:
    async def main() -> None:
        gate = PriorityGate(1)
        await asyncio.wait_for(gate.acquire(Ticket(L)), 1)
    run(main())


def test_promotion_moves_a_queued_ticket_ahead() -> None:
    async def main() -> None:
        gate = PriorityGate(1)
        holder = Ticket(D)
        await gate.acquire(holder)
        order = []

        async def want(name: str, ticket: Ticket) -> None:
            await gate.acquire(ticket)
            order.append(name)
            gate.release(ticket)

        ra = Ticket(R)
        tasks = [asyncio.create_task(want("ra", ra)),
                 asyncio.create_task(want("dem", Ticket(D)))]
        await settle()
        PriorityGate.promote(ra, D)  # a reader now waits on the readahead run's pages
        assert ra.priority is D
        gate.release(holder)
        await asyncio.gather(*tasks)
        assert order == ["ra", "dem"]  # promoted, and it was queued first
        PriorityGate.promote(ra, L)  # never demoted
        assert ra.priority is D
    run(main())


def test_promotion_of_a_ticket_not_waiting_only_changes_its_priority() -> None:
    ticket = Ticket(L)
    PriorityGate.promote(ticket, R)
    assert ticket.priority is R


def test_cancelled_waiter_leaves_the_queue_and_a_granted_one_gives_the_slot_on() -> None:
    async def main() -> None:
        gate = PriorityGate(1)
        holder = Ticket(D)
        await gate.acquire(holder)
        waiting = asyncio.create_task(gate.acquire(Ticket(D)))
        await settle()
        waiting.cancel()
        await settle()
        assert gate.waiting() == 0
        gate.release(holder)
        assert gate.in_use == 0
        await asyncio.wait_for(gate.acquire(Ticket(L)), 1)
    run(main())


# ---- token bucket --------------------------------------------------------------------------------

class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_bucket_allows_a_burst_then_paces_to_the_rate() -> None:
    t = FakeTime()
    bucket = TokenBucket(100, clock=t.clock, sleep=t.sleep)  # 100 B/s, burst 100 B
    assert bucket.reserve(60) == 0
    assert bucket.reserve(40) == 0
    assert bucket.reserve(50) == pytest.approx(0.5)  # into debt: 50 B at 100 B/s
    assert bucket.debt_s() == pytest.approx(0.5)
    t.now += 0.5
    assert bucket.debt_s() == 0
    t.now += 10  # refills only up to the burst
    assert bucket.reserve(100) == 0
    assert bucket.reserve(1) == pytest.approx(0.01)


def test_bucket_take_waits_and_the_long_run_rate_holds() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000, burst=1000, clock=t.clock, sleep=t.sleep)
    start = t.now

    async def main() -> None:
        for _ in range(50):
            await bucket.take(400)  # 20,000 B: 1,000 B of burst + 19 s at the rate
    run(main())
    assert t.now - start == pytest.approx(19.0)
    assert t.slept[0] == pytest.approx(0.2) and len(t.slept) == 48  # 0.2 s, then 0.4 s each


def test_one_request_larger_than_the_burst_is_sent_whole() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000, clock=t.clock, sleep=t.sleep)
    assert bucket.reserve(8000) == pytest.approx(7.0)  # one 8 KB request, paid afterwards
    assert bucket.reserve(1) == pytest.approx(7.001)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
