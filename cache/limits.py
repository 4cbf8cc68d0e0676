"""Fairness on the event loop: fetch priorities and byte-rate limits.

**Priorities.** A page fetch is one of three kinds (``Priority``): a *demand* read (a reader
is blocked on it), *readahead* (a sequential reader will want it soon) or *preload* (the
master placed it; nobody waits). The page cache's fetch slots are a ``PriorityGate``: a free
slot goes to the most urgent waiter (FIFO within a kind), and the less urgent kinds may not
take the last slots (``headroom``), so a demand read never queues behind a wall of readahead
or preload runs that already hold every slot. A queued run can be *promoted* when a more
urgent reader starts waiting on its pages (a reader catching up with its readahead), so
nothing urgent waits behind a ticket that is not.

**Rates.** ``TokenBucket`` limits bytes per second (``--peer-serve-limit``,
``--origin-read-limit``). A request takes its bytes at once and may drive the bucket into
debt; the next one waits until the debt is paid. That keeps large ranged GETs whole (no
splitting) and the long-run rate exact, and lets a server ask how far in debt it is
(``debt_s``) to answer 503 instead of queueing without bound.

Both are used on the event loop only (no locks); the clock is injected so tests need no
sleeps.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable


class Priority(enum.IntEnum):
    """Lower is more urgent."""

    DEMAND = 0
    READAHEAD = 1
    PRELOAD = 2

    @classmethod
    def parse(cls, text: str) -> "Priority":
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown priority {text!r}") from None


class Ticket:
    """One run's place in a ``PriorityGate``. ``priority`` only ever decreases (promotion);
    it is written on the loop only (``PriorityGate.promote``)."""

    __slots__ = ("priority", "seq", "_waiter", "_held", "_gate")

    def __init__(self, priority: Priority) -> None:
        self.priority = priority
        self.seq = 0
        self._waiter: asyncio.Future | None = None
        self._held = False
        self._gate: PriorityGate | None = None  # the gate it waits in or holds a slot of

    def __repr__(self) -> str:
        return f"Ticket({self.priority.name}, held={self._held})"


class PriorityGate:
    """``limit`` slots handed out most urgent first. Loop-only: no locks.

    A ticket of priority ``p`` takes a slot only while fewer than ``limit - headroom[p]``
    are in use, so with the defaults readahead leaves a quarter of the slots (at least one)
    to demand reads and preload leaves half. With ``limit == 1`` there is no headroom (that
    would starve the lower kinds), only ordering.
    """

    def __init__(self, limit: int, headroom: dict[Priority, int] | None = None) -> None:
        if limit < 1:
            raise ValueError("a gate needs at least one slot")
        self.limit = limit
        if headroom is None:
            headroom = {Priority.DEMAND: 0, Priority.READAHEAD: max(1, limit // 4),
                        Priority.PRELOAD: max(1, limit // 2)}
        self._headroom = {p: min(limit - 1, max(0, headroom.get(p, 0))) for p in Priority}
        self.in_use = 0
        self._waiting: list[tuple[int, int, Ticket]] = []  # heap of (priority, seq, ticket)
        self._seq = itertools.count()

    def _may_take(self, priority: Priority) -> bool:
        return self.in_use < self.limit - self._headroom[priority]

    async def acquire(self, ticket: Ticket) -> None:
        if ticket._held:
            raise RuntimeError("ticket already holds a slot")
        ticket.seq = next(self._seq)
        ticket._gate = self
        ticket._waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (int(ticket.priority), ticket.seq, ticket))
        self._wake()  # a free slot it may take: granted at once (awaiting a done future)
        try:
            await ticket._waiter
        except BaseException:
            if ticket._held:  # granted and cancelled at once: give the slot on
                self.release(ticket)
            else:
                self._remove(ticket)
                ticket._gate = None
            raise
        finally:
            ticket._waiter = None

    def release(self, ticket: Ticket) -> None:
        if not ticket._held:
            raise RuntimeError("ticket holds no slot")
        ticket._held = False
        ticket._gate = None
        self.in_use -= 1
        self._wake()

    @staticmethod
    def promote(ticket: Ticket, priority: Priority) -> None:
        """Make ``ticket`` at least as urgent as ``priority``, whether it waits in a gate,
        holds a slot or has not asked for one yet."""
        if priority >= ticket.priority:
            return
        ticket.priority = priority
        gate = ticket._gate
        if gate is not None:
            gate._repush(ticket)

    def _repush(self, ticket: Ticket) -> None:
        if ticket._waiter is not None and not ticket._held:
            self._remove(ticket)
            heapq.heappush(self._waiting, (int(ticket.priority), ticket.seq, ticket))
            self._wake()

    def waiting(self) -> int:
        return len(self._waiting)

    def _remove(self, ticket: Ticket) -> None:
        self._waiting = [e for e in self._waiting if e[2] is not ticket]
        heapq.heapify(self._waiting)

    def _wake(self) -> None:
        # Strict order: the most urgent waiter goes first; if it may not take a slot yet
        # (headroom), nothing behind it (less urgent) may either.
        while self._waiting and self._may_take(self._waiting[0][2].priority):
            _, _, ticket = heapq.heappop(self._waiting)
            waiter = ticket._waiter
            if waiter is None or waiter.done():
                continue
            self.in_use += 1
            ticket._held = True
            waiter.set_result(None)


class TokenBucket:
    """``rate`` bytes per second with bursts of up to ``burst`` bytes. Loop-only.

    ``reserve(n)`` takes ``n`` bytes now (possibly into debt) and says how long the caller
    must wait before using them; ``take(n)`` does that wait. ``debt_s()`` is how long until
    the bucket is out of debt: a server answers "busy" past a threshold instead of queueing.
    """

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)  # one second's worth
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes; return the seconds to wait before sending them (0 if none)."""
        self._refill()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def debt_s(self) -> float:
        """Seconds until the bucket is out of debt (0 if it has tokens)."""
        self._refill()
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def take(self, n: int) -> float:
        """Take ``n`` bytes and wait until they may be sent; returns the wait."""
        delay = self.reserve(n)
        if delay > 0:
            await self._sleep(delay)
        return delay
