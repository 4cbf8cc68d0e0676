"""Unit tests of ``objfs.retry.Backoff`` with an injected clock and randomness."""

from __future__ import annotations

import random

import pytest

from objfs.config import RetryConfig
from objfs.retry import Backoff


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class HighestRandom(random.Random):
    """Always draws the top of the range, so each delay equals its cap."""

    def uniform(self, a: float, b: float) -> float:
        assert a == 0
        return b


def delays(backoff: Backoff, clock: FakeClock | None = None) -> list[float]:
    """Ask for delays until the backoff gives up, sleeping each one on the fake clock."""
    out: list[float] = []
    while (delay := backoff.next_delay()) is not None:
        out.append(delay)
        if clock is not None:
            clock.now += delay
        assert len(out) < 10_000
    return out


def test_delays_stay_within_the_capped_exponential() -> None:
    config = RetryConfig(base_delay_s=0.05, max_delay_s=2.0, max_attempts=12, budget_s=1e9)
    rng = random.Random(1234)
    for _ in range(200):
        got = delays(Backoff(config, clock=FakeClock(), rng=rng))
        assert len(got) == 11
        for n, delay in enumerate(got):
            assert 0 <= delay <= min(2.0, 0.05 * 2 ** n)


def test_caps_double_up_to_the_maximum() -> None:
    config = RetryConfig(base_delay_s=0.1, max_delay_s=1.0, max_attempts=8, budget_s=1e9)
    got = delays(Backoff(config, clock=FakeClock(), rng=HighestRandom()))
    assert got == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_jitter_is_full() -> None:
    # Full jitter: first delays spread over the whole of [0, base], not bunched at the cap.
    config = RetryConfig(base_delay_s=1.0, max_delay_s=1.0, max_attempts=2, budget_s=1e9)
    rng = random.Random(7)
    first = [Backoff(config, clock=FakeClock(), rng=rng).next_delay() for _ in range(500)]
    assert min(first) < 0.05 and max(first) > 0.95  # type: ignore[type-var]
    assert 0.4 < sum(first) / len(first) < 0.6  # type: ignore[arg-type]


def test_same_seed_same_schedule() -> None:
    config = RetryConfig(max_attempts=10, budget_s=1e9)
    a = delays(Backoff(config, clock=FakeClock(), rng=random.Random(5)))
    b = delays(Backoff(config, clock=FakeClock(), rng=random.Random(5)))
    assert a == b and len(a) == 9


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_stops_at_max_attempts(max_attempts: int) -> None:
    config = RetryConfig(max_attempts=max_attempts, budget_s=1e9)
    backoff = Backoff(config, clock=FakeClock(), rng=random.Random(0))
    assert len(delays(backoff)) == max_attempts - 1  # max_attempts attempts in all
    assert backoff.attempts == max_attempts
    assert backoff.next_delay() is None  # and stays stopped


def test_stops_when_the_budget_would_be_overrun() -> None:
    clock = FakeClock(100.0)
    config = RetryConfig(base_delay_s=0.4, max_delay_s=0.4, max_attempts=100, budget_s=1.0)
    backoff = Backoff(config, clock=clock, rng=HighestRandom())
    assert backoff.remaining_s() == pytest.approx(1.0)
    # 0.4 (ends at 100.4), 0.4 (ends at 100.8), then 0.4 would end at 101.2 > 101.0.
    assert delays(backoff, clock) == pytest.approx([0.4, 0.4])
    assert backoff.attempts == 3
    assert backoff.remaining_s() == pytest.approx(0.2)
    clock.now = 200.0
    assert backoff.remaining_s() == 0.0


def test_time_spent_in_attempts_counts_against_the_budget() -> None:
    clock = FakeClock(0.0)
    config = RetryConfig(base_delay_s=0.1, max_delay_s=0.1, max_attempts=100, budget_s=10.0)
    backoff = Backoff(config, clock=clock, rng=HighestRandom())
    assert backoff.next_delay() == pytest.approx(0.1)
    clock.now = 9.95  # the attempts themselves took long
    assert backoff.next_delay() is None


def test_budget_override() -> None:
    clock = FakeClock(0.0)
    config = RetryConfig(base_delay_s=1.0, max_delay_s=1.0, max_attempts=100, budget_s=1000.0)
    backoff = Backoff(config, clock=clock, rng=HighestRandom(), budget_s=2.5)
    assert delays(backoff, clock) == [1.0, 1.0]
    assert Backoff(config, clock=clock, rng=HighestRandom()).remaining_s() == 1000.0


def test_many_attempts_do_not_overflow() -> None:
    # base * 2**n overflows a float past n ~ 1024; the cap must stay max_delay_s.
    config = RetryConfig(base_delay_s=0.001, max_delay_s=0.002, max_attempts=3000, budget_s=1e9)
    got = delays(Backoff(config, clock=FakeClock(), rng=HighestRandom()))
    assert len(got) == 2999
    assert got[-1] == 0.002
