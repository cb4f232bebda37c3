"""Limits on failed logins: token buckets per (user, client), per client and per user.

Every failed login takes one token from each of three buckets; a login is refused
before its password is checked (429 with `Retry-After`) while any bucket it draws on is
empty. The per-(user, client) and per-client buckets are strict (one address cannot
guess much); the per-user bucket is lenient and refills quickly (many addresses cannot
guess one user's password fast), and it does not apply to a client that logged in as
that user before, so an attacker who empties it does not lock the real user out of
the machines they use. Unknown users are limited exactly like known ones (a limit that
told them apart would be an enumeration oracle).

State lives in bounded TTL caches: an entry expires when its bucket would be full
again, so forgetting it loses nothing; past `max_entries` the least recently used key
is forgotten (which is lenient, never a lockout).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from proxy.settings import LoginBucket, LoginLimits

# User names are keys and audit fields: a 16 KiB Basic header must not become 16 KiB of
# state per guess.
MAX_USER_CHARS = 256
# IPv6 clients are keyed by their /64: one host owns a whole /64, not one address.
IPV6_CLIENT_PREFIX = 64

Clock = Callable[[], float]


def client_key(remote: str | None) -> str:
    """The address a client is limited by (its IPv6 /64; `unknown` without an address)."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


def user_key(user: str | None) -> str:
    """A user name as a bounded key (and audit field)."""
    return (user or "")[:MAX_USER_CHARS]


@dataclass(slots=True)
class _Level:
    tokens: float
    stamp: float


class _Buckets:
    """Token buckets of one kind, by key."""

    def __init__(self, shape: LoginBucket, max_entries: int, clock: Clock) -> None:
        self.shape = shape
        self._clock = clock
        # A bucket left alone for burst * interval is full again: the entry may go.
        self._levels: TTLCache[str, _Level] = TTLCache(
            maxsize=max_entries, ttl=shape.burst * shape.interval, timer=clock
        )

    def _level(self, key: str) -> _Level:
        now = self._clock()
        level = self._levels.get(key)
        if level is None:
            return _Level(float(self.shape.burst), now)
        regained = (now - level.stamp) / self.shape.interval
        return _Level(min(float(self.shape.burst), level.tokens + regained), now)

    def wait(self, key: str) -> float:
        """Seconds until this bucket allows one more attempt (0: allowed now)."""
        level = self._level(key)
        return 0.0 if level.tokens >= 1 else (1 - level.tokens) * self.shape.interval

    def take(self, key: str) -> None:
        """Charge one failed attempt."""
        level = self._level(key)
        level.tokens = max(0.0, level.tokens - 1)
        self._levels[key] = level

    def forget(self, key: str) -> None:
        """Refill completely."""
        self._levels.pop(key, None)


@dataclass(frozen=True, slots=True)
class Limited:
    """A refusal: which bucket is empty and when to retry (whole seconds, at least 1)."""

    bucket: str
    retry_after: int


class LoginLimiter:
    """Decides whether a login may be attempted, and remembers how logins went."""

    def __init__(self, settings: LoginLimits, clock: Clock = time.monotonic) -> None:
        self.enabled = settings.enabled
        size = settings.max_entries
        self._user_client = _Buckets(settings.per_user_client, size, clock)
        self._client = _Buckets(settings.per_client, size, clock)
        self._user = _Buckets(settings.per_user, size, clock)
        self._known: TTLCache[tuple[str, str], bool] | None = (
            TTLCache(maxsize=size, ttl=settings.known_client_ttl, timer=clock)
            if settings.known_client_ttl > 0
            else None
        )

    def _known_client(self, user: str, client: str) -> bool:
        return self._known is not None and (user, client) in self._known

    def check(self, user: str | None, client: str | None) -> Limited | None:
        """Whether a login as `user` from `client` must be refused now (before any check)."""
        if not self.enabled:
            return None
        who, where = user_key(user), client_key(client)
        waits = [("client", self._client.wait(where))]
        if user is not None:
            waits.append(("user_client", self._user_client.wait(f"{who}\n{where}")))
            if not self._known_client(who, where):
                waits.append(("user", self._user.wait(who)))
        bucket, wait = max(waits, key=lambda item: item[1])
        if wait <= 0:
            return None
        return Limited(bucket, max(1, math.ceil(wait)))

    def failed(self, user: str | None, client: str | None) -> None:
        """Charge a failed login (`user` None: no user name was given, e.g. garbage)."""
        if not self.enabled:
            return
        who, where = user_key(user), client_key(client)
        self._client.take(where)
        if user is not None:
            self._user_client.take(f"{who}\n{where}")
            self._user.take(who)

    def succeeded(self, user: str, client: str | None) -> None:
        """A right password: this client is known for this user, its typos forgiven.

        The per-client bucket is not refilled: otherwise one valid account would let an
        address reset its own limit between guesses at other users.
        """
        if not self.enabled:
            return
        who, where = user_key(user), client_key(client)
        self._user_client.forget(f"{who}\n{where}")
        if self._known is not None:
            self._known[(who, where)] = True
