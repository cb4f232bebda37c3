"""A circuit breaker per upstream: stop waiting out timeouts on an upstream known down.

After `threshold` consecutive failures (no answer, timeout, 5xx, a failed token fetch)
the circuit opens: requests fail at once (so cached content is served stale right away
instead of after a timeout). After `cooldown` seconds one probe request is let through
(half-open); its success closes the circuit, its failure opens it again.

Requests go through `attempt()`, a context manager that settles whatever way the block
ends: an outcome the caller recorded, else a failure for an exception and a neutral
release for a cancellation (a client that went away says nothing about the upstream).
So a half-open probe can never be left taken, which would refuse the upstream until
restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum


class CircuitState(IntEnum):
    """Breaker states, numbered as the metric reports them."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitOpen(Exception):
    """The breaker refuses requests to the upstream now."""


class Attempt:
    """One request the breaker let through; settled once (later outcomes are ignored)."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self.settled = False

    def success(self) -> None:
        """The upstream answered (any status below 500)."""
        if not self.settled:
            self.settled = True
            self._breaker._settle(self, True)

    def failure(self) -> None:
        """The upstream failed (no answer, timeout, 5xx, token service down)."""
        if not self.settled:
            self.settled = True
            self._breaker._settle(self, False)

    def release(self) -> None:
        """The attempt ended without saying anything about the upstream's health."""
        if not self.settled:
            self.settled = True
            self._breaker._settle(self, None)


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
        # The half-open probe in flight, if any: only it may settle the half-open state.
        self._probe: Attempt | None = None
        self.state = CircuitState.CLOSED

    def _set(self, state: CircuitState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    @property
    def probing(self) -> bool:
        """Whether a half-open probe is in flight."""
        return self._probe is not None

    @contextmanager
    def attempt(self) -> Iterator[Attempt]:
        """Let one request through (or raise CircuitOpen); settled however the block ends."""
        attempt = self._admit()
        try:
            yield attempt
        except (asyncio.CancelledError, GeneratorExit):
            attempt.release()
            raise
        except BaseException:
            attempt.failure()
            raise
        finally:
            attempt.release()

    def record_failure(self) -> None:
        """A failure seen across several requests rather than in one attempt (a deadline
        over a whole manifest fetch, whose cut-off requests only saw a cancellation)."""
        self._settle(Attempt(self), False)

    def _admit(self) -> Attempt:
        if self.state == CircuitState.OPEN:
            if self._clock() - self._opened_at < self.cooldown:
                raise CircuitOpen
            self._set(CircuitState.HALF_OPEN)
        attempt = Attempt(self)
        if self.state == CircuitState.HALF_OPEN:
            if self._probe is not None:
                raise CircuitOpen
            self._probe = attempt
        return attempt

    def _settle(self, attempt: Attempt, healthy: bool | None) -> None:
        if attempt is self._probe:
            self._probe = None
        if healthy is None:
            return
        if healthy:
            self._failures = 0
            self._set(CircuitState.CLOSED)
            return
        self._failures += 1
        if self.state == CircuitState.HALF_OPEN or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._probe = None
            self._set(CircuitState.OPEN)
