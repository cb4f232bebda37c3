"""Access policy: the YAML policy files, their validation and merging, and decisions (pure).

Owns what a policy file means (README "Policy files" documents every key):

- `search`, `short_name_mode`, `aliases` (short-name resolution, applied by
  `proxy.names.resolver`), `default` (`allow` or `deny`, deny when unset), and `rules`;
- a rule matches by reference pattern (`proxy.policy.patterns`), action and principal; the first
  matching rule decides; `deny_tags` and `require_digest` narrow an allowing rule;
  `mode: audit` turns a rule into a dry run: it never decides, and a denial it would
  have made is reported on the decision (`audit_only`) while evaluation goes on;
- several files merge in the order given: rules are concatenated (earlier files first),
  aliases are merged, and `search`, `short_name_mode` and `default` may be set by any
  one file (two files setting one of them to different values is an error, as are two
  rules with one name or two different targets for one alias);
- a containers-registries.conf (`proxy.names.registries_conf`) comes after the YAML files:
  its `blocked = true` entries deny before any YAML rule (a pull also when the place
  it is relocated to is blocked), its search list and short-name
  mode apply only when no YAML file sets them, its aliases apply unless a YAML file
  defines the same name, and its `location` rewrites where pulls are fetched from.

Every load error names the file, the rule index and the key:
`policies/x.yaml: rules[2].match: ...`. Decisions are fast: patterns compile once, and the
rules that can apply to a (registry, action, subject, first path component) are worked
out once and remembered, so a thousand per-team rules cost what a handful do.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from cachetools import LRUCache
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.errors import Denied, RegistryError
from proxy.names.references import (
    DOCKER_HUB,
    Repository,
    looks_like_registry,
    validate_name,
    validate_registry,
)
from proxy.names.registries_conf import (
    RegistriesConf,
    RegistriesConfError,
    ShortNameMode,
    load_registries_conf,
)
from proxy.policy.patterns import Pattern, PatternError, compile_pattern
from proxy.policy.principal import Principal
from proxy.settings import ConfigError

Action = Literal["pull", "push", "delete"]
ACTIONS: tuple[Action, ...] = ("pull", "push", "delete")
DEFAULT_SHORT_NAME_MODE: ShortNameMode = "permissive"

BUILTIN_SOURCE = "<built-in policy>"
# Stands in for the YAML layer when gate.yaml lists no policy files: a pull-only mirror.
# Writes are refused until an operator writes a policy that allows them.
BUILTIN_POLICY = """\
short_name_mode: permissive
default: deny
rules:
  - name: builtin-pull-only
    match: "**"
    actions: [pull]
    allow: true
"""
# Search list of the built-in policy when neither YAML nor registries.conf give one.
BUILTIN_SEARCH = (DOCKER_HUB,)

_TAG_GLOB_RE = re.compile(r"[A-Za-z0-9_.*-]{1,128}")
# Bounds the rule indexes; registries come from a closed table and subjects are reduced to
# the users and groups rules name, so this only guards against unusual inputs (`explain`
# about made-up registries, thousands of distinct group combinations).
_INDEX_LIMIT = 16384


class PolicyError(ConfigError):
    """A policy file (or registries.conf) is invalid; the message names file, index and key."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


# --- YAML loading ------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: the schema check reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


class _RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(min_length=1, max_length=200)
    match: list[str] = Field(min_length=1)
    allow: bool
    actions: list[Action] | None = Field(default=None, min_length=1)
    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    deny_tags: list[str] = Field(default_factory=list)
    require_digest: bool = False
    mode: Literal["enforce", "audit"] = "enforce"
    description: str | None = None

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("match")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                compile_pattern(text)
            except PatternError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value != value.strip() or any(c in value for c in "\r\n\t"):
            raise ValueError("a rule name is one line with no surrounding spaces")
        return value

    @field_validator("deny_tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not _TAG_GLOB_RE.fullmatch(tag):
                raise ValueError(f"{tag!r} is not a tag or a tag glob such as '*-rc*'")
        return value

    @model_validator(mode="after")
    def _conditions_narrow_allows(self) -> _RuleModel:
        if not self.allow and (self.deny_tags or self.require_digest):
            raise ValueError(
                "deny_tags and require_digest narrow a rule that allows; "
                "this rule denies everything it matches already"
            )
        return self


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    search: list[str] | None = None
    short_name_mode: ShortNameMode | None = None
    aliases: dict[str, str] | None = None
    default: Literal["allow", "deny"] | None = None
    rules: list[_RuleModel] | None = None


def _loc(parts: Sequence[int | str]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _format_validation(exc: ValidationError, source: str) -> PolicyError:
    lines = []
    # A misspelt key is reported as both unknown and missing: the unknown one says more.
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    for error in errors:
        location = _loc(error["loc"])
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {location}: {message}")
    more = len(lines) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return PolicyError(lines[0] + suffix, lines)


def _read_yaml(text: str, source: str) -> _FileModel:
    try:
        # A SafeLoader subclass: no arbitrary object construction.
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise PolicyError(f"{source}:{where}: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: (top level): expected a mapping of keys")
    try:
        return _FileModel.model_validate(raw)
    except ValidationError as exc:
        raise _format_validation(exc, source) from exc


# --- compiled policy ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleRef:
    """Where a decision came from: a rule's name, file and index (or a registries.conf entry)."""

    name: str
    file: str
    index: int
    section: Literal["rules", "registry"] = "rules"

    @property
    def where(self) -> str:
        """`policies/enterprise.yaml rules[2]`."""
        return f"{self.file} {self.section}[{self.index}]"

    def describe(self) -> str:
        """`"name" (enterprise.yaml rules[2])`, short enough for a client-facing message."""
        # Only the file name: a 403 should not show the server's directory layout.
        return f'"{self.name}" ({self.file.rpartition("/")[2]} {self.section}[{self.index}])'

    def to_dict(self) -> dict[str, Any]:
        """JSON form for audit and explain."""
        return {"name": self.name, "file": self.file, "index": self.index, "section": self.section}


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled policy rule."""

    ref: RuleRef
    patterns: tuple[Pattern, ...]
    actions: frozenset[str]
    allow: bool
    users: frozenset[str]
    groups: frozenset[str]
    deny_tags: tuple[str, ...]
    deny_tags_regex: re.Pattern[str] | None
    require_digest: bool
    audit: bool
    description: str | None

    def applies_to(self, principal: Principal) -> bool:
        """Whether the subject conditions (`users`, `groups`) hold; none means everyone."""
        if not self.users and not self.groups:
            return True
        if principal.user is not None and principal.user in self.users:
            return True
        return not self.groups.isdisjoint(principal.groups)

    def matches_registry(self, registry: str) -> bool:
        """Whether some pattern could match a repository on `registry`."""
        return any(p.matches_registry(registry) for p in self.patterns)

    def matches(self, registry: str, path: str) -> bool:
        """Whether a pattern matches the repository."""
        return any(pattern.matches(registry, path) for pattern in self.patterns)

    def verdict(self, tag: str | None, digest: str | None) -> tuple[bool, str | None]:
        """Allowed or not by this (matching) rule, with the reason for a tag denial."""
        if not self.allow:
            return False, None
        denied_tag = (
            tag is not None
            and self.deny_tags_regex is not None
            and self.deny_tags_regex.fullmatch(tag) is not None
        )
        if denied_tag:
            return False, f'tag "{tag}" is refused; pull another tag or by digest'
        if self.require_digest and digest is None and tag is not None:
            return False, "a pull by digest is required (name@sha256:...), not by tag"
        return True, None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a policy decision, with what audit, metrics and a 403 need.

    `rule` is the deciding rule (None: the policy default; section `registry`: a
    registries.conf block); `reason` says why a matching allow rule denied (a refused
    tag, a digest required). `audit_rule` is the first `mode: audit` rule that would
    have denied; `audit_only` is set when the request is allowed nonetheless. Messages
    are built on demand: most decisions are allowed and nobody reads them.
    """

    allowed: bool
    action: str
    reference: str
    principal: Principal
    rule: RuleRef | None
    reason: str | None = None
    audit_only: bool = False
    audit_rule: RuleRef | None = None
    audit_reason: str | None = None

    @property
    def rule_name(self) -> str:
        """The deciding rule's name, or `default` (a metrics label)."""
        return self.rule.name if self.rule is not None else "default"

    @property
    def message(self) -> str:
        """One line naming the action, the reference and the rule (the 403 message)."""
        head = f"{self.action} of {self.reference}"
        rule = self.rule
        if rule is None:
            if self.allowed:
                return f"{head} is allowed by the policy default (no rule matched)"
            who = self.principal.describe()
            return f"{head} is denied: no rule allows it for {who} (policy default: deny)"
        if rule.section == "registry":
            prefix = rule.name.removeprefix("blocked ")
            return (
                f"{head} is denied: {rule.file.rpartition('/')[2]} blocks {prefix} "
                f"(registry[{rule.index}])"
            )
        if self.allowed:
            return f"{head} is allowed by rule {rule.describe()}"
        return _denial(head, rule, self.reason)

    @property
    def audit_message(self) -> str | None:
        """What the audit-mode rule would have done, for the audit log."""
        if self.audit_rule is None:
            return None
        head = f"{self.action} of {self.reference}"
        return _denial(head, self.audit_rule, self.audit_reason, audit=True)

    def check(self) -> None:
        """Raise `Denied` (403, the message names the rule and reference) when denied."""
        if not self.allowed:
            raise Denied(self.message, detail={"rule": self.rule_name, "reference": self.reference})

    def to_dict(self) -> dict[str, Any]:
        """JSON form for audit and explain."""
        return {
            "allowed": self.allowed,
            "action": self.action,
            "reference": self.reference,
            "principal": self.principal.describe(),
            "rule": self.rule.to_dict() if self.rule is not None else None,
            "message": self.message,
            "reason": self.reason,
            "audit_only": self.audit_only,
            "audit_rule": self.audit_rule.to_dict() if self.audit_rule is not None else None,
            "audit_message": self.audit_message,
        }


# A rule with those of its patterns that can match a given registry (the index entries).
_Candidate = tuple[Rule, tuple[Pattern, ...]]


def _reference_text(repository: Repository, tag: str | None, digest: str | None) -> str:
    text = str(repository)
    if tag:
        text += f":{tag}"
    if digest:
        text += f"@{digest}"
    return text


# Decisions one policy remembers (principal, action, repository, tag, digest): a pull is a
# manifest and its blobs, asked again and again; bounded, least recently used dropped.
DECISION_MEMORY = 16384
_DecisionKey = tuple[Principal, str, Repository, str | None, str | None]


class Policy:
    """A validated, merged policy. Immutable once built; share it freely between requests."""

    def __init__(
        self,
        *,
        rules: Sequence[Rule],
        default_allow: bool,
        default_source: str | None,
        search: Sequence[str],
        search_source: str | None,
        short_name_mode: ShortNameMode,
        aliases: Mapping[str, Repository],
        alias_sources: Mapping[str, str],
        registries: RegistriesConf | None,
        sources: Sequence[str],
        fingerprint: str,
        warnings: Sequence[str] = (),
    ) -> None:
        self.rules = tuple(rules)
        self.default_allow = default_allow
        self.default_source = default_source
        self.search = tuple(search)
        self.search_source = search_source
        self.short_name_mode: ShortNameMode = short_name_mode
        self.aliases: Mapping[str, Repository] = dict(aliases)
        self.alias_sources: Mapping[str, str] = dict(alias_sources)
        self.registries = registries
        self.sources = tuple(sources)
        self.fingerprint = fingerprint
        self.warnings = tuple(warnings)
        # Indexes of the rules that can apply to a request (see _rules_for).
        self._by_target: dict[tuple[str, str], tuple[_Candidate, ...]] = {}
        self._by_request: dict[
            tuple[str, str, str | None, frozenset[str], str], tuple[_Candidate, ...]
        ] = {}
        self._users = frozenset(u for r in self.rules for u in r.users)
        self._groups = frozenset(g for r in self.rules for g in r.groups)
        # Decisions remembered for this policy (it never changes; a reload builds a new
        # Policy, so a memo never outlives the rules it came from).
        self._decisions: LRUCache[_DecisionKey, Decision] = LRUCache(DECISION_MEMORY)

    def __repr__(self) -> str:
        return f"<Policy {self.fingerprint} rules={len(self.rules)} sources={list(self.sources)}>"

    def _rules_for(
        self, registry: str, action: str, principal: Principal, head: str
    ) -> tuple[_Candidate, ...]:
        """The rules (with their usable patterns) that can decide for this request.

        Two cached levels: per (registry, action) the rules with a pattern that can match
        the registry; then per subject (the principal reduced to the users and groups some
        rule names, so keys stay few) and first path component (`team-a` of
        `team-a/app`), which keeps a policy of many per-team rules at a few candidates.
        """
        user = principal.user if principal.user in self._users else None
        groups = principal.groups & self._groups if principal.groups else frozenset()
        key = (registry, action, user, groups, head)
        rules = self._by_request.get(key)
        if rules is None:
            target = self._by_target.get((registry, action))
            if target is None:
                target = tuple(
                    (r, tuple(p for p in r.patterns if p.matches_registry(registry)))
                    for r in self.rules
                    if action in r.actions
                )
                target = tuple(c for c in target if c[1])
                _remember(self._by_target, (registry, action), target)
            subject = Principal(user, groups)
            narrowed = (
                (rule, tuple(p for p in patterns if p.matches_head(head)))
                for rule, patterns in target
                if rule.applies_to(subject)
            )
            rules = tuple(c for c in narrowed if c[1])
            _remember(self._by_request, key, rules)
        return rules

    def blocked_by(self, reference: str) -> RuleRef | None:
        """The registries.conf entry blocking `registry/path[:tag][@digest]`, if any."""
        if self.registries is None:
            return None
        entry = self.registries.find(reference)
        if entry is None or not entry.blocked:
            return None
        return RuleRef(f"blocked {entry.prefix}", entry.source, entry.index, "registry")

    def decide(
        self,
        principal: Principal,
        action: str,
        repository: Repository,
        tag: str | None = None,
        digest: str | None = None,
    ) -> Decision:
        """Decide whether `principal` may `action` the (fully-qualified) reference.

        `tag`/`digest` are the manifest reference of the request; with neither, the
        decision is about the repository as a whole (token scopes, blobs, tag lists) and
        the tag conditions (`deny_tags`, `require_digest`) do not apply.
        """
        key = (principal, action, repository, tag, digest)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(principal, action, repository, tag, digest)
            self._decisions[key] = decision
        return decision

    def _decide(
        self,
        principal: Principal,
        action: str,
        repository: Repository,
        tag: str | None,
        digest: str | None,
    ) -> Decision:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        reference = _reference_text(repository, tag, digest)
        blocked = self.blocked_by(reference)
        if blocked is None and action == "pull" and self.registries is not None:
            # A block also holds for the place a pull is relocated to (registries.conf
            # `location`), or a rewrite could reach a registry the operator blocked.
            location = self.registries.pull_location(repository)
            if location != repository:
                blocked = self.blocked_by(_reference_text(location, tag, digest))
        if blocked is not None:
            return Decision(
                False, action, reference, principal, blocked, reason="blocked by registries.conf"
            )
        audit_rule: RuleRef | None = None
        audit_reason: str | None = None
        registry, path = repository.registry, repository.path
        head = path.partition("/")[0]
        for rule, patterns in self._rules_for(registry, action, principal, head):
            for pattern in patterns:
                if pattern.matches_path(registry, path):
                    break
            else:
                continue
            allowed, why = rule.verdict(tag, digest)
            if rule.audit:
                # A dry run: report the first denial it would make, let later rules decide.
                if not allowed and audit_rule is None:
                    audit_rule, audit_reason = rule.ref, why
                continue
            return Decision(
                allowed,
                action,
                reference,
                principal,
                rule.ref,
                reason=why,
                audit_only=allowed and audit_rule is not None,
                audit_rule=audit_rule,
                audit_reason=audit_reason,
            )
        return Decision(
            self.default_allow,
            action,
            reference,
            principal,
            None,
            reason="no rule matched",
            audit_only=self.default_allow and audit_rule is not None,
            audit_rule=audit_rule,
            audit_reason=audit_reason,
        )

    def pull_location(self, repository: Repository) -> Repository:
        """Where a pull of `repository` is fetched from (registries.conf `location`)."""
        if self.registries is None:
            return repository
        return self.registries.pull_location(repository)

    def to_dict(self) -> dict[str, Any]:
        """A JSON summary (for `policy explain --show` style output and logs)."""
        return {
            "fingerprint": self.fingerprint,
            "sources": list(self.sources),
            "search": list(self.search),
            "short_name_mode": self.short_name_mode,
            "aliases": {name: str(repo) for name, repo in self.aliases.items()},
            "default": "allow" if self.default_allow else "deny",
            "rules": [r.ref.to_dict() for r in self.rules],
        }


def _remember(
    cache: dict[Any, tuple[_Candidate, ...]], key: Any, rules: tuple[_Candidate, ...]
) -> None:
    if len(cache) >= _INDEX_LIMIT:
        cache.clear()
    cache[key] = rules


def _denial(head: str, rule: RuleRef, why: str | None, *, audit: bool = False) -> str:
    verb = "would be denied" if audit else "is denied"
    mode = " (mode: audit)" if audit else ""
    reason = f": {why}" if why else ""
    return f"{head} {verb} by rule {rule.describe()}{mode}{reason}"


# --- building a policy from files --------------------------------------------------------


def _fail(source: str, key: str, message: str) -> PolicyError:
    return PolicyError(f"{source}: {key}: {message}")


def _compile_rule(model: _RuleModel, source: str, index: int) -> Rule:
    tags_regex = None
    if model.deny_tags:
        alternatives = "|".join(
            ".*".join(re.escape(piece) for piece in tag.split("*")) for tag in model.deny_tags
        )
        tags_regex = re.compile(f"(?:{alternatives})")
    return Rule(
        ref=RuleRef(model.name, source, index),
        patterns=tuple(compile_pattern(text) for text in model.match),
        actions=frozenset(model.actions or ACTIONS),
        allow=model.allow,
        users=frozenset(model.users),
        groups=frozenset(model.groups),
        deny_tags=tuple(model.deny_tags),
        deny_tags_regex=tags_regex,
        require_digest=model.require_digest,
        audit=model.mode == "audit",
        description=model.description,
    )


def _check_short_name(name: str) -> None:
    if ":" in name or "@" in name or looks_like_registry(name.partition("/")[0]):
        raise ValueError("an alias name is a short name: no registry, tag or digest")
    validate_name(name)


def _parse_target(value: str) -> Repository:
    first, slash, rest = value.partition("/")
    if not slash or not looks_like_registry(first):
        raise ValueError(f"{value!r} must be fully qualified (registry/repository)")
    if "@" in value or ":" in rest:
        raise ValueError(f"{value!r} must not carry a tag or digest")
    return Repository.of(validate_registry(first), validate_name(rest))


def _unknown(registry: str, known: Collection[str]) -> str:
    return f"registry {registry} is not an upstream (configured: {', '.join(sorted(known))})"


class _Builder:
    """Accumulates policy documents in precedence order, checking as it goes."""

    def __init__(self, known_registries: Collection[str] | None) -> None:
        self.known = known_registries
        self.rules: list[Rule] = []
        self.rule_names: dict[str, RuleRef] = {}
        # search, short_name_mode, default: the value and the file that set it.
        self.settings: dict[str, tuple[Any, str]] = {}
        self.aliases: dict[str, Repository] = {}
        self.alias_sources: dict[str, str] = {}
        self.sources: list[str] = []
        self.warnings: list[str] = []
        self.digest = hashlib.sha256()

    def _is_unknown(self, registry: str) -> bool:
        return self.known is not None and registry not in self.known

    def _set_once(self, key: str, value: object, source: str) -> None:
        """`search`, `short_name_mode` and `default` may be set by one file (or agree)."""
        current = self.settings.get(key)
        if current is None:
            self.settings[key] = (value, source)
        elif current[0] != value:
            raise _fail(
                source,
                key,
                f"already set to a different value by {current[1]}; set it in one policy file only",
            )

    def add_yaml(self, source: str, text: str) -> None:
        self.sources.append(source)
        self.digest.update(f"{source}\0{text}\0".encode())
        model = _read_yaml(text, source)
        if model.search is not None:
            self._set_once("search", self._search(model.search, source), source)
        if model.short_name_mode is not None:
            self._set_once("short_name_mode", model.short_name_mode, source)
        if model.default is not None:
            self._set_once("default", model.default, source)
        for name, value in (model.aliases or {}).items():
            self._alias(name, value, source)
        for index, rule_model in enumerate(model.rules or []):
            self._rule(_compile_rule(rule_model, source, index))

    def _search(self, entries: list[str], source: str) -> tuple[str, ...]:
        search: list[str] = []
        for i, entry in enumerate(entries):
            try:
                registry = validate_registry(entry.rstrip("/"))
            except RegistryError:
                raise _fail(
                    source, f"search[{i}]", f"{entry!r}: expected a registry host[:port]"
                ) from None
            if registry in search:
                raise _fail(source, f"search[{i}]", f"{registry} is listed twice")
            if self.known is not None and registry not in self.known:
                raise _fail(source, f"search[{i}]", _unknown(registry, self.known))
            search.append(registry)
        return tuple(search)

    def _alias(self, name: str, value: str, source: str) -> None:
        key = f"aliases.{name}"
        try:
            _check_short_name(name)
            target = _parse_target(value)
        except (ValueError, RegistryError) as exc:
            message = exc.message if isinstance(exc, RegistryError) else str(exc)
            raise _fail(source, key, message) from None
        if self.known is not None and target.registry not in self.known:
            raise _fail(source, key, _unknown(target.registry, self.known))
        previous = self.aliases.get(name)
        if previous is not None and previous != target:
            owner = self.alias_sources[name]
            raise _fail(source, key, f"{owner} already aliases it to {previous}")
        self.aliases[name] = target
        self.alias_sources[name] = source

    def _rule(self, rule: Rule) -> None:
        previous = self.rule_names.get(rule.ref.name)
        if previous is not None:
            raise _fail(
                rule.ref.file,
                f"rules[{rule.ref.index}].name",
                f'rule name "{rule.ref.name}" is already used by {previous.where}',
            )
        self.rule_names[rule.ref.name] = rule.ref
        for pattern in rule.patterns:
            host = pattern.host_literal
            if host is not None and self._is_unknown(host):
                # A rule about a registry the gate does not serve is dead, not dangerous.
                self.warnings.append(
                    f"{rule.ref.where} ({rule.ref.name}): pattern {pattern.text!r} "
                    f"names {host}, which is not an upstream"
                )
        self.rules.append(rule)

    def add_registries_conf(self, conf: RegistriesConf) -> None:
        """Reused client configuration: fills what the YAML files leave unset."""
        self.sources.extend(conf.sources)
        self.digest.update(repr(conf).encode())
        self.warnings.extend(conf.warnings)
        if "search" not in self.settings and conf.search is not None:
            kept = []
            for registry in conf.search:
                if self._is_unknown(registry):
                    assert self.known is not None
                    self.warnings.append(
                        f"{conf.search_source}: unqualified-search-registries: "
                        f"{registry} dropped: {_unknown(registry, self.known)}"
                    )
                else:
                    kept.append(registry)
            self.settings["search"] = (tuple(kept), conf.search_source or "registries.conf")
        if "short_name_mode" not in self.settings and conf.short_name_mode is not None:
            self.settings["short_name_mode"] = (conf.short_name_mode, "registries.conf")
        for name, target in conf.aliases.items():
            if name in self.aliases:
                continue  # the gate's own YAML policy wins over reused client configuration
            origin = conf.alias_sources.get(name, "registries.conf")
            if self._is_unknown(target.registry):
                assert self.known is not None
                reason = _unknown(target.registry, self.known)
                self.warnings.append(f"{origin}: aliases.{name}: dropped: {reason}")
                continue
            self.aliases[name] = target
            self.alias_sources[name] = origin
        for entry in conf.registries:
            if entry.location and entry.location != entry.prefix:
                host = validate_registry(entry.location.partition("/")[0])
                if self._is_unknown(host):
                    self.warnings.append(
                        f"{entry.where}: location {entry.location} is not an upstream; "
                        "pulls rewritten to it will fail"
                    )

    def build(self, registries: RegistriesConf | None, fallback_search: Sequence[str]) -> Policy:
        search = self.settings.get("search")
        if search is None and fallback_search:
            kept = tuple(r for r in fallback_search if not self._is_unknown(r))
            search = (kept, BUILTIN_SOURCE)
        mode = self.settings.get("short_name_mode")
        default = self.settings.get("default")
        return Policy(
            rules=self.rules,
            default_allow=default is not None and default[0] == "allow",
            default_source=default[1] if default is not None else None,
            search=search[0] if search is not None else (),
            search_source=search[1] if search is not None else None,
            short_name_mode=mode[0] if mode is not None else DEFAULT_SHORT_NAME_MODE,
            aliases=self.aliases,
            alias_sources=self.alias_sources,
            registries=registries,
            sources=self.sources,
            fingerprint=self.digest.hexdigest()[:16],
            warnings=self.warnings,
        )


def parse_policies(
    documents: Sequence[tuple[str, str]],
    *,
    registries: RegistriesConf | None = None,
    known_registries: Collection[str] | None = None,
    fallback_search: Sequence[str] = (),
) -> Policy:
    """Build a policy from `(source name, YAML text)` documents in precedence order.

    `known_registries` (the upstream table) turns search entries and alias targets that
    name no upstream into errors (YAML) or dropped entries with a warning
    (registries.conf, which often lists registries the gate does not serve).
    `fallback_search` applies when neither the YAML nor registries.conf set a search list.
    """
    builder = _Builder(known_registries)
    for source, text in documents:
        builder.add_yaml(source, text)
    if registries is not None:
        builder.add_registries_conf(registries)
    return builder.build(registries, fallback_search)


def load_policy(
    files: Sequence[Path],
    registries_conf: Path | None = None,
    *,
    known_registries: Collection[str] | None = None,
) -> Policy:
    """Load policy files (in precedence order) and an optional registries.conf.

    With no files, the built-in pull-only policy stands in for the YAML layer (pulls
    allowed, writes denied, search list docker.io unless registries.conf gives one).
    Raises PolicyError naming the file, rule index and key of the first problem.
    """
    documents: list[tuple[str, str]] = []
    for path in files:
        try:
            documents.append((str(path), path.read_text()))
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read: {exc.strerror}") from exc
    fallback: Sequence[str] = ()
    if not documents:
        documents = [(BUILTIN_SOURCE, BUILTIN_POLICY)]
        fallback = BUILTIN_SEARCH
    registries = None
    if registries_conf is not None:
        try:
            registries = load_registries_conf(registries_conf)
        except RegistriesConfError as exc:
            raise PolicyError(str(exc)) from exc
    return parse_policies(
        documents,
        registries=registries,
        known_registries=known_registries,
        fallback_search=fallback,
    )
