"""Explaining decisions and resolution paths without a request (proxy/policy/explain.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.errors import NameInvalid, UpstreamUnavailable
from proxy.names.references import Repository
from proxy.policy.explain import explain, format_explanation
from proxy.policy.principal import ANONYMOUS, Principal
from proxy.policy.rules import Policy, load_policy, parse_policies
from proxy.storage.pins import MemoryPinStore

POLICIES = Path(__file__).resolve().parent.parent / "policies"
CORP = "registry.corp.example"
DIGEST = "sha256:" + "c" * 64


@pytest.fixture
def enterprise() -> Policy:
    return load_policy([POLICIES / "enterprise.yaml"])


async def test_ambiguous_short_name_lists_candidates_with_their_decisions(
    enterprise: Policy,
) -> None:
    result = await explain(enterprise, MemoryPinStore(), ANONYMOUS, "pull", "ubuntu")
    assert result.short_name == "ubuntu" and result.tag == "latest"
    assert result.reason == "undetermined" and result.decision is None
    assert result.allowed is None
    corp, hub = result.candidates
    assert (str(corp.repository), corp.search_position) == (f"{CORP}/ubuntu", 0)
    assert corp.decision.allowed and corp.decision.rule_name == "corp-internal"
    assert (str(hub.repository), hub.search_position) == ("docker.io/library/ubuntu", 1)
    assert not hub.decision.allowed and hub.decision.rule_name == "hub-official-images"
    assert any("clients use :latest" in note for note in result.notes)
    text = format_explanation(result)
    assert "search[0] registry.corp.example/ubuntu:latest" in text
    assert "search[1] docker.io/library/ubuntu:latest" in text
    assert 'DENIED by rule "hub-official-images"' in text
    assert "enterprise.yaml rules[2]" in text
    assert "depends on which candidate" in text


async def test_same_outcome_for_every_candidate(enterprise: Policy) -> None:
    result = await explain(enterprise, MemoryPinStore(), ANONYMOUS, "pull", "ubuntu:22.04")
    assert result.allowed is True and result.decision is None
    assert "ALLOWED whichever candidate" in format_explanation(result)


async def test_alias(enterprise: Policy) -> None:
    result = await explain(enterprise, MemoryPinStore(), ANONYMOUS, "pull", "mysql:8")
    assert result.reason == "alias"
    assert result.resolved == Repository(CORP, "dba/mysql")
    assert result.decision is not None and result.decision.rule_name == "corp-internal"
    assert result.decision.rule is not None and result.decision.rule.index == 0


async def test_pin(enterprise: Policy) -> None:
    pins = MemoryPinStore()
    await pins.set("ubuntu", Repository.of("docker.io", "ubuntu"))
    result = await explain(enterprise, pins, ANONYMOUS, "pull", "ubuntu")
    assert result.reason == "pin"
    assert result.resolved == Repository("docker.io", "library/ubuntu")
    assert result.allowed is False
    assert any("remove the pin" in note for note in result.notes)
    assert "resolved by pin" in format_explanation(result)


async def test_fully_qualified(enterprise: Policy) -> None:
    platform = Principal("alice", frozenset({"platform"}))
    result = await explain(enterprise, MemoryPinStore(), platform, "pull", "quay.io/coreos/etcd:v3")
    assert result.reason == "qualified" and result.allowed
    assert result.decision is not None and result.decision.rule_name == "quay-coreos"
    anonymous = await explain(
        enterprise, MemoryPinStore(), ANONYMOUS, "pull", "quay.io/coreos/etcd"
    )
    assert anonymous.allowed is False
    assert "DENIED by the policy default" in format_explanation(anonymous)


async def test_tag_and_digest_is_decided_by_digest(enterprise: Policy) -> None:
    result = await explain(
        enterprise, MemoryPinStore(), ANONYMOUS, "pull", f"docker.io/library/ubuntu:latest@{DIGEST}"
    )
    assert result.tag is None and result.digest == DIGEST
    assert result.allowed is True


async def test_enforcing_refusal() -> None:
    policy = parse_policies(
        [("p.yaml", f"search: [{CORP}, docker.io]\nshort_name_mode: enforcing\n")]
    )
    result = await explain(policy, MemoryPinStore(), ANONYMOUS, "pull", "ubuntu:1")
    assert result.reason == "refused" and result.allowed is False
    assert any("enforcing" in note and "aliases:" in note for note in result.notes)


async def test_short_name_push_goes_to_the_push_registry(enterprise: Policy) -> None:
    result = await explain(
        enterprise, MemoryPinStore(), ANONYMOUS, "push", "app:1", push_registry=CORP
    )
    assert result.reason == "push_registry"
    assert result.resolved == Repository(CORP, "app")
    assert result.allowed
    refused = await explain(enterprise, MemoryPinStore(), ANONYMOUS, "push", "app:1")
    assert refused.reason == "refused" and refused.allowed is False


async def test_probing_resolves_without_pinning(enterprise: Policy) -> None:
    pins = MemoryPinStore()
    calls: list[str] = []

    async def probe(repository: Repository, reference: str) -> bool:
        calls.append(str(repository))
        return repository.registry == "docker.io"

    result = await explain(enterprise, pins, ANONYMOUS, "pull", "ubuntu:22.04", probe=probe)
    assert result.probed and result.reason == "search"
    assert result.resolved == Repository("docker.io", "library/ubuntu")
    assert [c.found for c in result.candidates] == [False, True]
    assert calls == [f"{CORP}/ubuntu", "docker.io/library/ubuntu"]
    assert await pins.list() == []
    text = format_explanation(result)
    assert "[not found]" in text and "[has it]" in text and "(probed)" in text


async def test_probe_failure_is_reported(enterprise: Policy) -> None:
    async def probe(repository: Repository, reference: str) -> bool:
        raise UpstreamUnavailable(f"upstream {repository.registry} is down")

    result = await explain(enterprise, MemoryPinStore(), ANONYMOUS, "pull", "ubuntu:1", probe=probe)
    assert result.reason == "refused" and result.decision is None
    assert any("registry.corp.example is down" in note for note in result.notes)


async def test_no_probe_without_asking(enterprise: Policy) -> None:
    async def probe(repository: Repository, reference: str) -> bool:
        raise AssertionError("explain must not touch an upstream unless asked")

    await explain(enterprise, MemoryPinStore(), ANONYMOUS, "pull", "ubuntu")


async def test_audit_rule_is_shown() -> None:
    policy = parse_policies(
        [
            (
                "p.yaml",
                "default: allow\nrules:\n"
                "  - {name: soon, match: 'quay.io/**', allow: false, mode: audit}\n",
            )
        ]
    )
    result = await explain(policy, MemoryPinStore(), ANONYMOUS, "pull", "quay.io/a/b:1")
    assert result.decision is not None and result.decision.audit_only
    assert 'audit: rule "soon" (p.yaml rules[0], mode: audit) would deny it' in (
        format_explanation(result)
    )


async def test_to_dict_is_json(enterprise: Policy) -> None:
    pins = MemoryPinStore()
    for reference in ("ubuntu", "mysql", "quay.io/coreos/etcd:v1"):
        data = (await explain(enterprise, pins, ANONYMOUS, "pull", reference)).to_dict()
        assert json.loads(json.dumps(data)) == data
        assert data["policy"]["fingerprint"] == enterprise.fingerprint
    data = (await explain(enterprise, pins, ANONYMOUS, "pull", "mysql")).to_dict()
    assert data["decision"]["rule"] == {
        "name": "corp-internal",
        "file": str(POLICIES / "enterprise.yaml"),
        "index": 0,
        "section": "rules",
    }
    assert data["resolution"]["reason"] == "alias"


async def test_bad_input(enterprise: Policy) -> None:
    with pytest.raises(NameInvalid):
        await explain(enterprise, MemoryPinStore(), ANONYMOUS, "pull", "UPPER/case")
    with pytest.raises(ValueError, match="unknown action"):
        await explain(enterprise, MemoryPinStore(), ANONYMOUS, "fetch", "ubuntu")
