"""The one Redis connection of a gate process, shared by every store kept in Redis.

Owns how the gate talks to Redis (`redis:` in gate.yaml): one redis-py asyncio client per
process (a connection pool), opened from `RedisSettings` and closed at shutdown; the key
layout's prefix (`redis.key_prefix`, so several gates can share one Redis); and how a
Redis failure is seen by the stores above.

Redis holds state that makes several replicas one gate, never the only copy of what
decides a request: a dead Redis must cost efficiency, not correctness, and must cost it
fast. So the sockets have short timeouts (a blackholed Redis host fails a call within
about a second), a call is retried once at once (the pooled connection of a Redis that
restarted is dead; the retry reconnects), and a circuit breaker stops asking a Redis that
failed several calls in a row for a short cooldown (requests then take the degraded path
at once instead of each waiting out a timeout). Every failure, refused call included,
raises `SharedStateUnavailable` (an OCI 503 where a request cannot proceed) and counts in
`registry_gate_shared_state_errors_total{store}`; each store decides whether it degrades
(tags and repository holds: ask the upstream) or fails closed (new short-name pins).

A subscription (pub/sub, for invalidation notices) gets a connection of its own, outside
the pool and without the retry: a retried read would reconnect and subscribe again behind
the subscriber's back, hiding that notices were missed meanwhile; the subscriber must see
every loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.errors import ServiceUnavailable
from proxy.settings import RedisSettings
from proxy.upstream.circuit import CircuitBreaker, CircuitOpen

log = logging.getLogger(__name__)

T = TypeVar("T")

# A loopback or same-zone Redis answers in well under a millisecond: a second without an
# answer is a Redis that is gone, and every request would otherwise wait it out.
SOCKET_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0
# A pooled connection idle this long is PINGed before use (a restarted Redis, a NAT that
# dropped the flow), so the first call after a quiet spell does not fail.
HEALTH_CHECK_INTERVAL = 15
# Connections per process, and how long a call waits for a free one (under a burst; a
# dead Redis frees them within the timeouts above).
MAX_CONNECTIONS = 64
POOL_TIMEOUT = 5.0
# Consecutive failed calls that stop the gate asking Redis, and for how long (seconds).
BREAKER_FAILURES = 3
BREAKER_COOLDOWN = 2.0

ErrorObserver = Callable[[str], None]


class SharedStateUnavailable(ServiceUnavailable):
    """Redis could not be asked (down, unreachable, timed out, refused by the breaker)."""


class RedisState:
    """The Redis client, the key prefix and the failure policy, for the stores in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "registry-gate:",
        *,
        on_error: ErrorObserver | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._on_error = on_error
        self._breaker = breaker or CircuitBreaker(BREAKER_FAILURES, BREAKER_COOLDOWN)
        self._closed = False

    @classmethod
    def from_settings(
        cls,
        settings: RedisSettings,
        *,
        on_error: ErrorObserver | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> RedisState:
        """A client for `settings` (no connection is made until the first call)."""
        # Blocking: a burst of requests waits for one of the pool's connections instead
        # of failing ("too many connections") as if Redis were down.
        pool = redis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_TIMEOUT,
            password=settings.password(),
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=HEALTH_CHECK_INTERVAL,
            # One immediate retry on a connection error: enough to replace a pooled
            # connection a Redis restart killed, not enough to make a dead Redis slow.
            retry=Retry(NoBackoff(), 1),
            client_name="registry-gate",
        )
        client = redis.Redis.from_pool(pool)  # the client owns (and closes) the pool
        return cls(client, settings.key_prefix, on_error=on_error, breaker=breaker)

    def key(self, *parts: str) -> str:
        """A key under this gate's prefix: `<prefix><part>:<part>...`."""
        return self.prefix + ":".join(parts)

    async def call(self, store: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation for `store` (a metric label: pins, tags, repositories,
        ...); SharedStateUnavailable if Redis cannot answer now."""
        try:
            with self._breaker.attempt() as attempt:
                try:
                    result = await operation()
                except (RedisError, OSError):
                    attempt.failure()
                    raise
                attempt.success()
                return result
        except CircuitOpen:
            self._failed(store, None)
            raise SharedStateUnavailable(
                "the shared state (Redis) is unreachable; retrying shortly"
            ) from None
        except (RedisError, OSError) as exc:
            self._failed(store, exc)
            raise SharedStateUnavailable(
                f"the shared state (Redis) is unreachable: {type(exc).__name__}"
            ) from exc

    def _failed(self, store: str, exc: BaseException | None) -> None:
        if self._on_error is not None:
            self._on_error(store)
        if exc is not None:
            log.warning("redis call for %s failed: %s: %s", store, type(exc).__name__, exc)

    @contextlib.asynccontextmanager
    async def subscription(self) -> AsyncIterator[PubSub]:
        """A PubSub on a connection of its own (same server, credentials and timeouts as
        the pool's), closed on exit. Not retried: a lost connection raises out of its
        reads (redis-py tries one reconnection first, bounded by the connect timeout, and
        it is closed with the rest), and the subscriber opens another subscription."""
        pool = self.client.connection_pool
        kwargs = {
            **pool.connection_kwargs,
            "retry": Retry(NoBackoff(), 0),
            # The subscriber pings on its own schedule and wants to see every answer.
            "health_check_interval": 0,
        }
        own = redis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=1, **kwargs
        )
        pubsub = PubSub(own)
        try:
            yield pubsub
        finally:
            try:
                await pubsub.aclose()
            finally:
                await own.disconnect()

    async def ping(self) -> bool:
        """Whether Redis answers now (start-up logs a warning, not a failure, if not)."""
        try:
            await self.call("ping", self.client.ping)
        except SharedStateUnavailable:
            return False
        return True

    async def close(self) -> None:
        """Close the client and its pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self.client.aclose()
