"""Policy files: loading, validation messages, merging, and decisions (proxy/policy/rules.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import Denied
from proxy.names.references import Repository
from proxy.names.registries_conf import parse_registries_conf
from proxy.policy.principal import ANONYMOUS, Principal
from proxy.policy.rules import (
    BUILTIN_SOURCE,
    Decision,
    Policy,
    PolicyError,
    load_policy,
    parse_policies,
)

POLICIES = Path(__file__).resolve().parent.parent / "policies"
DIGEST = "sha256:" + "a" * 64
ALICE_PLATFORM = Principal("alice", frozenset({"platform"}))
BOB = Principal("bob", frozenset({"dev"}))


def policy_of(*texts: str, **kwargs: object) -> Policy:
    documents = [(f"policies/p{i}.yaml", textwrap.dedent(t)) for i, t in enumerate(texts)]
    return parse_policies(documents, **kwargs)  # type: ignore[arg-type]


def repo(name: str) -> Repository:
    registry, _, path = name.partition("/")
    return Repository.of(registry, path)


# --- the shipped examples ------------------------------------------------------------------


@pytest.fixture(scope="module")
def enterprise() -> Policy:
    return load_policy([POLICIES / "enterprise.yaml"])


def test_enterprise_loads_as_written(enterprise: Policy) -> None:
    assert enterprise.search == ("registry.corp.example", "docker.io")
    assert enterprise.short_name_mode == "permissive"
    assert enterprise.aliases == {"mysql": Repository("registry.corp.example", "dba/mysql")}
    assert not enterprise.default_allow
    assert [r.ref.name for r in enterprise.rules] == [
        "corp-internal",
        "no-public-push",
        "hub-official-images",
        "quay-coreos",
    ]
    assert enterprise.warnings == ()


ENTERPRISE_DECISIONS = [
    # principal, action, repository, tag, digest, allowed, rule
    (ANONYMOUS, "pull", "docker.io/library/ubuntu", "22.04", None, True, "hub-official-images"),
    (ANONYMOUS, "pull", "docker.io/library/ubuntu", "latest", None, False, "hub-official-images"),
    (ANONYMOUS, "pull", "docker.io/library/ubuntu", None, DIGEST, True, "hub-official-images"),
    (ANONYMOUS, "pull", "docker.io/bitnami/redis", "7", None, False, "default"),
    (ANONYMOUS, "push", "docker.io/library/ubuntu", "22.04", None, False, "no-public-push"),
    (ANONYMOUS, "delete", "quay.io/coreos/etcd", None, DIGEST, False, "no-public-push"),
    (ANONYMOUS, "pull", "registry.corp.example/team/app", "latest", None, True, "corp-internal"),
    (BOB, "push", "registry.corp.example/team/app", "1.0", None, True, "corp-internal"),
    (BOB, "delete", "registry.corp.example/team/app", None, DIGEST, True, "corp-internal"),
    (ANONYMOUS, "pull", "quay.io/coreos/etcd", "v3.5", None, False, "default"),
    (BOB, "pull", "quay.io/coreos/etcd", "v3.5", None, False, "default"),
    (ALICE_PLATFORM, "pull", "quay.io/coreos/etcd", "v3.5", None, True, "quay-coreos"),
    (ALICE_PLATFORM, "pull", "quay.io/coreos/etcd/extra", "v3.5", None, False, "default"),
    (ALICE_PLATFORM, "pull", "quay.io/prometheus/node", "v1", None, False, "default"),
    # Lookalike registries are not the internal one.
    (ANONYMOUS, "pull", "registry.corp.example.evil/x", "1", None, False, "default"),
    (ANONYMOUS, "push", "registry.corp.example.evil/x", "1", None, False, "no-public-push"),
]


@pytest.mark.parametrize(
    ("principal", "action", "name", "tag", "digest", "allowed", "rule"), ENTERPRISE_DECISIONS
)
def test_enterprise_decisions(
    enterprise: Policy,
    principal: Principal,
    action: str,
    name: str,
    tag: str | None,
    digest: str | None,
    allowed: bool,
    rule: str,
) -> None:
    decision = enterprise.decide(principal, action, repo(name), tag, digest)
    assert (decision.allowed, decision.rule_name) == (allowed, rule)


def test_enterprise_latest_denial_names_rule_file_and_reference(enterprise: Policy) -> None:
    decision = enterprise.decide(ANONYMOUS, "pull", repo("docker.io/library/ubuntu"), "latest")
    assert decision.rule is not None
    assert decision.rule.where.endswith("enterprise.yaml rules[2]")
    assert decision.rule.index == 2
    with pytest.raises(Denied) as raised:
        decision.check()
    message = raised.value.message
    assert '"hub-official-images"' in message
    assert "enterprise.yaml rules[2]" in message
    assert "docker.io/library/ubuntu:latest" in message
    assert 'tag "latest" is refused' in message
    assert raised.value.status == 403


def test_default_denial_message_names_the_reference(enterprise: Policy) -> None:
    decision = enterprise.decide(BOB, "pull", repo("quay.io/a/b"), "1")
    assert decision.message == (
        "pull of quay.io/a/b:1 is denied: no rule allows it for bob (dev) (policy default: deny)"
    )


def test_dockerhub_mirror_example() -> None:
    policy = load_policy([POLICIES / "dockerhub-mirror.yaml"], known_registries={"docker.io"})
    assert policy.search == ("docker.io",)
    assert policy.short_name_mode == "enforcing"
    assert policy.decide(ANONYMOUS, "pull", repo("docker.io/library/ubuntu"), "latest").allowed
    assert policy.decide(ANONYMOUS, "pull", repo("docker.io/bitnami/redis"), "7").allowed
    push = policy.decide(BOB, "push", repo("docker.io/bob/app"), "1")
    assert (push.allowed, push.rule_name) == (False, "mirror-is-read-only")
    other = policy.decide(ANONYMOUS, "pull", repo("quay.io/a/b"), "1")
    assert (other.allowed, other.rule_name) == (False, "default")


TEAM_A = Principal("ann", frozenset({"team-a"}))
TEAM_B = Principal("ben", frozenset({"team-b"}))
RELEASE_BOT = Principal("release-bot")

TEAM_DECISIONS = [
    (TEAM_A, "push", "registry.corp.example/team-a/app", "1.0", True, "team-a-writes"),
    (TEAM_A, "delete", "registry.corp.example/team-a/x/y", None, True, "team-a-writes"),
    (TEAM_A, "push", "registry.corp.example/team-b/app", "1.0", False, "internal-writes"),
    (TEAM_B, "push", "registry.corp.example/team-b/app", "1.0", True, "team-b-writes"),
    (TEAM_B, "push", "registry.corp.example/team-a/app", "1.0", False, "internal-writes"),
    (TEAM_B, "push", "registry.corp.example/team-ab/app", "1.0", False, "internal-writes"),
    (BOB, "push", "registry.corp.example/team-a/app", "1.0", False, "internal-writes"),
    (TEAM_A, "pull", "registry.corp.example/team-b/app", "1.0", True, "internal-pull"),
    (ANONYMOUS, "pull", "registry.corp.example/team-b/app", "1.0", False, "default"),
    (RELEASE_BOT, "push", "registry.corp.example/releases/app", "1.2.3", True, "release-bot"),
    (RELEASE_BOT, "push", "registry.corp.example/releases/app", "latest", False, "release-bot"),
    (RELEASE_BOT, "delete", "registry.corp.example/releases/app", None, False, "internal-writes"),
]


@pytest.mark.parametrize(("principal", "action", "name", "tag", "allowed", "rule"), TEAM_DECISIONS)
def test_team_push_example(
    principal: Principal, action: str, name: str, tag: str | None, allowed: bool, rule: str
) -> None:
    policy = load_policy([POLICIES / "team-push.yaml"])
    digest = DIGEST if tag is None else None
    decision = policy.decide(principal, action, repo(name), tag, digest)
    assert decision.allowed is allowed
    assert decision.rule_name.startswith(rule)


def test_team_push_audit_rule_reports_but_does_not_decide() -> None:
    policy = load_policy([POLICIES / "team-push.yaml"])
    dev = policy.decide(TEAM_A, "push", repo("registry.corp.example/team-a/app"), "1.0-dev")
    assert dev.allowed and dev.audit_only
    assert dev.rule_name == "team-a-writes"
    assert dev.audit_rule is not None and dev.audit_rule.name == "dev-tags-dry-run"
    assert dev.audit_message is not None and "would be denied" in dev.audit_message
    # A real denial after an audit hit is a denial, not audit-only.
    denied = policy.decide(BOB, "push", repo("registry.corp.example/team-a/app"), "1.0-dev")
    assert not denied.allowed and not denied.audit_only
    assert denied.audit_rule is not None
    clean = policy.decide(TEAM_A, "push", repo("registry.corp.example/team-a/app"), "1.0")
    assert clean.allowed and not clean.audit_only and clean.audit_rule is None


def test_enterprise_and_team_push_merge() -> None:
    policy = load_policy([POLICIES / "enterprise.yaml", POLICIES / "team-push.yaml"])
    assert policy.search == ("registry.corp.example", "docker.io")
    names = [r.ref.name for r in policy.rules]
    assert names[:4] == ["corp-internal", "no-public-push", "hub-official-images", "quay-coreos"]
    assert names[4] == "dev-tags-dry-run"
    # The first file's rules come first: corp-internal decides before team rules.
    decision = policy.decide(BOB, "push", repo("registry.corp.example/team-a/app"), "1")
    assert decision.rule_name == "corp-internal"
    assert decision.rule is not None and decision.rule.file.endswith("enterprise.yaml")


# --- rule semantics ------------------------------------------------------------------------


def test_first_matching_rule_decides() -> None:
    policy = policy_of(
        """
        rules:
          - {name: deny-x, match: "quay.io/x/*", allow: false}
          - {name: allow-all, match: "**", allow: true}
        """
    )
    assert policy.decide(ANONYMOUS, "pull", repo("quay.io/x/y"), "1").rule_name == "deny-x"
    assert policy.decide(ANONYMOUS, "pull", repo("quay.io/z/y"), "1").rule_name == "allow-all"


def test_actions_default_to_all_and_filter() -> None:
    policy = policy_of(
        """
        default: allow
        rules:
          - {name: no-writes, match: "**", actions: [push, delete], allow: false}
          - {name: deny-all, match: "quay.io", allow: false}
        """
    )
    assert policy.decide(ANONYMOUS, "pull", repo("docker.io/library/a"), "1").allowed
    assert policy.decide(ANONYMOUS, "pull", repo("docker.io/library/a"), "1").rule is None
    assert policy.decide(ANONYMOUS, "push", repo("docker.io/library/a"), "1").rule_name == (
        "no-writes"
    )
    assert policy.decide(ANONYMOUS, "pull", repo("quay.io/a/b"), "1").rule_name == "deny-all"


def test_users_and_groups() -> None:
    policy = policy_of(
        """
        rules:
          - {name: by-user, match: "quay.io/a/*", allow: true, users: [alice]}
          - {name: by-group, match: "quay.io/b/*", allow: true, groups: [ops, platform]}
          - {name: either, match: "quay.io/c/*", allow: true, users: [bob], groups: [ops]}
        """
    )
    alice = Principal("alice")
    ops = Principal("carol", frozenset({"ops"}))
    assert policy.decide(alice, "pull", repo("quay.io/a/x"), "1").allowed
    assert not policy.decide(ops, "pull", repo("quay.io/a/x"), "1").allowed
    assert not policy.decide(ANONYMOUS, "pull", repo("quay.io/a/x"), "1").allowed
    assert policy.decide(ops, "pull", repo("quay.io/b/x"), "1").allowed
    assert policy.decide(ALICE_PLATFORM, "pull", repo("quay.io/b/x"), "1").allowed
    assert not policy.decide(alice, "pull", repo("quay.io/b/x"), "1").allowed
    assert policy.decide(BOB, "pull", repo("quay.io/c/x"), "1").allowed
    assert policy.decide(ops, "pull", repo("quay.io/c/x"), "1").allowed


def test_require_digest_and_tag_globs() -> None:
    policy = policy_of(
        """
        rules:
          - name: pinned
            match: "quay.io/prod/**"
            allow: true
            require_digest: true
          - name: no-rc
            match: "quay.io/**"
            allow: true
            deny_tags: ["*-rc*", latest]
        """
    )
    prod = repo("quay.io/prod/app")
    assert not policy.decide(ANONYMOUS, "pull", prod, "1.0").allowed
    assert "by digest is required" in policy.decide(ANONYMOUS, "pull", prod, "1.0").message
    assert policy.decide(ANONYMOUS, "pull", prod, None, DIGEST).allowed
    # Repository-level decisions (token scopes, blobs) are not about tags.
    assert policy.decide(ANONYMOUS, "pull", prod).allowed
    dev = repo("quay.io/dev/app")
    assert not policy.decide(ANONYMOUS, "pull", dev, "2.0-rc1").allowed
    assert not policy.decide(ANONYMOUS, "pull", dev, "latest").allowed
    assert policy.decide(ANONYMOUS, "pull", dev, "latest-ish").allowed
    assert policy.decide(ANONYMOUS, "pull", dev, "2.0").allowed


def test_audit_mode_deny_rule_is_a_dry_run() -> None:
    policy = policy_of(
        """
        default: allow
        rules:
          - {name: future-block, match: "quay.io/old/**", allow: false, mode: audit}
          - {name: real-block, match: "quay.io/old/secret", allow: false}
        """
    )
    would = policy.decide(ANONYMOUS, "pull", repo("quay.io/old/app"), "1")
    assert would.allowed and would.audit_only and would.rule is None
    assert would.audit_rule is not None and would.audit_rule.name == "future-block"
    real = policy.decide(ANONYMOUS, "pull", repo("quay.io/old/secret"), "1")
    assert not real.allowed and real.rule_name == "real-block" and not real.audit_only
    untouched = policy.decide(ANONYMOUS, "pull", repo("quay.io/new/app"), "1")
    assert untouched.allowed and not untouched.audit_only


def test_bare_registry_and_docker_hub_normalisation_in_rules() -> None:
    policy = policy_of(
        """
        rules:
          - {name: hub-ubuntu, match: "docker.io/ubuntu", allow: true}
          - {name: index, match: "index.docker.io/bitnami/*", allow: true}
        """
    )
    assert policy.decide(ANONYMOUS, "pull", Repository.of("docker.io", "ubuntu"), "1").allowed
    assert policy.decide(ANONYMOUS, "pull", repo("docker.io/bitnami/redis"), "1").allowed


def test_match_accepts_a_list() -> None:
    policy = policy_of(
        """
        rules:
          - {name: two, match: ["quay.io/a/*", "ghcr.io/b/**"], allow: true}
        """
    )
    assert policy.decide(ANONYMOUS, "pull", repo("quay.io/a/x"), "1").allowed
    assert policy.decide(ANONYMOUS, "pull", repo("ghcr.io/b/x/y"), "1").allowed
    assert not policy.decide(ANONYMOUS, "pull", repo("ghcr.io/a/x"), "1").allowed


def test_unknown_action_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown action"):
        policy_of("{}").decide(ANONYMOUS, "fetch", repo("quay.io/a/b"))


def test_decision_to_dict() -> None:
    policy = load_policy([POLICIES / "enterprise.yaml"])
    data = policy.decide(ANONYMOUS, "pull", repo("docker.io/library/ubuntu"), "latest").to_dict()
    assert data["allowed"] is False
    assert data["rule"]["name"] == "hub-official-images"
    assert data["rule"]["index"] == 2
    assert data["reference"] == "docker.io/library/ubuntu:latest"


# --- validation ----------------------------------------------------------------------------

INVALID = [
    (
        "rules:\n  - {name: a, match: '**', allow: true}\n  - {name: b, match: '**', alow: true}",
        "policies/p0.yaml: rules[1].alow: unknown key",
    ),
    ("rules:\n  - {name: a, match: '**'}", "policies/p0.yaml: rules[0].allow: required key"),
    (
        "rules:\n  - {name: a, match: '**', allow: true}\n  - {name: b, match: '**', allow: true}\n"
        "  - {name: c, match: 'docker.io/library/ubuntu:latest', allow: true}",
        "policies/p0.yaml: rules[2].match: ",
    ),
    (
        "rules:\n  - {name: a, match: ['quay.io', 'x..y/z'], allow: true}",
        "policies/p0.yaml: rules[0].match: invalid registry",
    ),
    (
        "rules:\n  - {name: a, match: '**', actions: [pull, fetch], allow: true}",
        "policies/p0.yaml: rules[0].actions[1]: Input should be 'pull', 'push' or 'delete'",
    ),
    (
        "rules:\n  - {name: a, match: '**', allow: false, deny_tags: [latest]}",
        "policies/p0.yaml: rules[0]: deny_tags and require_digest narrow a rule that allows",
    ),
    (
        "rules:\n  - {name: a, match: '**', allow: true, deny_tags: ['la test']}",
        "policies/p0.yaml: rules[0].deny_tags: 'la test' is not a tag",
    ),
    (
        "rules:\n  - {name: a, match: '**', allow: 'yes'}",
        "policies/p0.yaml: rules[0].allow: Input should be a valid boolean",
    ),
    (
        "rules:\n  - {name: a, match: '**', allow: true, mode: dry}",
        "policies/p0.yaml: rules[0].mode: Input should be 'enforce' or 'audit'",
    ),
    ("rules:\n  - {name: '', match: '**', allow: true}", "policies/p0.yaml: rules[0].name: "),
    ("rules:\n  - {name: a, match: [], allow: true}", "policies/p0.yaml: rules[0].match: "),
    ("short_name_mode: prompt", "policies/p0.yaml: short_name_mode: Input should be"),
    ("default: maybe", "policies/p0.yaml: default: Input should be 'allow' or 'deny'"),
    ("serach: [docker.io]", "policies/p0.yaml: serach: unknown key"),
    ("search: [docker.io, 'http://quay.io']", "policies/p0.yaml: search[1]: "),
    ("search: [docker.io, docker.io]", "policies/p0.yaml: search[1]: docker.io is listed twice"),
    ("aliases: {mysql: mysql}", "policies/p0.yaml: aliases.mysql: 'mysql' must be fully qualified"),
    (
        "aliases: {mysql: 'quay.io/dba/mysql:8'}",
        "policies/p0.yaml: aliases.mysql: 'quay.io/dba/mysql:8' must not carry a tag",
    ),
    (
        "aliases: {'quay.io/mysql': quay.io/dba/mysql}",
        "policies/p0.yaml: aliases.quay.io/mysql: an alias name is a short name",
    ),
    ("- a\n- b", "policies/p0.yaml: (top level): expected a mapping"),
    ("rules: [\n", "policies/p0.yaml: line "),
    (
        "rules:\n  - name: a\n    match: '**'\n    allow: true\n    allow: false",
        "policies/p0.yaml: line 5: duplicate key 'allow'",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_validation_messages_name_file_index_and_key(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        policy_of(text)
    assert str(raised.value).startswith(message), str(raised.value)


def test_several_problems_are_counted() -> None:
    with pytest.raises(PolicyError) as raised:
        policy_of("rules:\n  - {name: a, match: '**', allow: true, x: 1, y: 2}")
    assert str(raised.value).endswith("(and 1 more problem)")
    assert len(raised.value.problems) == 2


def test_policy_error_is_a_config_error() -> None:
    from proxy.settings import ConfigError

    assert issubclass(PolicyError, ConfigError)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read"):
        load_policy([tmp_path / "missing.yaml"])


def test_known_registries_check_search_and_aliases() -> None:
    known = {"docker.io", "registry.corp.example"}
    with pytest.raises(PolicyError, match=r"search\[1\]: registry quay.io is not an upstream"):
        policy_of("search: [docker.io, quay.io]", known_registries=known)
    with pytest.raises(PolicyError, match=r"aliases.x: registry ghcr.io is not an upstream"):
        policy_of("aliases: {x: ghcr.io/a/x}", known_registries=known)
    policy = policy_of(
        "rules:\n  - {name: q, match: 'quay.io/**', allow: true}", known_registries=known
    )
    assert any("quay.io, which is not an upstream" in w for w in policy.warnings)


# --- merging -------------------------------------------------------------------------------


def test_rule_names_are_unique_across_files() -> None:
    with pytest.raises(PolicyError) as raised:
        policy_of(
            "rules:\n  - {name: a, match: '**', allow: true}",
            "rules:\n  - {name: b, match: '**', allow: true}\n"
            "  - {name: a, match: '**', allow: true}",
        )
    assert str(raised.value) == (
        'policies/p1.yaml: rules[1].name: rule name "a" is already used by '
        "policies/p0.yaml rules[0]"
    )


def test_settings_set_in_two_files_must_agree() -> None:
    with pytest.raises(PolicyError, match=r"policies/p1.yaml: search: already set .*p0.yaml"):
        policy_of("search: [docker.io]", "search: [quay.io]")
    with pytest.raises(PolicyError, match=r"p1.yaml: short_name_mode: already set"):
        policy_of("short_name_mode: enforcing", "short_name_mode: disabled")
    with pytest.raises(PolicyError, match=r"p1.yaml: default: already set"):
        policy_of("default: allow", "default: deny")
    agreed = policy_of("default: deny\nsearch: [docker.io]", "default: deny")
    assert agreed.search == ("docker.io",)
    assert policy_of("{}", "default: allow").default_allow


def test_aliases_merge_and_conflict() -> None:
    policy = policy_of("aliases: {a: quay.io/x/a}", "aliases: {b: quay.io/x/b, a: quay.io/x/a}")
    assert set(policy.aliases) == {"a", "b"}
    assert policy.alias_sources["b"] == "policies/p1.yaml"
    with pytest.raises(PolicyError, match=r"p1.yaml: aliases.a: policies/p0.yaml already"):
        policy_of("aliases: {a: quay.io/x/a}", "aliases: {a: quay.io/y/a}")


def test_defaults_when_unset() -> None:
    policy = policy_of("{}")
    assert policy.search == ()
    assert policy.short_name_mode == "permissive"
    assert not policy.default_allow
    assert not policy.decide(ANONYMOUS, "pull", repo("docker.io/library/a"), "1").allowed


def test_builtin_policy_without_files() -> None:
    policy = load_policy([], known_registries={"docker.io", "quay.io"})
    assert policy.sources == (BUILTIN_SOURCE,)
    assert policy.search == ("docker.io",)
    assert policy.decide(ANONYMOUS, "pull", repo("quay.io/a/b"), "1").allowed
    push = policy.decide(ANONYMOUS, "push", repo("quay.io/a/b"), "1")
    assert not push.allowed and push.rule_name == "default"
    assert load_policy([], known_registries={"quay.io"}).search == ()


def test_fingerprint_follows_content() -> None:
    a = policy_of("default: deny")
    assert a.fingerprint == policy_of("default: deny").fingerprint
    assert a.fingerprint != policy_of("default: allow").fingerprint
    assert len(a.fingerprint) == 16


# --- with registries.conf ------------------------------------------------------------------

CONF = """
unqualified-search-registries = ["quay.io", "docker.io"]
short-name-mode = "enforcing"

[aliases]
"fedora" = "registry.fedoraproject.org/fedora"
"mysql" = "quay.io/other/mysql"

[[registry]]
location = "quay.io/evil"
blocked = true

[[registry]]
prefix = "docker.io/library/busybox"
location = "registry.corp.example/mirror/busybox"
"""


def test_registries_conf_blocked_comes_before_yaml_rules() -> None:
    conf = parse_registries_conf(CONF, "/etc/containers/registries.conf")
    policy = policy_of("rules:\n  - {name: all, match: '**', allow: true}", registries=conf)
    decision = policy.decide(ALICE_PLATFORM, "pull", repo("quay.io/evil/app"), "1")
    assert not decision.allowed
    assert decision.rule is not None
    assert decision.rule.section == "registry"
    assert decision.rule.where == "/etc/containers/registries.conf registry[0]"
    assert "registries.conf blocks quay.io/evil" in decision.message
    assert policy.decide(ANONYMOUS, "push", repo("quay.io/evil/app"), "1").rule_name.startswith(
        "blocked"
    )
    assert policy.decide(ANONYMOUS, "pull", repo("quay.io/evilx/app"), "1").allowed


def test_registries_conf_fills_what_yaml_leaves_unset() -> None:
    conf = parse_registries_conf(CONF, "registries.conf")
    policy = policy_of("aliases: {mysql: registry.corp.example/dba/mysql}", registries=conf)
    assert policy.search == ("quay.io", "docker.io")
    assert policy.search_source == "registries.conf"
    assert policy.short_name_mode == "enforcing"
    assert policy.aliases["mysql"] == Repository("registry.corp.example", "dba/mysql")
    assert policy.aliases["fedora"] == Repository("registry.fedoraproject.org", "fedora")
    yaml_wins = policy_of("search: [docker.io]\nshort_name_mode: disabled", registries=conf)
    assert yaml_wins.search == ("docker.io",)
    assert yaml_wins.short_name_mode == "disabled"


def test_registries_conf_entries_outside_the_upstream_table_are_dropped() -> None:
    conf = parse_registries_conf(CONF, "registries.conf")
    policy = policy_of(
        "{}", registries=conf, known_registries={"docker.io", "registry.corp.example"}
    )
    assert policy.search == ("docker.io",)
    assert "fedora" not in policy.aliases
    assert any("quay.io dropped" in w for w in policy.warnings)
    assert any("aliases.fedora: dropped" in w for w in policy.warnings)


def test_registries_conf_location_rewrites_pulls() -> None:
    conf = parse_registries_conf(CONF, "registries.conf")
    policy = policy_of("{}", registries=conf)
    busybox = Repository.of("docker.io", "busybox")
    assert policy.pull_location(busybox) == Repository("registry.corp.example", "mirror/busybox")
    assert policy.pull_location(repo("docker.io/library/alpine")) == repo(
        "docker.io/library/alpine"
    )


def test_a_block_also_holds_for_the_pull_location() -> None:
    conf = parse_registries_conf(
        """
        [[registry]]
        prefix = "quay.io/mirrored"
        location = "ghcr.io/blocked/mirrored"

        [[registry]]
        location = "ghcr.io/blocked"
        blocked = true
        """,
        "registries.conf",
    )
    policy = policy_of("rules:\n  - {name: all, match: '**', allow: true}", registries=conf)
    pull = policy.decide(ANONYMOUS, "pull", repo("quay.io/mirrored/app"), "1")
    assert not pull.allowed and pull.rule is not None and pull.rule.index == 1
    # Writes are not relocated, so only the name's own entry counts for them.
    assert policy.decide(ANONYMOUS, "push", repo("quay.io/mirrored/app"), "1").allowed


def test_load_policy_reads_registries_conf(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(CONF)
    policy = load_policy([POLICIES / "enterprise.yaml"], conf)
    assert str(conf) in policy.sources
    assert policy.search == ("registry.corp.example", "docker.io")
    bad = tmp_path / "bad.conf"
    bad.write_text("[[registry]]\nprefix = 'quay.io'\n")
    with pytest.raises(PolicyError, match=r"bad.conf: registry\[0\].location"):
        load_policy([], bad)


# --- the rule index never changes a decision ------------------------------------------------

PATTERNS = [
    "**",
    "quay.io",
    "quay.io/team-a/**",
    "quay.io/team-*/app",
    "quay.io/*/app",
    "quay.io/team-b/app",
    "*.corp.example/**",
    "a.corp.example/team-a/**",
    "**/app",
    "docker.io/library/*",
]
NAMES = [
    "quay.io/team-a/app",
    "quay.io/team-b/app",
    "quay.io/team-a/x/y",
    "quay.io/other/app",
    "a.corp.example/team-a/app",
    "b.corp.example/x",
    "docker.io/library/app",
]
rule_strategy = st.fixed_dictionaries(
    {
        "match": st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2),
        "allow": st.booleans(),
        "actions": st.lists(st.sampled_from(["pull", "push", "delete"]), min_size=1, unique=True),
        "groups": st.lists(st.sampled_from(["g1", "g2"]), max_size=2, unique=True),
        "users": st.lists(st.sampled_from(["alice"]), max_size=1),
        "audit": st.booleans(),
    }
)
principals = st.sampled_from(
    [
        ANONYMOUS,
        Principal("alice"),
        Principal("bob", frozenset({"g1"})),
        Principal("c", frozenset({"g2", "x"})),
    ]
)


def naive(policy: Policy, principal: Principal, action: str, repository: Repository) -> Decision:
    """First match over every rule, no index: what the policy must agree with."""
    audit = None
    for rule in policy.rules:
        if action not in rule.actions or not rule.applies_to(principal):
            continue
        if not rule.matches(repository.registry, repository.path):
            continue
        if rule.audit:
            if not rule.allow and audit is None:
                audit = rule.ref
            continue
        return Decision(rule.allow, action, "", principal, rule.ref, audit_rule=audit)
    return Decision(policy.default_allow, action, "", principal, None, audit_rule=audit)


@settings(max_examples=60)
@given(
    st.lists(rule_strategy, max_size=8),
    st.booleans(),
    st.lists(st.tuples(principals, st.sampled_from(["pull", "push"]), st.sampled_from(NAMES))),
)
def test_indexed_decisions_agree_with_naive_first_match(
    rules: list[dict[str, object]], default_allow: bool, requests: list[tuple[Principal, str, str]]
) -> None:
    lines = [f"default: {'allow' if default_allow else 'deny'}", "rules:"]
    for i, r in enumerate(rules):
        lines.append(
            f"  - {{name: r{i}, match: {r['match']}, allow: {str(r['allow']).lower()}, "
            f"actions: {r['actions']}, groups: {r['groups']}, users: {r['users']}, "
            f"mode: {'audit' if r['audit'] else 'enforce'}}}"
        )
    policy = policy_of("\n".join(lines) + "\n")
    for principal, action, name in requests * 2:  # twice: cold and cached index
        got = policy.decide(principal, action, repo(name), "1")
        want = naive(policy, principal, action, repo(name))
        assert (got.allowed, got.rule, got.audit_rule) == (want.allowed, want.rule, want.audit_rule)


# --- remembered decisions (issue 13: the warm path asks the same question again) --------


def test_a_remembered_decision_is_the_one_deciding_afresh_gives() -> None:
    text = """
        rules:
          - {name: alice-only, match: "quay.io/a/*", allow: true, users: [alice]}
          - {name: no-latest, match: "**", allow: true, deny_tags: [latest]}
        """
    remembered, fresh_policy = policy_of(text), policy_of(text)
    asks = [
        (principal, action, repo(name), tag, digest)
        for principal in (ALICE_PLATFORM, BOB, ANONYMOUS)
        for action in ("pull", "push")
        for name in ("quay.io/a/b", "docker.io/library/x")
        for tag, digest in (("1", None), ("latest", None), (None, DIGEST), (None, None))
    ]
    # Asked twice in an interleaved order: the second answers come from the memo, and a
    # memo keyed on too little (e.g. not the principal or the tag) would answer wrongly.
    for ask in asks + asks[::-1]:
        assert remembered.decide(*ask) == fresh_policy._decide(*ask), ask
    assert remembered.decide(BOB, "pull", repo("quay.io/a/b"), "1").rule_name == "no-latest"
    assert not remembered.decide(BOB, "pull", repo("quay.io/a/b"), "latest").allowed
    assert remembered.decide(ALICE_PLATFORM, "pull", repo("quay.io/a/b"), "latest").allowed


def test_a_new_policy_does_not_inherit_the_old_ones_decisions() -> None:
    before = policy_of("rules:\n  - {name: open, match: '**', allow: true}")
    assert before.decide(ANONYMOUS, "pull", repo("quay.io/a/b"), "1").allowed
    after = policy_of("rules:\n  - {name: shut, match: '**', allow: false}")
    decision = after.decide(ANONYMOUS, "pull", repo("quay.io/a/b"), "1")
    assert not decision.allowed and decision.rule_name == "shut"


def test_the_memo_is_bounded() -> None:
    policy = policy_of("rules:\n  - {name: open, match: '**', allow: true}")
    for index in range(policy._decisions.maxsize + 50):
        policy.decide(ANONYMOUS, "pull", repo("quay.io/a/b"), f"t{index}")
    assert len(policy._decisions) == policy._decisions.maxsize
