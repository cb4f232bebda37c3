"""proxy/upstream/circuit.py: the per-upstream circuit breaker and its attempts.

The property that matters most: whatever way an attempt ends (an outcome recorded, an
exception of any type, a cancellation, nothing at all), a half-open probe is settled, so
the breaker can never be left refusing an upstream until restart.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import Denied, UpstreamUnavailable
from proxy.upstream.circuit import CircuitBreaker, CircuitOpen, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock, list]:
    clock = Clock()
    changes: list[CircuitState] = []
    return (
        CircuitBreaker(threshold, cooldown, on_change=changes.append, clock=clock),
        clock,
        changes,
    )


def fail(b: CircuitBreaker) -> None:
    with b.attempt() as attempt:
        attempt.failure()


def succeed(b: CircuitBreaker) -> None:
    with b.attempt() as attempt:
        attempt.success()


def half_open(b: CircuitBreaker, clock: Clock) -> None:
    for _ in range(b.threshold):
        fail(b)
    assert b.state == CircuitState.OPEN
    clock.now += b.cooldown


def test_opens_after_threshold_and_fails_fast_during_cooldown() -> None:
    b, clock, changes = breaker()
    fail(b)
    fail(b)
    assert b.state == CircuitState.CLOSED
    fail(b)
    assert b.state == CircuitState.OPEN
    with pytest.raises(CircuitOpen), b.attempt():
        pytest.fail("admitted while open")
    clock.now += 9.9
    with pytest.raises(CircuitOpen), b.attempt():
        pytest.fail("admitted while open")
    assert changes == [CircuitState.OPEN]


def test_a_success_resets_the_count() -> None:
    b, _, _ = breaker()
    fail(b)
    fail(b)
    succeed(b)
    fail(b)
    fail(b)
    assert b.state == CircuitState.CLOSED


def test_one_probe_after_cooldown_its_success_closes() -> None:
    b, clock, changes = breaker()
    half_open(b, clock)
    with b.attempt() as probe:
        assert b.state == CircuitState.HALF_OPEN
        with pytest.raises(CircuitOpen), b.attempt():
            pytest.fail("a second probe was admitted")
        probe.success()
    assert b.state == CircuitState.CLOSED
    assert not b.probing
    assert changes == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]


def test_probe_failure_opens_again_for_a_whole_cooldown() -> None:
    b, clock, _ = breaker()
    half_open(b, clock)
    fail(b)
    assert b.state == CircuitState.OPEN
    clock.now += 5
    with pytest.raises(CircuitOpen), b.attempt():
        pass
    clock.now += 5
    succeed(b)
    assert b.state == CircuitState.CLOSED


def test_zero_cooldown_probes_at_once() -> None:
    b, _, _ = breaker(cooldown=0)
    for _ in range(3):
        fail(b)
    assert b.state == CircuitState.OPEN
    succeed(b)
    assert b.state == CircuitState.CLOSED


@pytest.mark.parametrize(
    "error",
    [
        UpstreamUnavailable("token service down"),
        Denied("refused"),
        RuntimeError("a bug"),
        KeyError("x"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_exception_without_an_outcome_is_a_failure(error: BaseException) -> None:
    b, clock, _ = breaker()
    half_open(b, clock)
    with pytest.raises(type(error)), b.attempt():
        raise error
    assert not b.probing
    assert b.state == CircuitState.OPEN


def test_an_outcome_recorded_before_the_exception_stands() -> None:
    b, clock, _ = breaker()
    half_open(b, clock)
    with pytest.raises(Denied), b.attempt() as attempt:
        attempt.success()  # the token service answered: the upstream is up
        raise Denied("credentials refused")
    assert b.state == CircuitState.CLOSED


def test_a_neutral_release_frees_the_probe() -> None:
    b, clock, _ = breaker()
    half_open(b, clock)
    with pytest.raises(UpstreamUnavailable), b.attempt() as attempt:
        attempt.release()  # e.g. a realm the gate refused: says nothing about health
        raise UpstreamUnavailable("realm refused")
    assert b.state == CircuitState.HALF_OPEN
    assert not b.probing
    succeed(b)
    assert b.state == CircuitState.CLOSED


def test_a_block_that_records_nothing_frees_the_probe() -> None:
    b, clock, _ = breaker()
    half_open(b, clock)
    with b.attempt():
        pass
    assert not b.probing
    succeed(b)
    assert b.state == CircuitState.CLOSED


async def test_a_cancelled_probe_is_released_not_left_taken() -> None:
    b, clock, _ = breaker()
    half_open(b, clock)
    entered = asyncio.Event()

    async def probe() -> None:
        with b.attempt():
            entered.set()
            await asyncio.Event().wait()  # a token fetch that never answers

    task = asyncio.create_task(probe())
    await entered.wait()
    assert b.probing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not b.probing
    assert b.state == CircuitState.HALF_OPEN
    succeed(b)
    assert b.state == CircuitState.CLOSED


def test_outcomes_count_once() -> None:
    b, _, _ = breaker(threshold=2)
    with b.attempt() as attempt:
        attempt.failure()
        attempt.failure()
        attempt.success()
    assert b.state == CircuitState.CLOSED
    fail(b)
    assert b.state == CircuitState.OPEN


def test_a_request_admitted_before_opening_does_not_free_the_probe() -> None:
    b, clock, _ = breaker()
    with b.attempt() as old:  # admitted while closed, still running
        half_open(b, clock)
        with b.attempt() as probe:
            old.release()
            assert b.probing
            with pytest.raises(CircuitOpen), b.attempt():
                pass
            probe.success()
    assert b.state == CircuitState.CLOSED
