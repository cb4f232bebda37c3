"""Metrics: the families of design §8, their types and bounded labels, the exposition."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy.observability.metrics import (
    CircuitState,
    Metrics,
    RateLimit,
    is_docker_user_agent,
    method_label,
    parse_ratelimit,
    status_label,
)

# name as exposed (counters without `_total` in the TYPE line) -> type, label names
FAMILIES = {
    "registry_gate_requests": ("counter", {"route", "method", "status"}),
    "registry_gate_request_duration_seconds": ("histogram", {"route", "method"}),
    "registry_gate_upstream_requests": ("counter", {"upstream", "method", "status"}),
    "registry_gate_upstream_request_duration_seconds": ("histogram", {"upstream"}),
    "registry_gate_upstream_ratelimit_remaining": ("gauge", {"upstream"}),
    "registry_gate_circuit_breaker_state": ("gauge", {"upstream"}),
    "registry_gate_digest_mismatches": ("counter", {"upstream"}),
    "registry_gate_cache_hits": ("counter", {"kind"}),
    "registry_gate_cache_misses": ("counter", {"kind"}),
    "registry_gate_cache_bytes": ("gauge", {"state"}),
    "registry_gate_cache_evictions": ("counter", set()),
    "registry_gate_served_bytes": ("counter", {"source"}),
    "registry_gate_inflight_fills": ("gauge", {"upstream"}),
    "registry_gate_stale_served": ("counter", {"upstream", "kind"}),
    "registry_gate_policy_decisions": ("counter", {"action", "decision", "rule"}),
    "registry_gate_policy_reloads": ("counter", {"outcome"}),
    "registry_gate_shortname_resolutions": ("counter", {"outcome"}),
    "registry_gate_denials_to_docker_clients": ("counter", {"action"}),
    "registry_gate_token_requests": ("counter", {"outcome"}),
    "registry_gate_audit_records": ("counter", set()),
    "registry_gate_audit_write_errors": ("counter", set()),
    "registry_gate_build_info": ("gauge", {"version"}),
}
UNBOUNDED = {"name", "repository", "repo", "reference", "tag", "digest", "path", "url", "user"}


def exercised() -> Metrics:
    metrics = Metrics(version="1.2.3")
    metrics.observe_request("manifest", "GET", 200, 0.01)
    metrics.observe_upstream("docker.io", "HEAD", 200, 0.2)
    metrics.observe_upstream("quay.io", "GET", None, 5.0)
    metrics.observe_ratelimit("docker.io", "76;w=21600")
    metrics.set_circuit_state("quay.io", CircuitState.OPEN)
    metrics.digest_mismatches.labels("quay.io").inc()
    metrics.cache_hits.labels("blob").inc()
    metrics.cache_misses.labels("manifest").inc()
    metrics.observe_cache_usage(1024, 512, 0)
    metrics.cache_evictions.inc()
    metrics.served_bytes.labels("cache").inc(512)
    metrics.inflight_fills.labels("docker.io").inc()
    metrics.stale_served.labels("docker.io", "tag").inc()
    metrics.observe_decision("pull", "deny", None)
    metrics.policy_reloads.labels("failure").inc()
    metrics.shortname_resolutions.labels("alias").inc()
    metrics.observe_denial("pull", "docker/24.0.7 go/go1.20.10 os/linux arch/amd64")
    metrics.token_requests.labels("issued").inc()
    metrics.audit_records.inc()
    metrics.audit_write_errors.inc()
    return metrics


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_every_family_is_exposed_with_its_type_and_labels() -> None:
    body, content_type = exercised().render()
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    for name, (kind, labels) in FAMILIES.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        names = {
            label
            for sample in family.samples
            for label in sample.labels
            if label not in ("le", "quantile")
        }
        assert names == labels, name
        assert family.documentation


def test_counter_names_end_in_total_and_units_are_suffixes() -> None:
    body, _ = exercised().render()
    text = body.decode()
    assert "registry_gate_requests_total{" in text
    assert "registry_gate_served_bytes_total{" in text
    assert "registry_gate_request_duration_seconds_bucket{" in text


def test_no_label_could_hold_a_repository_or_digest() -> None:
    metrics = exercised()
    for collector in metrics.registry._collector_to_names:
        labelnames = set(getattr(collector, "_labelnames", ()))
        assert not labelnames & UNBOUNDED, collector


def test_process_metrics_are_on_the_private_registry() -> None:
    body, _ = Metrics().render()
    assert b"process_cpu_seconds_total" in body or b"python_info" in body
    assert b"process_" not in Metrics(process_collectors=False).render()[0]


def test_instances_do_not_share_counters_or_the_global_registry() -> None:
    first, second = Metrics(), Metrics()
    first.cache_evictions.inc(3)
    assert second.cache_evictions._value.get() == 0
    assert REGISTRY.get_sample_value("registry_gate_cache_evictions_total") is None


def test_helpers_fold_values_into_bounded_labels() -> None:
    metrics = Metrics(process_collectors=False)
    metrics.observe_request("blob", "brew", 999, 0.1)
    metrics.observe_request("blob", "get", 404, 0.1)
    metrics.observe_decision("pull", "allow", "corp-internal")
    values = samples(metrics)
    assert (
        values[
            "registry_gate_requests_total",
            frozenset({("route", "blob"), ("method", "other"), ("status", "other")}),
        ]
        == 1
    )
    assert (
        values[
            "registry_gate_requests_total",
            frozenset({("route", "blob"), ("method", "GET"), ("status", "404")}),
        ]
        == 1
    )
    assert (
        values[
            "registry_gate_policy_decisions_total",
            frozenset({("action", "pull"), ("decision", "allow"), ("rule", "corp-internal")}),
        ]
        == 1
    )


def test_default_rule_label_and_gauges() -> None:
    values = samples(exercised())
    decision = frozenset({("action", "pull"), ("decision", "deny"), ("rule", "default")})
    assert values["registry_gate_policy_decisions_total", decision] == 1
    upstream = frozenset({("upstream", "docker.io")})
    assert values["registry_gate_upstream_ratelimit_remaining", upstream] == 76
    assert values["registry_gate_circuit_breaker_state", frozenset({("upstream", "quay.io")})] == 2
    error = frozenset({("upstream", "quay.io"), ("method", "GET"), ("status", "error")})
    assert values["registry_gate_upstream_requests_total", error] == 1


def test_denials_are_counted_for_docker_daemons_only() -> None:
    metrics = Metrics(process_collectors=False)
    metrics.observe_denial("pull", "containerd/v1.7.13")
    metrics.observe_denial("pull", "containers/5.29 (github.com/containers/image)")
    metrics.observe_denial("pull", None)
    assert metrics.denials_to_docker_clients.labels("pull")._value.get() == 0
    metrics.observe_denial("pull", "docker/26.1.5 go/go1.21.13 git-commit/411e817")
    assert metrics.denials_to_docker_clients.labels("pull")._value.get() == 1


def test_a_malformed_ratelimit_header_leaves_the_gauge_alone() -> None:
    metrics = Metrics(process_collectors=False)
    metrics.observe_ratelimit("docker.io", "10;w=21600")
    metrics.observe_ratelimit("docker.io", "lots")
    metrics.observe_ratelimit("docker.io", None)
    assert metrics.upstream_ratelimit_remaining.labels("docker.io")._value.get() == 10


def test_token_failures_are_counted_by_upstream_and_reason() -> None:
    metrics = Metrics(process_collectors=False)
    metrics.observe_token_failure("quay.io", "realm_refused")
    metrics.observe_token_failure("quay.io", "realm_refused")
    metrics.observe_token_failure("docker.io", "timeout")
    counter = metrics.upstream_token_failures
    assert counter.labels("quay.io", "realm_refused")._value.get() == 2
    assert counter.labels("docker.io", "timeout")._value.get() == 1
    body, _ = metrics.render()
    assert b"registry_gate_upstream_token_failures_total{" in body


def test_openmetrics_is_served_when_asked_for() -> None:
    body, content_type = exercised().render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("76;w=21600", RateLimit(76, 21600)),
        ("100", RateLimit(100, None)),
        (" 0 ; w=21600 ", RateLimit(0, 21600)),
        ("100, 100;w=21600", RateLimit(100, None)),
        ("5;w=60;policy=x", RateLimit(5, 60)),
        ("", None),
        (None, None),
        ("-1;w=21600", None),
        ("seventy", None),
        ("76;w=soon", RateLimit(76, None)),
    ],
)
def test_parse_ratelimit(header: str | None, expected: RateLimit | None) -> None:
    assert parse_ratelimit(header) == expected


def test_label_helpers() -> None:
    assert method_label("patch") == "PATCH"
    assert method_label("PROPFIND") == "other"
    assert status_label(None) == "error"
    assert status_label(201) == "201"
    assert status_label(42) == "other"
    assert is_docker_user_agent("Docker/20.10.7")
    assert not is_docker_user_agent("buildkit/v0.12")
    assert not is_docker_user_agent("")


def test_bound_children_count_like_labels_each_time() -> None:
    """observe_request/observe_decision/bound keep label children; the counts they
    produce are the ones asking `labels()` every time would."""
    metrics = Metrics(process_collectors=False)
    for _ in range(3):
        metrics.observe_request("manifest", "GET", 200, 0.01)
        metrics.observe_request("manifest", "HEAD", 200, 0.01)
        metrics.observe_request("blob", "GET", 404, 0.01)
        metrics.observe_request("blob", "brew", 200, 0.01)
        metrics.observe_request("blob", "PROPFIND", 200, 0.01)  # folds into "other" too
        metrics.observe_decision("pull", "allow", None)
        metrics.bound(metrics.cache_hits, "tag").inc()
    values = samples(metrics)

    def requests(route: str, method: str, status: str) -> float:
        labels = frozenset({("route", route), ("method", method), ("status", status)})
        return values["registry_gate_requests_total", labels]

    assert requests("manifest", "GET", "200") == 3
    assert requests("manifest", "HEAD", "200") == 3
    assert requests("blob", "GET", "404") == 3
    assert requests("blob", "other", "200") == 6
    decisions = frozenset({("action", "pull"), ("decision", "allow"), ("rule", "default")})
    assert values["registry_gate_policy_decisions_total", decisions] == 3
    assert values["registry_gate_cache_hits_total", frozenset({("kind", "tag")})] == 3
    duration = frozenset({("route", "manifest"), ("method", "GET")})
    assert values["registry_gate_request_duration_seconds_count", duration] == 3
