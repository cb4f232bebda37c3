"""proxy/auth/login_limits.py: the failed-login buckets, on a fake clock (no waiting)."""

from __future__ import annotations

import pytest

from proxy.auth.login_limits import MAX_USER_CHARS, Limited, LoginLimiter, client_key, user_key
from proxy.settings import LoginBucket, LoginLimits

ATTACKER = "198.51.100.66"
REAL_USER_HOST = "192.0.2.10"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


LIMITS = LoginLimits(
    per_user_client=LoginBucket(burst=3, interval=60),
    per_client=LoginBucket(burst=10, interval=10),
    per_user=LoginBucket(burst=6, interval=5),
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> LoginLimiter:
    return LoginLimiter(LIMITS, clock=clock)


def fail(limiter: LoginLimiter, user: str | None, client: str, times: int) -> None:
    for _ in range(times):
        assert limiter.check(user, client) is None
        limiter.failed(user, client)


def test_user_client_bucket_limits_one_address_guessing_one_user(
    limiter: LoginLimiter, clock: Clock
) -> None:
    fail(limiter, "alice", ATTACKER, 3)
    assert limiter.check("alice", ATTACKER) == Limited("user_client", 60)
    # The same address may still try another user (its own bucket is not empty yet).
    assert limiter.check("bob", ATTACKER) is None
    # The real user, elsewhere, is not locked out by the attacker's address.
    assert limiter.check("alice", REAL_USER_HOST) is None
    clock.now += 59.5
    assert limiter.check("alice", ATTACKER) == Limited("user_client", 1)
    clock.now += 0.5
    assert limiter.check("alice", ATTACKER) is None


def test_client_bucket_limits_spraying_many_users(limiter: LoginLimiter) -> None:
    for number in range(10):
        fail(limiter, f"user{number}", ATTACKER, 1)
    limited = limiter.check("someone-new", ATTACKER)
    assert limited is not None and limited.bucket == "client"
    # Garbage without a user name is charged to the client too.
    assert limiter.check(None, ATTACKER) is not None
    assert limiter.check("someone-new", REAL_USER_HOST) is None


def test_user_bucket_is_short_and_spares_known_clients(limiter: LoginLimiter, clock: Clock) -> None:
    limiter.succeeded("alice", REAL_USER_HOST)  # alice logged in from her machine before
    # Six addresses, one guess each: the per-user bucket empties.
    for number in range(6):
        fail(limiter, "alice", f"203.0.113.{number}", 1)
    limited = limiter.check("alice", "203.0.113.200")
    assert limited == Limited("user", 5)
    # alice's own machine is not locked out; another user is not affected.
    assert limiter.check("alice", REAL_USER_HOST) is None
    assert limiter.check("bob", "203.0.113.200") is None
    # And the lock is short: one interval later, one more attempt.
    clock.now += 5
    assert limiter.check("alice", "203.0.113.200") is None


def test_success_forgives_typos_but_not_the_clients_other_failures(limiter: LoginLimiter) -> None:
    fail(limiter, "alice", REAL_USER_HOST, 2)
    for number in range(7):
        fail(limiter, f"other{number}", REAL_USER_HOST, 1)
    limiter.succeeded("alice", REAL_USER_HOST)
    fail(limiter, "alice", REAL_USER_HOST, 1)  # the per-(user, client) bucket is full again
    # The per-client bucket is not: one valid login must not reset an address's budget.
    limited = limiter.check("other-user", REAL_USER_HOST)
    assert limited is not None and limited.bucket == "client"


def test_unknown_and_known_users_are_limited_alike(limiter: LoginLimiter) -> None:
    fail(limiter, "alice", ATTACKER, 3)
    fail(limiter, "no-such-user", ATTACKER, 3)
    assert limiter.check("alice", ATTACKER) == limiter.check("no-such-user", ATTACKER)


def test_disabled_never_limits(clock: Clock) -> None:
    limiter = LoginLimiter(LIMITS.model_copy(update={"enabled": False}), clock=clock)
    fail(limiter, "alice", ATTACKER, 100)


def test_state_is_bounded(clock: Clock) -> None:
    limiter = LoginLimiter(LIMITS.model_copy(update={"max_entries": 16}), clock=clock)
    for number in range(1000):
        limiter.failed(f"user{number}", f"10.0.{number // 256}.{number % 256}")
    assert len(limiter._user._levels) <= 16  # the bound is the point
    assert len(limiter._client._levels) <= 16


def test_keys() -> None:
    assert client_key("2001:db8:1:2:3:4:5:6") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key(None) == "unknown"
    assert len(user_key("x" * 100_000)) == MAX_USER_CHARS
