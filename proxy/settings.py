"""Configuration: the `gate.yaml` schema, its loading, environment overrides, validation.

Every key is declared with its type; unknown keys are errors. A problem is reported as a
`ConfigError` whose message names the offending key path (`upstreams.1.url: ...`); the
command line turns it into exit status 2. Environment variables override keys:
`REGISTRY_GATE_<KEY>[__<SUBKEY>...]` (e.g. `REGISTRY_GATE_STORAGE__MAX_SIZE=5GiB`,
`REGISTRY_GATE_LISTEN=0.0.0.0:5000`); values are parsed as YAML scalars/lists.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.names.references import normalize_registry, validate_registry

ENV_PREFIX = "REGISTRY_GATE_"
_KUBERNETES_SERVICE_LINK = re.compile(r"REGISTRY_GATE_(PORT(_\d+_(TCP|UDP|SCTP)\w*)?|SERVICE_\w+)")
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]i?B?|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTP", start=1):
    _SIZE_UNITS[f"{_p}IB"] = _SIZE_UNITS[f"{_p}I"] = 1024**_i
    _SIZE_UNITS[f"{_p}B"] = _SIZE_UNITS[_p] = 1000**_i


class ConfigError(Exception):
    """The configuration (file, environment or a file it names) is invalid."""


def parse_size(value: object) -> int:
    """Parse `20GiB`, `500MB`, `1024` into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 20GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    match = _SIZE_RE.fullmatch(str(value))
    if match is None:
        raise ValueError(f"invalid size {value!r} (expected e.g. 20GiB, 500MB, 1048576)")
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[(unit or "").upper()]
    if not math.isfinite(size):
        # float() of 309 digits is inf, and int(inf) raises OverflowError, not a ValueError.
        raise ValueError(f"size {value!r} is too large")
    return int(size)


def default_cache_dir() -> Path:
    """The user's cache directory (XDG) for the embedded default configuration."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "registry-gate"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Size = Annotated[int, Field(ge=0)]
PositiveSize = Annotated[int, Field(gt=0)]


def read_secret(env: str | None, file: Path | None, where: str) -> str | None:
    """A secret from the named environment variable or file (None when neither is set);
    errors name the setting `<where>_env` or `<where>_file`."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{where}_env: environment variable {env} is not set")
        return value
    if file:
        try:
            return file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}_file: {exc.strerror}") from exc
    return None


def check_http_url(value: str) -> SplitResult:
    """An http(s) URL with a host and nothing a setting must not carry (credentials, a
    query, a fragment); ValueError says which."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("must not carry credentials, a query or a fragment")
    return parts


class S3Settings(_Strict):
    """The S3-compatible object store the `s3` storage backend keeps content in."""

    endpoint: str | None = Field(
        default=None, description="S3 endpoint URL; omitted: the SDK's default for region"
    )
    bucket: str = Field(min_length=3, max_length=63)
    region: str = "us-east-1"
    prefix: str = Field(default="", description="key prefix for everything the gate writes")
    access_key_env: str | None = None
    secret_key_env: str | None = None
    access_key_file: Path | None = None
    secret_key_file: Path | None = None
    redirect: bool = Field(
        default=False, description="blob GETs answer 307 to a presigned URL of the object"
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        check_http_url(value)
        return value.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError("must be a relative key prefix without '..'")
        return value

    @model_validator(mode="after")
    def _key_sources(self) -> S3Settings:
        access = [x for x in (self.access_key_env, self.access_key_file) if x]
        secret = [x for x in (self.secret_key_env, self.secret_key_file) if x]
        if len(access) > 1 or len(secret) > 1:
            raise ValueError("set each key from an environment variable or a file, not both")
        if len(access) != len(secret):
            raise ValueError("set both the access key and the secret key, or neither")
        return self

    def credentials(self) -> tuple[str, str] | None:
        """(access key, secret key); None: the SDK's default chain (IRSA, profile)."""
        access = read_secret(self.access_key_env, self.access_key_file, "storage.s3.access_key")
        secret = read_secret(self.secret_key_env, self.secret_key_file, "storage.s3.secret_key")
        if access is None or secret is None:
            return None
        return access, secret


class RedisSettings(_Strict):
    """Shared state of several replicas (tags, pins, cache accounting, fill leases)."""

    url: str
    password_env: str | None = None
    password_file: Path | None = None
    key_prefix: str = Field(
        default="registry-gate:",
        description="prefix of every key the gate writes (several gates may share a Redis)",
    )

    @field_validator("key_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        if not 1 <= len(value) <= 64 or not value.isprintable() or " " in value:
            raise ValueError("must be 1 to 64 printable characters without spaces")
        if "{" in value or "}" in value:
            # The shared blob ledger puts its keys under one Redis Cluster hash tag
            # (`{blob-ledger}`); a brace in the prefix would make another tag.
            raise ValueError("must not contain braces")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("must be a redis:// or rediss:// URL with a host")
        if parts.password:
            raise ValueError("must not carry a password: use password_env or password_file")
        return value

    @model_validator(mode="after")
    def _password_source(self) -> RedisSettings:
        if self.password_env and self.password_file:
            raise ValueError("set password_env or password_file, not both")
        return self

    def password(self) -> str | None:
        return read_secret(self.password_env, self.password_file, "redis.password")


class ReplicaSettings(_Strict):
    """This process as one replica of several (names its audit chain, its fill leases)."""

    id: str = Field(
        default_factory=lambda: os.environ.get("HOSTNAME") or socket.gethostname(),
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="unique among replicas; default: the host name (the pod name)",
    )
    peer_url: str | None = Field(
        default=None,
        description="where other replicas reach this one (http://POD_IP:PORT); default: "
        "built from listen",
    )
    fill_lease: float = Field(
        default=10.0,
        ge=0.5,
        le=300,
        description="seconds a replica's claim to fill a digest outlives its last renewal "
        "(renewed every third of it): within this, another replica takes over a dead fill",
    )

    @field_validator("peer_url")
    @classmethod
    def _peer_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")


class StorageSettings(_Strict):
    """Where and how much the cache stores."""

    backend: Literal["filesystem", "s3"] = "filesystem"
    s3: S3Settings | None = None
    path: Path = Field(default_factory=default_cache_dir)
    max_size: Size = 20 * 1024**3
    tag_ttl: float = Field(default=60.0, ge=0, description="seconds a tag->digest is fresh")
    stale_limit: float = Field(
        default=86400.0, ge=0, description="seconds a cached tag may be served stale"
    )
    revalidate_grace: float = Field(
        default=30.0,
        ge=0,
        description="seconds past tag_ttl a cached tag is still served while another "
        "request revalidates it (0: wait for that revalidation)",
    )

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)

    @model_validator(mode="after")
    def _backend(self) -> StorageSettings:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend s3 needs the storage.s3 settings (bucket, ...)")
        if self.backend != "s3" and self.s3 is not None:
            raise ValueError("storage.s3 is set but backend is not s3")
        return self


class TagListSettings(_Strict):
    """Bounds on what the gate buffers for one upstream tag list (fetched whole, then
    sorted and paged by the gate), and on how many it fetches at once."""

    max_bytes: PositiveSize = 16 * 1024**2
    max_tags: int = Field(default=100_000, ge=1)
    max_page_bytes: PositiveSize = 4 * 1024**2
    max_pages: int = Field(default=1000, ge=1)
    max_concurrent: int = Field(default=4, ge=1)

    @field_validator("max_bytes", "max_page_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)


class TimeoutSettings(_Strict):
    """Upstream timeouts, in seconds."""

    connect: float = Field(default=5.0, gt=0)
    read: float = Field(default=60.0, gt=0)
    total_manifest: float = Field(default=60.0, gt=0)


class CircuitSettings(_Strict):
    """When an upstream's circuit breaker opens, and how long it stays open."""

    failures: int = Field(default=5, ge=1, description="consecutive failures that open it")
    cooldown: float = Field(default=10.0, ge=0, description="seconds open before one probe")


# A host name, `*.suffix` or `a.*.b` pattern, or an IP literal: what egress.host_matches
# compares against. No scheme, port, path or user: a list entry names a host, nothing else.
_HOST_LABEL = r"(\*|[a-z0-9]([a-z0-9-]*[a-z0-9])?)"
_HOST_PATTERN = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*")


def _host_pattern(value: str) -> str:
    host = value.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            pass
    literal_labels = [label for label in host.split(".") if label != "*"]
    if not _HOST_PATTERN.fullmatch(host) or not literal_labels or len(host) > 253:
        raise ValueError(
            f"{value!r} is not a host name, *.suffix pattern or IP address "
            "(no scheme, port or path)"
        )
    return host


class UpstreamSettings(_Strict):
    """One upstream registry of the closed upstream table."""

    registry: str
    url: str
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    insecure: bool = False
    timeouts: TimeoutSettings = TimeoutSettings()
    circuit: CircuitSettings = CircuitSettings()
    # Blob-redirect targets (never sent credentials) and token realms (sent the upstream's
    # credentials) are separate lists: see egress.py.
    allowed_redirect_hosts: list[str] = Field(default_factory=list)
    allowed_realm_hosts: list[str] = Field(default_factory=list)

    @field_validator("allowed_redirect_hosts", "allowed_realm_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        return [_host_pattern(entry) for entry in value]

    @field_validator("registry")
    @classmethod
    def _registry(cls, value: str) -> str:
        try:
            return validate_registry(value)
        except Exception as exc:
            raise ValueError(f"invalid registry name {value!r}") from exc

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_http_url(value)
        return value.rstrip("/")

    @model_validator(mode="after")
    def _password_source(self) -> UpstreamSettings:
        if self.password_env and self.password_file:
            raise ValueError("set password_env or password_file, not both")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("a password needs a username")
        return self

    def password(self) -> str | None:
        """Read the upstream password from its environment variable or file."""
        return read_secret(
            self.password_env, self.password_file, f"upstreams[{self.registry}].password"
        )


class PinCreatorGroups(_Strict):
    """`pin_creators: {groups: [...]}`: authenticated members of these groups pin."""

    groups: list[str] = Field(min_length=1)


# anyone | authenticated | nobody | {groups: [...]}: who may create short-name pins.
PinCreatorsSetting = Literal["anyone", "authenticated", "nobody"] | PinCreatorGroups


class PolicySettings(_Strict):
    """Which policy files (and registries.conf) are in force, and who may create pins."""

    files: list[Path] = Field(default_factory=list)
    registries_conf: Path | None = None
    pins_path: Path | None = None
    pin_creators: PinCreatorsSetting = "authenticated"
    watch: bool = True


Algorithm = Literal["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
DEFAULT_ALGORITHMS: tuple[Algorithm, ...] = ("RS256", "ES256")


class TrustedIssuer(_Strict):
    """An external token issuer whose JWTs the gate accepts."""

    issuer: str
    audience: str
    jwks_file: Path | None = None
    jwks_url: str | None = None
    public_key_file: Path | None = None
    groups_claim: str = "groups"
    algorithms: list[Algorithm] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS))

    @model_validator(mode="after")
    def _one_key_source(self) -> TrustedIssuer:
        sources = [self.jwks_file, self.jwks_url, self.public_key_file]
        if sum(s is not None for s in sources) != 1:
            raise ValueError("set exactly one of jwks_file, jwks_url, public_key_file")
        return self


class LoginBucket(_Strict):
    """A token bucket of failed logins: `burst` failures at once, then one per `interval`."""

    burst: int = Field(ge=1, le=100_000)
    interval: float = Field(gt=0, le=86400, description="seconds to regain one attempt")


class LoginLimits(_Strict):
    """How many failed logins the gate takes before answering 429 (`auth.login_limits`).

    The per-(user, client) and per-client buckets are strict: they stop one address from
    guessing. The per-user bucket is lenient and short-lived, and a client that logged in
    as that user before (within `known_client_ttl`) is exempt from it, so guesses from
    many addresses cannot lock the real user out of a client they use.
    """

    enabled: bool = True
    per_user_client: LoginBucket = LoginBucket(burst=5, interval=60)
    per_client: LoginBucket = LoginBucket(burst=20, interval=10)
    per_user: LoginBucket = LoginBucket(burst=50, interval=6)
    known_client_ttl: float = Field(default=30 * 86400, ge=0, le=365 * 86400)
    max_entries: int = Field(
        default=65536, ge=16, le=10_000_000, description="tracked keys per bucket kind"
    )


class OperatorSettings(_Strict):
    """Who may use `/metrics` and `/policy/explain` on the main port in token mode."""

    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)


class AuthSettings(_Strict):
    """Client authentication."""

    mode: Literal["none", "token"] = "none"
    htpasswd: Path | None = None
    signing_key: Path | None = None
    groups: dict[str, list[str]] = Field(default_factory=dict)
    groups_file: Path | None = None
    trusted_issuers: list[TrustedIssuer] = Field(default_factory=list)
    realm: str | None = None
    service: str = "registry-gate"
    issuer: str = "registry-gate"
    token_ttl: int = Field(default=300, ge=60, le=86400)
    login_limits: LoginLimits = LoginLimits()
    operators: OperatorSettings = OperatorSettings()

    @model_validator(mode="after")
    def _token_mode_needs_key(self) -> AuthSettings:
        if self.mode == "token" and self.signing_key is None and not self.trusted_issuers:
            raise ValueError("auth.mode token needs signing_key or trusted_issuers")
        return self


REPLICA_PLACEHOLDER = "{replica}"


class AuditSettings(_Strict):
    """The audit log sink."""

    path: Path | None = Field(
        default=None,
        description="the audit file; `{replica}` in it becomes replica.id, so that each "
        "replica writes its own hash chain (e.g. /var/log/registry-gate/{replica}.jsonl)",
    )
    stdout: bool = False
    on_failure: Literal["fail_closed", "fail_open"] = Field(
        default="fail_closed",
        description="while the audit log cannot be written: refuse requests (503) or serve "
        "them and count the records not written",
    )

    @field_validator("path")
    @classmethod
    def _placeholder(cls, value: Path | None) -> Path | None:
        if value is not None and re.search(r"[{}]", str(value).replace(REPLICA_PLACEHOLDER, "")):
            raise ValueError("only {replica} is replaced in the audit path; no other braces")
        return value

    @property
    def per_replica(self) -> bool:
        """Whether each replica writes its own file (`{replica}` in `path`)."""
        return self.path is not None and REPLICA_PLACEHOLDER in str(self.path)

    def file_for(self, replica: str) -> Path | None:
        """The audit file this replica writes (`path` with `{replica}` replaced)."""
        if self.path is None:
            return None
        return Path(str(self.path).replace(REPLICA_PLACEHOLDER, replica))


class TlsSettings(_Strict):
    """TLS termination by the gate (a Docker daemon wants HTTPS for a remote mirror)."""

    cert_file: Path
    key_file: Path


class UploadSettings(_Strict):
    """Streamed upload bodies (blob PATCH/PUT): the least rate a client must keep up."""

    min_rate: Size = Field(
        default=1024, description="bytes per second a client must send an upload body at; 0: off"
    )
    min_rate_window: float = Field(
        default=30.0, gt=0, le=3600, description="seconds over which min_rate is measured"
    )

    @field_validator("min_rate", mode="before")
    @classmethod
    def _rate(cls, value: object) -> int:
        # `1KiB` or `1KiB/s`: a rate is a size per second.
        if isinstance(value, str):
            value = value.strip().removesuffix("/s")
        return parse_size(value)


class MetricsSettings(_Strict):
    """Where `/metrics` is served."""

    listen: str | None = None
    enabled: bool = True


class Settings(_Strict):
    """The whole gate configuration (gate.yaml)."""

    listen: str = "127.0.0.1:5000"
    public_url: str | None = Field(
        default=None,
        description="the URL clients reach the gate at (behind a TLS-terminating proxy); "
        "the default token realm is built from it",
    )
    tls: TlsSettings | None = None
    storage: StorageSettings = StorageSettings()
    redis: RedisSettings | None = Field(
        default=None, description="shared state of several replicas; omitted: in-process"
    )
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings)
    tag_lists: TagListSettings = TagListSettings()
    upstreams: list[UpstreamSettings] = Field(min_length=1)
    push_registry: str | None = None
    upload_secret: str | None = Field(
        default=None, description="shared by replicas so upload sessions survive a hop"
    )
    uploads: UploadSettings = UploadSettings()
    policy: PolicySettings = PolicySettings()
    auth: AuthSettings = AuthSettings()
    audit: AuditSettings = AuditSettings()
    metrics: MetricsSettings = MetricsSettings()
    idle_timeout: float = Field(
        default=75.0,
        gt=0,
        description="close a client connection idle this long, or still sending headers",
    )
    request_body_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds a body the gate reads itself (token form, manifest) may take",
    )
    shutdown_timeout: float = Field(
        default=25.0,
        gt=0,
        le=3600,
        description="seconds SIGTERM may take in all: in-flight requests, then closing",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: text when stderr is a terminal, JSON otherwise (collectors, containers).
    log_format: Literal["auto", "json", "text"] = "auto"
    # The event loop `serve` runs on (README, Measurements: asyncio keeps sendfile for
    # cached blobs; uvloop serves small requests faster but copies blobs through Python).
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host_port(value)
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = check_http_url(value)
        if parts.path not in ("", "/"):
            raise ValueError("must not carry a path (the registry API lives at /v2/)")
        return value.rstrip("/")

    def token_realm(self, scheme: str, host: str) -> str:
        """The realm announced in challenges: `auth.realm`, else `<public_url>/token`, else
        built from how this request reached the gate (scheme and Host header)."""
        if self.auth.realm:
            return self.auth.realm
        base = self.public_url or f"{scheme}://{host}"
        return f"{base}/token"

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        names = [u.registry for u in self.upstreams]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"upstream registries listed twice: {sorted(duplicates)}")
        if self.push_registry is not None and normalize_registry(self.push_registry) not in names:
            raise ValueError(f"push_registry {self.push_registry!r} is not an upstream")
        return self

    @model_validator(mode="after")
    def _replicas(self) -> Settings:
        # Replicas stream fills to each other, authenticated with the shared secret, at
        # the URL each announces: without either, they could not (and would not say so).
        if self.redis is None:
            return self
        if not self.upload_secret:
            raise ValueError(
                "redis is set: upload_secret must be set too, the same on every replica"
            )
        if self.replica.peer_url is None and host_port(self.listen)[0] in ("0.0.0.0", "::"):
            raise ValueError(
                "redis is set and listen is a wildcard address: set replica.peer_url to the "
                "address other replicas reach this one at"
            )
        return self

    def peer_url(self) -> str:
        """Where other replicas reach this one: `replica.peer_url`, else built from listen."""
        if self.replica.peer_url is not None:
            return self.replica.peer_url
        host, port = host_port(self.listen)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @property
    def audit_file(self) -> Path | None:
        """The audit file this process writes (`audit.path` for this `replica.id`)."""
        return self.audit.file_for(self.replica.id)

    def upstream(self, registry: str) -> UpstreamSettings | None:
        """The upstream entry for a (normalised) registry name."""
        for upstream in self.upstreams:
            if upstream.registry == registry:
                return upstream
        return None


def host_port(listen: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 in brackets)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


EMBEDDED_DEFAULT: dict[str, Any] = {
    "listen": "127.0.0.1:5000",
    "upstreams": [{"registry": "docker.io", "url": "https://registry-1.docker.io"}],
}


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay `REGISTRY_GATE_A__B=value` onto the raw document (before validation)."""
    result: dict[str, Any] = dict(raw)
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        if _KUBERNETES_SERVICE_LINK.match(name):
            # Kubernetes injects these for a Service named registry-gate; not config.
            continue
        path = [part.lower() for part in name.removeprefix(ENV_PREFIX).split("__") if part]
        if not path:
            continue
        try:
            value = yaml.safe_load(environ[name]) if environ[name] else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: invalid YAML value") from exc
        node = result
        for key in path[:-1]:
            child = node.get(key)
            child = dict(child) if isinstance(child, dict) else {}
            node[key] = child
            node = child
        node[path[-1]] = value
    return result


def _format_validation_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {location}: {message}{suffix}"


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    """Relative file paths in the config are relative to the config file's folder."""

    def fix(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base / path

    policy = settings.policy.model_copy(
        update={
            "files": [fix(p) for p in settings.policy.files],
            "registries_conf": fix(settings.policy.registries_conf),
            "pins_path": fix(settings.policy.pins_path),
        }
    )
    auth = settings.auth.model_copy(
        update={
            "htpasswd": fix(settings.auth.htpasswd),
            "signing_key": fix(settings.auth.signing_key),
            "groups_file": fix(settings.auth.groups_file),
            "trusted_issuers": [
                issuer.model_copy(
                    update={
                        "jwks_file": fix(issuer.jwks_file),
                        "public_key_file": fix(issuer.public_key_file),
                    }
                )
                for issuer in settings.auth.trusted_issuers
            ],
        }
    )
    upstreams = [
        upstream.model_copy(
            update={"password_file": fix(upstream.password_file), "ca_file": fix(upstream.ca_file)}
        )
        for upstream in settings.upstreams
    ]
    audit = settings.audit.model_copy(update={"path": fix(settings.audit.path)})
    tls = (
        settings.tls.model_copy(
            update={
                "cert_file": fix(settings.tls.cert_file),
                "key_file": fix(settings.tls.key_file),
            }
        )
        if settings.tls is not None
        else None
    )
    storage = settings.storage.model_copy(update={"path": fix(settings.storage.path)})
    return settings.model_copy(
        update={
            "policy": policy,
            "auth": auth,
            "audit": audit,
            "storage": storage,
            "upstreams": upstreams,
            "tls": tls,
        }
    )


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load and validate a config file (or the embedded default when `path` is None)."""
    environ = os.environ if environ is None else environ
    if path is None:
        raw: Any = dict(EMBEDDED_DEFAULT)
        source, base = "embedded default", Path.cwd()
    else:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where}: invalid YAML") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: (top level): expected a mapping of keys")
        source, base = str(path), path.resolve().parent
    raw = apply_env_overrides(raw, environ)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from exc
    return _resolve_paths(settings, base)
