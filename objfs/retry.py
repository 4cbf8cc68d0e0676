"""The one retry layer for origin requests: exponential backoff with full jitter.

botocore's own retries are switched off (``store`` builds its client with one attempt) so a
request is never retried by two layers. A ``Backoff`` is created per logical request and asked,
after each failure, whether and how long to wait; it stops at ``max_attempts`` or when the next
wait would overrun the total time budget. Clock and randomness are injected for tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from objfs.config import RetryConfig


class Backoff:
    """Retry schedule for one logical request. Not thread-safe: one per request."""

    def __init__(self, config: RetryConfig, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, budget_s: float | None = None) -> None:
        self._config = config
        self._clock = clock
        # Default: the module's shared generator. A Random() per request would seed itself from
        # os.urandom on every GET, which showed up at ~3% of the cold read path's CPU.
        self._rng = rng or random
        self._deadline = clock() + (budget_s if budget_s is not None else config.budget_s)
        self.attempts = 0  # attempts made so far (incremented by next_delay)

    def next_delay(self) -> float | None:
        """Record a failed attempt; return seconds to wait before the next, or None to give up."""
        self.attempts += 1
        if self.attempts >= self._config.max_attempts:
            return None
        cap = self._config.max_delay_s
        if self.attempts <= 1024:  # further doubling is past any max (and overflows a float)
            cap = min(cap, self._config.base_delay_s * (2 ** (self.attempts - 1)))
        delay = self._rng.uniform(0, cap)
        if self._clock() + delay >= self._deadline:
            return None
        return delay

    def remaining_s(self) -> float:
        return max(0.0, self._deadline - self._clock())
