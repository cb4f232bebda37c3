"""Prometheus metrics: every `registry_gate_*` family, on a registry owned by one `Metrics`.

Owns the metric families of design §8, their label vocabularies and the exposition of
`/metrics`. Each `Metrics` has a private `CollectorRegistry` (never prometheus-client's
global one), so an app, a test or a second gate in one process never share counters.

Labels are bounded by construction: routes are route-table names, upstreams and rule
names come from configuration, methods and statuses are folded into fixed sets; a
repository name, tag or digest is never a label value.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from proxy.upstream.circuit import CircuitState

# Manifests answer in milliseconds, cold blob fills in minutes: the buckets span both.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DEFAULT_RULE = "default"
_RATELIMIT = re.compile(r"\s*(\d+)\s*(?:;(.*))?")
_WINDOW = re.compile(r"(?:^|;)\s*w\s*=\s*(\d+)\s*(?:;|$)")
# Set (by `serve --workers`, before the workers start) when several processes are one gate:
# prometheus-client then keeps every value in files there, and `/metrics` sums them.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Label children bound per label-value tuple at most (label values are bounded anyway;
# past this, `labels()` is asked each time, as before binding).
_MAX_BOUND = 4096


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A parsed `ratelimit-remaining` / `ratelimit-limit` header (`76;w=21600`)."""

    value: int
    window_seconds: int | None = None


def parse_ratelimit(header: str | None) -> RateLimit | None:
    """Parse Docker Hub's `ratelimit-remaining: 76;w=21600`; None when absent or malformed.

    Of a list (`100, 100;w=21600`, an older draft's form) the first entry counts.
    """
    if not header:
        return None
    match = _RATELIMIT.fullmatch(header.split(",", 1)[0])
    if match is None:
        return None
    window = _WINDOW.search(match.group(2) or "")
    return RateLimit(int(match.group(1)), int(window.group(1)) if window else None)


def method_label(method: str) -> str:
    """A request method as a label: one of the methods the API uses, else `other`."""
    upper = method.upper()
    return upper if upper in HTTP_METHODS else "other"


def status_label(status: int | None) -> str:
    """An HTTP status as a label; `error` when there was no response (connection failed)."""
    if status is None:
        return "error"
    return str(status) if 100 <= status <= 599 else "other"


def is_docker_user_agent(user_agent: str | None) -> bool:
    """Whether a request comes from a Docker daemon (`docker/24.0.7 go/go1.20 ...`)."""
    return user_agent is not None and user_agent.lower().startswith("docker/")


def _version() -> str:
    try:
        return metadata.version("registry-gate")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """The gate's metric families; hand one instance to every component that counts."""

    def __init__(self, *, process_collectors: bool = True, version: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._decision_children: dict[tuple[str, str, str | None], Counter] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        # What `/metrics` shows: this registry, or with several workers (multiprocess mode,
        # chosen by prometheus-client at import from the environment) every worker's
        # values merged, so that any worker answers for the whole gate. Gauges say how
        # their workers' values merge (`multiprocess_mode`); the process collectors
        # describe one process and are not merged (prometheus-client's limitation).
        self._exposed = registry
        if os.environ.get(MULTIPROC_DIR_ENV):
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]
        if process_collectors:
            # The default registry would carry these; a private registry must add them.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

        self.build_info = Gauge(
            "registry_gate_build_info",
            "Always 1; the version label says which gate is running.",
            ["version"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.build_info.labels(version or _version()).set(1)

        # Client-facing requests.
        self.requests = Counter(
            "registry_gate_requests_total",
            "Client requests by route template, method and response status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "registry_gate_request_duration_seconds",
            "Time to answer a client request (headers and body), by route and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        # Upstream registries.
        self.upstream_requests = Counter(
            "registry_gate_upstream_requests_total",
            "Requests the gate sent upstream, by upstream registry, method and status "
            "(status `error` when no response arrived).",
            ["upstream", "method", "status"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "registry_gate_upstream_request_duration_seconds",
            "Time until an upstream answered (response headers), by upstream registry.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_ratelimit_remaining = Gauge(
            "registry_gate_upstream_ratelimit_remaining",
            "Pulls left in the upstream's rate-limit window (Docker Hub ratelimit-remaining).",
            ["upstream"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.circuit_breaker_state = Gauge(
            "registry_gate_circuit_breaker_state",
            "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.upstream_token_failures = Counter(
            "registry_gate_upstream_token_failures_total",
            "Failed token fetches from an upstream's token service, by upstream registry and "
            "reason (realm_refused, credentials_refused, error_status, unreachable, timeout, "
            "invalid_response).",
            ["upstream", "reason"],
            registry=registry,
        )
        self.digest_mismatches = Counter(
            "registry_gate_digest_mismatches_total",
            "Upstream content that did not hash to its digest (discarded, never cached).",
            ["upstream"],
            registry=registry,
        )
        self.fill_failures = Counter(
            "registry_gate_cache_fill_failures_total",
            "Cache fills that did not complete (upstream failed or cut the transfer).",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.upload_aborts = Counter(
            "registry_gate_upload_aborts_total",
            "Uploads the gate ended, by reason (digest_mismatch, too_slow, client_gone, "
            "upstream_error, unverifiable, refused, invalid) and whether the upstream "
            "session was cancelled (cancelled: yes, no).",
            ["reason", "cancelled"],
            registry=registry,
        )

        # Cache.
        self.cache_hits = Counter(
            "registry_gate_cache_hits_total",
            "Requests answered from the cache, by kind (blob, manifest, tag, referrers).",
            ["kind"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "registry_gate_cache_misses_total",
            "Requests the cache could not answer, by kind (blob, manifest, tag, referrers).",
            ["kind"],
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "registry_gate_cache_bytes",
            "Blob bytes on the cache disk by state (published, filling: reserved by fills in "
            "progress, removed_open: removed but not yet gone); their sum is what "
            "storage.max_size bounds.",
            ["state"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.shared_state_errors = Counter(
            "registry_gate_shared_state_errors_total",
            "Calls to the shared state (Redis) that failed or were refused while it is "
            "unreachable, by store (pins, tags, repositories, ...); requests degrade or get "
            "a 503, see the README's shared state section.",
            ["store"],
            registry=registry,
        )
        self.cache_evictions = Counter(
            "registry_gate_cache_evictions_total",
            "Cache entries evicted to stay under the size limit.",
            registry=registry,
        )
        self.served_bytes = Counter(
            "registry_gate_served_bytes_total",
            "Body bytes sent to clients, by source (cache or upstream).",
            ["source"],
            registry=registry,
        )
        self.blob_redirects = Counter(
            "registry_gate_blob_redirects_total",
            "Cached blob GETs answered with a redirect to the blob store (its own URL).",
            registry=registry,
        )
        self.tag_revalidations = Counter(
            "registry_gate_tag_revalidations_total",
            "Upstream HEADs asking what a tag points at (one at a time per tag), by upstream "
            "and outcome (new, unchanged, moved, failed).",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.tag_revalidation_followers = Counter(
            "registry_gate_tag_revalidation_followers_total",
            "Tag requests that found a revalidation of their tag under way, by upstream and "
            "how they were answered (served_cached: within storage.revalidate_grace; "
            "waited: joined the revalidation).",
            ["upstream", "how"],
            registry=registry,
        )
        self.inflight_fills = Gauge(
            "registry_gate_inflight_fills",
            "Blob transfers from an upstream in progress: cache fills (one per digest however "
            "many readers) and relays of blobs the cache had no room for.",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.replica_fill_sources = Counter(
            "registry_gate_replica_fill_sources_total",
            "Cache fills started on this replica with Redis configured, by where their bytes "
            "came from (upstream: this replica held the fill lease; peer: streamed from the "
            "replica holding it; unleased: fetched upstream without a lease, Redis being "
            "unavailable or the holder unreachable past the lease bound).",
            ["source"],
            registry=registry,
        )
        self.replica_streams_served = Counter(
            "registry_gate_replica_streams_served_total",
            "Fill streams requested by other replicas, by outcome (ok, failed: ended short, "
            "not_found: no such fill or cached blob here, refused: not authenticated).",
            ["outcome"],
            registry=registry,
        )
        self.upload_forwards = Counter(
            "registry_gate_upload_forwards_total",
            "Upload requests for a session another replica owns, handed to it, by outcome "
            "(relayed: the owner answered; owner_gone: it did not answer as owner, the "
            "session was cancelled; client_failed: the client's body failed on the way; "
            "refused: a hop to this replica not signed with the shared secret).",
            ["outcome"],
            registry=registry,
        )
        self.stale_served = Counter(
            "registry_gate_stale_served_total",
            "Cached answers served stale because their upstream failed, by upstream and kind "
            "(tag, referrers).",
            ["upstream", "kind"],
            registry=registry,
        )

        # Policy, resolution, auth.
        self.policy_decisions = Counter(
            "registry_gate_policy_decisions_total",
            "Policy decisions by action, decision (allow, deny, audit-deny) and rule name "
            "(`default` when no rule matched).",
            ["action", "decision", "rule"],
            registry=registry,
        )
        self.policy_reloads = Counter(
            "registry_gate_policy_reloads_total",
            "Policy reloads by outcome (success, failure: the old policy stays in force).",
            ["outcome"],
            registry=registry,
        )
        self.shortname_resolutions = Counter(
            "registry_gate_shortname_resolutions_total",
            "Short-name resolutions by outcome (alias, pin, search, denied, not_found, error).",
            ["outcome"],
            registry=registry,
        )
        self.denials_to_docker_clients = Counter(
            "registry_gate_denials_to_docker_clients_total",
            "Denials answered to Docker daemons, which fall back to Docker Hub on a mirror "
            "error: non-zero means the perimeter needs egress control.",
            ["action"],
            registry=registry,
        )
        self.token_requests = Counter(
            "registry_gate_token_requests_total",
            "Requests to the gate's token endpoint by outcome.",
            ["outcome"],
            registry=registry,
        )

        self.login_failures = Counter(
            "registry_gate_login_failures_total",
            "Refused logins (token endpoint, Basic on operator endpoints) by reason: "
            "unknown_user, wrong_password, malformed, unsupported_scheme, "
            "invalid_refresh_token, limited.",
            ["reason"],
            registry=registry,
        )
        self.logins_limited = Counter(
            "registry_gate_logins_limited_total",
            "Logins refused unchecked (429) by the bucket that was empty: "
            "user_client, client, user.",
            ["bucket"],
            registry=registry,
        )

        # Audit.
        self.audit_records = Counter(
            "registry_gate_audit_records_total",
            "Audit records written.",
            registry=registry,
        )
        self.audit_write_errors = Counter(
            "registry_gate_audit_write_errors_total",
            "Failed audit writes (retried for the file; a stream sink only loses its copy).",
            registry=registry,
        )
        self.audit_dropped = Counter(
            "registry_gate_audit_dropped_total",
            "Audit records not written to the audit log (each is logged instead), by reason.",
            ["reason"],
            registry=registry,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one client request (`route` is the route template name, never a path)."""
        key = (route, method, status)
        bound = self._request_children.get(key)
        if bound is None:
            # Bound once per (route, method, status): `labels()` takes a lock and builds
            # tuples on every call, which the per-request path should not pay. All three
            # are bounded (route names, API methods, statuses), so this stays small.
            label = method_label(method)
            bound = (
                self.requests.labels(route, label, status_label(status)),
                self.request_duration.labels(route, label),
            )
            if len(self._request_children) < _MAX_BOUND:
                self._request_children[key] = bound
        bound[0].inc()
        bound[1].observe(seconds)

    def observe_upstream(
        self, upstream: str, method: str, status: int | None, seconds: float
    ) -> None:
        """Count one upstream request (`status` None: no response, e.g. connection refused)."""
        self.upstream_requests.labels(upstream, method_label(method), status_label(status)).inc()
        self.upstream_duration.labels(upstream).observe(seconds)

    def observe_decision(self, action: str, decision: str, rule: str | None) -> None:
        """Count one policy decision; `rule` None means the default decision applied."""
        key = (action, decision, rule)
        child = self._decision_children.get(key)
        if child is None:
            child = self.policy_decisions.labels(action, decision, rule or DEFAULT_RULE)
            if len(self._decision_children) < _MAX_BOUND:
                self._decision_children[key] = child
        child.inc()

    def bound(self, metric: Counter, *labels: str) -> Counter:
        """`metric.labels(*labels)`, bound once and kept (for per-request counters whose
        label values are bounded: cache hit kinds, served-bytes sources)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < _MAX_BOUND:
                self._children[key] = child
        return child

    def observe_denial(self, action: str, user_agent: str | None) -> None:
        """Note a denial answered to a client; counted when the client is a Docker daemon."""
        if is_docker_user_agent(user_agent):
            self.denials_to_docker_clients.labels(action).inc()

    def observe_ratelimit(self, upstream: str, remaining_header: str | None) -> None:
        """Set the rate-limit gauge from a `ratelimit-remaining` header, when it has one."""
        parsed = parse_ratelimit(remaining_header)
        if parsed is not None:
            self.upstream_ratelimit_remaining.labels(upstream).set(parsed.value)

    def observe_token_failure(self, upstream: str, reason: str) -> None:
        """Count one failed token fetch (`reason` is one of a fixed set, see upstream.py)."""
        self.upstream_token_failures.labels(upstream, reason).inc()

    def observe_cache_usage(self, published: int, filling: int, removed_open: int) -> None:
        """Publish the blob cache's disk use by state (read at each scrape)."""
        self.cache_bytes.labels("published").set(published)
        self.cache_bytes.labels("filling").set(filling)
        self.cache_bytes.labels("removed_open").set(removed_open)

    def set_circuit_state(self, upstream: str, state: CircuitState) -> None:
        """Publish an upstream's circuit breaker state."""
        self.circuit_breaker_state.labels(upstream).set(int(state))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The `/metrics` body and content type for a request's `Accept` header.

        OpenMetrics when asked for, otherwise the text format 0.0.4 every scraper reads
        (prometheus-client's own "latest" text version is newer than many scrapers).
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self._exposed), content_type
