"""Single-flight across replicas: one upstream fetch per digest however many replicas miss.

Owns where a replica's fill gets its bytes when Redis is configured. Within a process,
`FillCoordinator` already makes one fill per digest; this decides that fill's source:

- the replica that claims the digest's fill lease (`fill_leases`) fetches from upstream,
  renewing the lease while its fill runs and releasing it when the fill ends;
- a replica that finds the lease held streams the blob from the holder's
  `GET /_replica/fills/<digest>` (`proxy.http.replica_routes`), authenticated with the
  shared secret (`proxy.auth.replica_auth`). On the holder that endpoint is one more
  reader of its fill, so bytes flow as they arrive upstream, with the 32 KiB tail
  withheld until the holder verified the digest; this replica fills its own cache from
  that stream (with a store all replicas share, such as S3, only a local spool: the
  holder publishes the blob) and verifies the digest again, and its clients read its
  fill as usual;
- when the holder cannot be reached, refuses, or is not filling the digest (its fill
  failed, or found no room), this replica waits until the lease changes (released, or
  expired: a dead holder stops renewing) for at most the lease bound, then claims again;
- when Redis cannot be asked, or the holder stays unreachable while its lease lives on,
  this replica fetches from upstream itself, without a lease: efficiency is lost, never
  correctness (every fill verifies the digest, whatever its source).

A holder that dies mid-fill closes its streams (the kernel resets the connections; a
frozen holder is cut by the read timeout): the fills streaming from it fail, so their
clients' bodies end short and they retry; the next miss claims the lease once it expired.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp

from proxy.auth.replica_auth import ReplicaSigner, peer_session
from proxy.content.fill_leases import FillLeases, LeaseOwner, LeasesUnavailable
from proxy.content.singleflight import OpenUpstream, UpstreamBlob
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.observability.metrics import Metrics
from proxy.settings import Settings
from proxy.storage.redis_client import RedisState

log = logging.getLogger(__name__)

PEER_PATH = "/_replica/fills/{digest}"
PEER_CHUNK = 1024 * 1024
PEER_CONNECT_TIMEOUT = 3.0
# Claims tried before giving up on the lease and fetching upstream unleased (each waits
# at most a lease bound): a holder that keeps failing its fills must not stall a miss.
MAX_ROUNDS = 3
# After Redis failed to answer, misses skip the lease for this long instead of each
# spending the Redis timeouts first.
REDIS_BACKOFF = 5.0


class ReplicaFills:
    """Chooses the source of each fill on a replica: upstream under the lease, or the
    replica holding it."""

    def __init__(
        self,
        leases: FillLeases,
        signer: ReplicaSigner,
        metrics: Metrics | None,
        *,
        peer_read_timeout: float,
    ) -> None:
        self.leases = leases
        self.signer = signer
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=PEER_CONNECT_TIMEOUT, sock_read=peer_read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._leases_down_until = 0.0

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics | None, shared: RedisState | None
    ) -> ReplicaFills | None:
        """The service for `settings` (None without `redis`: single-flight stays local);
        its leases live in the process's one Redis client (`shared`, closed by its owner)."""
        if shared is None:
            return None
        assert settings.upload_secret is not None  # required with redis (settings)
        duration = settings.replica.fill_lease
        leases = FillLeases(
            shared.client, settings.replica.id, settings.peer_url(), duration, shared.prefix
        )
        # A live holder sends something at least as often as its upstream does (or fails
        # and cuts the stream); one that is frozen is cut after the same wait plus a lease.
        read = max(u.timeouts.read for u in settings.upstreams) + duration
        signer = ReplicaSigner(settings.upload_secret.encode())
        return cls(leases, signer, metrics, peer_read_timeout=read)

    async def start(self) -> None:
        self._session = peer_session(self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def source(self, digest: str, open_upstream: OpenUpstream) -> OpenUpstream:
        """The source of a fill of `digest` on this replica (see the module docstring)."""

        @contextlib.asynccontextmanager
        async def open_source() -> AsyncIterator[UpstreamBlob]:
            async with contextlib.AsyncExitStack() as stack:
                yield await self._open(digest, open_upstream, stack)

        return open_source

    async def _open(
        self, digest: str, open_upstream: OpenUpstream, stack: contextlib.AsyncExitStack
    ) -> UpstreamBlob:
        rounds = MAX_ROUNDS if time.monotonic() >= self._leases_down_until else 0
        for _ in range(rounds):
            try:
                claim = await stack.enter_async_context(self.leases.claim(digest))
            except LeasesUnavailable as exc:
                self._leases_down(exc, digest)
                break
            if claim.held:
                self._count("upstream")
                # Entered after the lease: released before it, once the fill has ended.
                return await stack.enter_async_context(open_upstream())
            if claim.token is None:
                continue  # released meanwhile: claim again
            # A holder at our own address is a former run of this replica (restarted
            # within the lease): asking ourselves would find this very fill, unopened.
            if claim.owner is not None and claim.owner.url != self.leases.me.url:
                blob = await self._open_peer(digest, claim.owner, stack)
                if blob is not None:
                    self._count("peer")
                    return blob
            try:
                changed = await self.leases.wait_changed(digest, claim.token)
            except LeasesUnavailable as exc:
                self._leases_down(exc, digest)
                break
            if not changed:
                log.warning(
                    "the replica holding the fill of %s is alive but unreachable: fetching it"
                    " unleased",
                    digest,
                )
                break
        self._count("unleased")
        return await stack.enter_async_context(open_upstream())

    async def _open_peer(
        self, digest: str, owner: LeaseOwner, stack: contextlib.AsyncExitStack
    ) -> UpstreamBlob | None:
        """The holder's stream of its fill, or None if it cannot give one now."""
        assert self._session is not None, "ReplicaFills.start() was not called"
        path = PEER_PATH.format(digest=digest)
        try:
            response = await self._session.get(
                owner.url + path,
                headers=self.signer.sign("GET", path),
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("replica %s did not answer for %s: %r", owner.replica, digest, exc)
            return None
        if response.status != 200:
            response.release()
            log.info(
                "replica %s answered %d for its fill of %s", owner.replica, response.status, digest
            )
            return None
        stack.callback(response.release)
        return UpstreamBlob(response.content_length, _chunks(response, owner), from_peer=True)

    def _leases_down(self, error: LeasesUnavailable, digest: str) -> None:
        log.warning(
            "fill leases unavailable (%s): fetching %s unleased, and other misses for %.0f s",
            error,
            digest,
            REDIS_BACKOFF,
        )
        self._leases_down_until = time.monotonic() + REDIS_BACKOFF

    def _count(self, source: str) -> None:
        if self._metrics is not None:
            self._metrics.replica_fill_sources.labels(source).inc()


async def _chunks(response: aiohttp.ClientResponse, owner: LeaseOwner) -> AsyncIterator[bytes]:
    # What the client may read: not the holder's address (an internal detail).
    try:
        async for chunk in response.content.iter_chunked(PEER_CHUNK):
            yield chunk
    except TimeoutError as exc:
        raise UpstreamTimeout("the replica filling this blob stalled; retry") from exc
    except aiohttp.ClientError as exc:
        log.warning("the stream from replica %s ended short: %r", owner.replica, exc)
        raise UpstreamUnavailable("the replica filling this blob failed; retry") from exc
