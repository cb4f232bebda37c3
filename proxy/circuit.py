"""A circuit breaker per upstream: stop waiting out timeouts on an upstream known down.

After `threshold` consecutive failures (no answer, timeout, 5xx) the circuit opens:
requests fail at once (so cached content is served stale right away instead of after a
timeout). After `cooldown` seconds one probe request is let through (half-open); its
success closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum


class CircuitState(IntEnum):
    """Breaker states, numbered as the metric reports them."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Tracks one upstream's health."""

    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 10.0,
        on_change: Callable[[CircuitState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._on_change = on_change
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = CircuitState.CLOSED

    def _set(self, state: CircuitState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """Whether a request may go to the upstream now."""
        if self.state == CircuitState.CLOSED:
            return True
        if self.state == CircuitState.OPEN:
            if self._clock() - self._opened_at < self.cooldown:
                return False
            self._set(CircuitState.HALF_OPEN)
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        """The upstream answered (any status below 500)."""
        self._failures = 0
        self._probing = False
        self._set(CircuitState.CLOSED)

    def failure(self) -> None:
        """The upstream failed (no answer, timeout, 5xx)."""
        self._failures += 1
        self._probing = False
        if self.state == CircuitState.HALF_OPEN or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._set(CircuitState.OPEN)
