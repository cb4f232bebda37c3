"""Benchmark: policy decision time with 10 and 1,000 rules (prints a table, asserts nothing).

Run: `python3 bench/policy_decisions.py [--iterations N]`.

Each scenario times single `Policy.decide` calls (the first call of a scenario, which
builds the per-(registry, action) rule index, is reported separately) and prints the
median and 99th percentile. The 1,000-rule policy puts 990 per-team rules on the internal
registry in front of the enterprise example's rules, so a Docker Hub pull is decided by
rule 993 and a push by the last team has to look at every team rule before it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

from proxy.names.references import Repository
from proxy.policy.principal import ANONYMOUS, Principal
from proxy.policy.rules import Policy, parse_policies

ENTERPRISE_RULES = """\
  - name: corp-internal-pull
    match: "registry.corp.example/**"
    actions: [pull]
    allow: true
  - name: no-public-push
    match: "**"
    actions: [push, delete]
    allow: false
  - name: hub-official-images
    match: "docker.io/library/*"
    actions: [pull]
    allow: true
    deny_tags: [latest]
  - name: quay-coreos
    match: "quay.io/coreos/*"
    actions: [pull]
    allow: true
    groups: [platform]
"""


def small_policy() -> Policy:
    """Ten rules: a few team rules, a wildcard-host rule, an audit rule, the enterprise four."""
    extra = "".join(
        f"""  - name: team-{i}
    match: "registry.corp.example/team-{i}/**"
    actions: [push, delete]
    allow: true
    groups: [team-{i}]
"""
        for i in range(4)
    )
    extra += """  - name: edge-registries
    match: "*.edge.example/**"
    actions: [pull]
    allow: true
  - name: dry-run-rc
    match: "**"
    actions: [pull]
    allow: true
    deny_tags: ["*-rc*"]
    mode: audit
"""
    text = "search: [registry.corp.example, docker.io]\ndefault: deny\nrules:\n"
    return parse_policies([("bench-10.yaml", text + extra + ENTERPRISE_RULES)])


def large_policy() -> Policy:
    """1,000 rules: 990 per-team rules on the internal registry, 6 others, the enterprise 4."""
    teams = "".join(
        f"""  - name: team-{i}
    match: ["registry.corp.example/team-{i}/**", "registry.corp.example/shared/team-{i}-*"]
    actions: [push, delete]
    allow: true
    groups: [team-{i}]
"""
        for i in range(990)
    )
    others = "".join(
        f"""  - name: region-{i}
    match: "registry-{i}.*.corp.example/**"
    actions: [pull]
    allow: true
"""
        for i in range(6)
    )
    text = "search: [registry.corp.example, docker.io]\ndefault: deny\nrules:\n"
    policy = parse_policies([("bench-1000.yaml", text + teams + others + ENTERPRISE_RULES)])
    assert len(policy.rules) == 1000
    return policy


def unindexable_policy() -> Policy:
    """1,000 rules the indexes cannot narrow: one registry, no subjects, wildcard first
    components; the request matches only the last one (the worst case, linear)."""
    rules = "".join(
        f"""  - name: app-{i}
    match: "registry.corp.example/*/app-{i}"
    actions: [pull]
    allow: true
"""
        for i in range(1000)
    )
    return parse_policies([("bench-worst.yaml", "default: deny\nrules:\n" + rules)])


def measure(call: Callable[[], object], iterations: int) -> tuple[float, float, float]:
    """(first call, median, p99) in microseconds."""
    start = time.perf_counter_ns()
    call()
    first = (time.perf_counter_ns() - start) / 1000
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    median = statistics.median(samples) / 1000
    p99 = samples[int(len(samples) * 0.99) - 1] / 1000
    return first, median, p99


def scenarios() -> list[tuple[str, Principal, str, Repository, str]]:
    """What a cached pull and a push ask of the policy: (label, principal, action, repo, tag)."""
    hub = Repository.of("docker.io", "ubuntu")
    corp = Repository("registry.corp.example", "team-989/app")
    last_team = Principal("dev", frozenset({"team-989"}))
    platform = Principal("ops", frozenset({"platform"}))
    return [
        ("pull docker.io/library/ubuntu:22.04", ANONYMOUS, "pull", hub, "22.04"),
        ("pull docker.io/library/ubuntu:latest (denied)", ANONYMOUS, "pull", hub, "latest"),
        (
            "pull quay.io/coreos/etcd (group rule)",
            platform,
            "pull",
            Repository("quay.io", "coreos/etcd"),
            "v3",
        ),
        ("push corp/team-989/app (last team)", last_team, "push", corp, "1.0"),
        ("push corp/team-989/app (no team: default)", ANONYMOUS, "push", corp, "1.0"),
        ("pull ghcr.io/x/y (default deny)", ANONYMOUS, "pull", Repository("ghcr.io", "x/y"), "1"),
    ]


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'rules':>5}  {'scenario':<46} {'first µs':>9} {'median µs':>10} {'p99 µs':>8}")
    _, median, p99 = measure(lambda: None, args.iterations)
    print(
        f"{'-':>5}  {'(an empty call: the timer overhead)':<46} {'':>9} {median:10.2f} {p99:8.2f}"
    )
    for label, build in (("10", small_policy), ("1000", large_policy)):
        policy = build()
        for name, principal, action, repository, tag in scenarios():
            call = functools.partial(policy.decide, principal, action, repository, tag)
            first, median, p99 = measure(call, args.iterations)
            print(f"{label:>5}  {name:<46} {first:9.1f} {median:10.2f} {p99:8.2f}")
    worst = unindexable_policy()
    call = functools.partial(
        worst.decide, ANONYMOUS, "pull", Repository("registry.corp.example", "x/app-999"), "1"
    )
    first, median, p99 = measure(call, max(args.iterations // 10, 100))
    name = "pull corp/x/app-999 (no index applies)"
    print(f"{'1000':>5}  {name:<46} {first:9.1f} {median:10.2f} {p99:8.2f}")


if __name__ == "__main__":
    main()
