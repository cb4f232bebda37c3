"""proxy/auth/authenticator.py and credentials.py: users, token grants, request checks."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth.authenticator import (
    MAX_SCOPES,
    METHOD_ACTIONS,
    REFRESH_TOKEN_TTL,
    Authenticator,
    CredentialsInvalid,
    LoginLimited,
    ScopeInvalid,
)
from proxy.auth.credentials import UserDirectory, load_groups, load_htpasswd
from proxy.auth.login_limits import LoginLimiter
from proxy.auth.tokens import TokenIssuer, TokenVerifier
from proxy.errors import Unauthorized
from proxy.policy.principal import ANONYMOUS, Principal
from proxy.settings import AuthSettings, ConfigError, LoginLimits
from proxy.upstream.challenge import Scope, bearer_challenge

SERVICE = "registry-gate"
REALM = "https://gate.example/token"
CLIENT = "192.0.2.7"
PASSWORDS = {"alice": "wonderland", "bob": "b0b:with:colons", "carol": "ü-ñ-密码"}


def htpasswd_line(user: str, password: str) -> str:
    """What `htpasswd -B` writes: bcrypt, with the `$2y$` prefix."""
    hashed = bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    assert hashed.startswith("$2b$")
    return f"{user}:$2y${hashed[4:]}"


@pytest.fixture(scope="module")
def htpasswd_text() -> str:
    lines = ["# users of the gate", ""]
    lines += [htpasswd_line(user, password) for user, password in PASSWORDS.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def htpasswd(tmp_path: Path, htpasswd_text: str) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_text)
    return path


@pytest.fixture
def users(htpasswd: Path) -> UserDirectory:
    settings = AuthSettings(
        htpasswd=htpasswd, groups={"platform": ["alice"], "dev": ["alice", "bob"]}
    )
    return UserDirectory.from_settings(settings)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def issuer(signing_key: rsa.RSAPrivateKey) -> TokenIssuer:
    return TokenIssuer(signing_key, "registry-gate", SERVICE, ttl=300)


@pytest.fixture
def authenticator(issuer: TokenIssuer, users: UserDirectory) -> Authenticator:
    verifier = TokenVerifier(issuer, SERVICE, groups_of=users.groups_of)
    return Authenticator(REALM, SERVICE, issuer, verifier, users, limiter())


def limiter() -> LoginLimiter:
    return LoginLimiter(LoginLimits())


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def allow_all(_principal: Principal, _action: str, _name: str) -> bool:
    return True


# --- htpasswd ------------------------------------------------------------------------------


def test_htpasswd_bcrypt_entries_load(htpasswd: Path) -> None:
    entries = load_htpasswd(htpasswd)
    assert set(entries) == set(PASSWORDS)
    # `$2y$` is read as the identical `$2b$` scheme.
    assert all(hashed.startswith(b"$2b$") for hashed in entries.values())


@pytest.mark.parametrize("prefix", ["$2y$", "$2b$", "$2a$"])
def test_bcrypt_prefixes_accepted(tmp_path: Path, prefix: str) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "htpasswd"
    path.write_text(f"dave:{prefix}{hashed[4:]}\n")
    directory = UserDirectory(load_htpasswd(path), {})
    assert directory.authenticate("dave", "pw") == Principal("dave")


@pytest.mark.parametrize(
    "line",
    [
        "eve:$apr1$abc$0123456789abcdefghijkl",  # htpasswd -m (MD5)
        "eve:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",  # htpasswd -s
        "eve:abJnggxhB/yWI",  # crypt
        "eve:plaintext",  # htpasswd -p
        "eve:$5$rounds=5000$salt$hash",
        "eve:$6$salt$hash",
        "eve",
        "eve:",
    ],
)
def test_non_bcrypt_lines_refused_with_file_and_line(
    tmp_path: Path, htpasswd_text: str, line: str
) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_text + line + "\n")
    bad_line = htpasswd_text.count("\n") + 1
    with pytest.raises(ConfigError) as info:
        load_htpasswd(path)
    message = str(info.value)
    assert f"{path}:{bad_line}:" in message
    assert "bcrypt" in message
    hashed = line.partition(":")[2]
    if hashed:
        assert hashed not in message


def test_missing_htpasswd_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth\.htpasswd"):
        load_htpasswd(tmp_path / "absent")


_GOOD_HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()


@pytest.mark.parametrize(
    "hashed",
    [
        "$2y$04$tooshort",
        "$2y$",
        "$2y$03$" + _GOOD_HASH[7:],
        "$2y$32$" + _GOOD_HASH[7:],
        "$2y$99$" + _GOOD_HASH[7:],
        "$2y$04$" + _GOOD_HASH[7:] + "x",
        "$2y$04$" + _GOOD_HASH[7:-1] + "!",
    ],
)
def test_corrupt_bcrypt_entry_is_refused_at_load(tmp_path: Path, hashed: str) -> None:
    # bcrypt would raise "Invalid salt" at login time (a 500 on the token endpoint).
    path = tmp_path / "htpasswd"
    path.write_text(f"# header\neve:{hashed}\n")
    with pytest.raises(ConfigError, match=f"{path}:2:"):
        load_htpasswd(path)


# --- authenticate --------------------------------------------------------------------------


def test_correct_passwords(users: UserDirectory) -> None:
    assert users.authenticate("alice", "wonderland") == Principal(
        "alice", frozenset({"platform", "dev"})
    )
    assert users.authenticate("bob", "b0b:with:colons") == Principal("bob", frozenset({"dev"}))
    assert users.authenticate("carol", PASSWORDS["carol"]) == Principal("carol")


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("alice", "wrong"),
        ("alice", ""),
        ("alice", "Wonderland"),
        ("alice", "wonderland "),
        ("mallory", "wonderland"),
        ("mallory", ""),
        ("", ""),
        ("Alice", "wonderland"),
        ("alice\x00", "wonderland"),
    ],
)
def test_unknown_user_and_wrong_password_both_fail(
    users: UserDirectory, user: str, password: str
) -> None:
    assert users.authenticate(user, password) is None


def test_passwords_longer_than_72_bytes_do_not_crash(tmp_path: Path) -> None:
    long_password = "p" * 100
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_line("gina", long_password) + "\n")
    directory = UserDirectory(load_htpasswd(path), {})
    # htpasswd -B hashes the first 72 bytes; the same password logs in.
    assert directory.authenticate("gina", long_password) == Principal("gina")
    assert directory.authenticate("gina", "q" * 100) is None
    assert directory.authenticate("nobody", "x" * 1000) is None


def test_groups_from_settings_and_file(tmp_path: Path) -> None:
    groups_file = tmp_path / "groups.yaml"
    groups_file.write_text("ops: [bob, carol]\nplatform: [carol]\n")
    settings = AuthSettings(groups={"platform": ["alice"]}, groups_file=groups_file)
    assert load_groups(settings) == {
        "alice": frozenset({"platform"}),
        "bob": frozenset({"ops"}),
        "carol": frozenset({"ops", "platform"}),
    }


@pytest.mark.parametrize("text", ["- a\n- b\n", "ops: bob\n", "ops: [\n"])
def test_bad_groups_file(tmp_path: Path, text: str) -> None:
    groups_file = tmp_path / "groups.yaml"
    groups_file.write_text(text)
    with pytest.raises(ConfigError, match=r"auth\.groups_file"):
        load_groups(AuthSettings(groups_file=groups_file))


# --- Basic credentials at the token endpoint ---------------------------------------------------


async def test_no_authorization_is_anonymous(authenticator: Authenticator) -> None:
    assert await authenticator.principal_from_basic(None, CLIENT) is ANONYMOUS
    assert await authenticator.principal_from_basic("", CLIENT) is ANONYMOUS


async def test_basic_login(authenticator: Authenticator) -> None:
    principal = await authenticator.principal_from_basic(basic("bob", "b0b:with:colons"), CLIENT)
    assert principal.user == "bob"
    lower_case = "basic " + basic("alice", "wonderland").split()[1]
    assert (await authenticator.principal_from_basic(lower_case, CLIENT)).user == "alice"


@pytest.mark.parametrize(
    "header",
    [
        basic("alice", "nope"),
        basic("mallory", "wonderland"),
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Basic",
        "Bearer abc",
        "Digest username=alice",
    ],
)
async def test_bad_basic_credentials(authenticator: Authenticator, header: str) -> None:
    with pytest.raises(CredentialsInvalid) as info:
        await authenticator.principal_from_basic(header, CLIENT)
    assert "wonderland" not in str(info.value)


async def test_password_login(authenticator: Authenticator) -> None:
    assert (await authenticator.password_login("alice", "wonderland", CLIENT)).user == "alice"
    with pytest.raises(CredentialsInvalid):
        await authenticator.password_login("alice", "x", CLIENT)
    with pytest.raises(CredentialsInvalid):
        await authenticator.password_login("ghost", "x", CLIENT)


# --- grant ----------------------------------------------------------------------------------


async def test_grant_intersects_requested_scopes_with_may(authenticator: Authenticator) -> None:
    calls: list[tuple[str | None, str, str]] = []

    def may(principal: Principal, action: str, name: str) -> bool:
        calls.append((principal.user, action, name))
        return (name, action) in {("team/a", "pull"), ("team/b", "pull"), ("team/b", "push")}

    alice = await authenticator.password_login("alice", "wonderland", CLIENT)
    grant = authenticator.grant(
        alice,
        [
            "repository:team/a:pull,push",
            "repository:team/b:pull,push repository:team/c:pull",
            "registry:catalog:*",
            "garbage",
        ],
        may,
        offline=False,
    )
    assert grant.scopes == (
        Scope("repository", "team/a", ("pull",)),
        Scope("repository", "team/b", ("pull", "push")),
    )
    assert ("alice", "push", "team/a") in calls
    assert ("alice", "pull", "team/c") in calls
    assert all(name != "catalog" for _user, _action, name in calls)

    verified = await authenticator.verifier.verify(grant.token)
    assert verified.principal == alice
    assert verified.allows("team/a", "pull")
    assert not verified.allows("team/a", "push")
    assert verified.allows("team/b", "push")
    assert not verified.allows("team/c", "pull")
    assert grant.expires_in == 300
    assert grant.refresh_token is None


async def test_grant_with_host_port_names(authenticator: Authenticator) -> None:
    grant = authenticator.grant(
        ANONYMOUS, ["repository:localhost:5000/team/app:pull"], allow_all, offline=False
    )
    assert grant.scopes == (Scope("repository", "localhost:5000/team/app", ("pull",)),)


async def test_grant_refused_everything_is_an_empty_token(authenticator: Authenticator) -> None:
    grant = authenticator.grant(
        ANONYMOUS, ["repository:team/a:pull,push"], lambda *_a: False, offline=False
    )
    assert grant.scopes == ()
    verified = await authenticator.verifier.verify(grant.token)
    assert verified.principal.anonymous
    assert not verified.allows("team/a", "pull")


def test_grant_issued_at_is_rfc3339(authenticator: Authenticator) -> None:
    grant = authenticator.grant(ANONYMOUS, [], allow_all, offline=False, now=0.0)
    assert grant.issued_at == "1970-01-01T00:00:00Z"


def test_grant_without_issuer(users: UserDirectory) -> None:
    verifier = TokenVerifier(None, SERVICE)
    authenticator = Authenticator(REALM, SERVICE, None, verifier, users, limiter())
    with pytest.raises(CredentialsInvalid):
        authenticator.grant(ANONYMOUS, [], allow_all, offline=False)


async def test_client_cannot_request_a_refresh_scope(authenticator: Authenticator) -> None:
    alice = await authenticator.password_login("alice", "wonderland", CLIENT)
    grant = authenticator.grant(alice, ["refresh:login:refresh"], allow_all, offline=False)
    assert grant.scopes == ()


# --- refresh tokens ----------------------------------------------------------------------------


async def test_offline_grant_gives_a_refresh_token(authenticator: Authenticator) -> None:
    alice = await authenticator.password_login("alice", "wonderland", CLIENT)
    grant = authenticator.grant(alice, ["repository:team/a:pull"], allow_all, offline=True)
    assert grant.refresh_token is not None
    claims = jwt.decode(grant.refresh_token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == REFRESH_TOKEN_TTL
    principal = await authenticator.refresh_login(grant.refresh_token, CLIENT)
    assert principal == alice
    # A refresh token grants no repository access by itself.
    verified = await authenticator.verifier.verify(grant.refresh_token)
    assert not verified.allows("team/a", "pull")


def test_anonymous_principals_get_no_refresh_token(authenticator: Authenticator) -> None:
    grant = authenticator.grant(ANONYMOUS, ["repository:team/a:pull"], allow_all, offline=True)
    assert grant.refresh_token is None


async def test_only_refresh_scoped_tokens_refresh(authenticator: Authenticator) -> None:
    alice = await authenticator.password_login("alice", "wonderland", CLIENT)
    access = authenticator.grant(alice, ["repository:team/a:pull"], allow_all, offline=True)
    with pytest.raises(CredentialsInvalid, match="not a refresh token"):
        await authenticator.refresh_login(access.token, CLIENT)
    anonymous = authenticator.grant(ANONYMOUS, [], allow_all, offline=False)
    with pytest.raises(CredentialsInvalid):
        await authenticator.refresh_login(anonymous.token, CLIENT)
    assert authenticator.issuer is not None
    anonymous_refresh = authenticator.issuer.issue(
        ANONYMOUS, [Scope("refresh", "login", ("refresh",))]
    )
    with pytest.raises(CredentialsInvalid):
        await authenticator.refresh_login(anonymous_refresh, CLIENT)
    for garbage in ("", "x.y.z", access.token + "x"):
        with pytest.raises(CredentialsInvalid, match="invalid refresh token"):
            await authenticator.refresh_login(garbage, CLIENT)


async def test_refresh_rereads_group_membership(
    authenticator: Authenticator, issuer: TokenIssuer, htpasswd: Path
) -> None:
    alice = await authenticator.password_login("alice", "wonderland", CLIENT)
    grant = authenticator.grant(alice, [], allow_all, offline=True)
    assert grant.refresh_token is not None
    # alice leaves every group; her refresh token must not carry the old ones.
    demoted = UserDirectory(load_htpasswd(htpasswd), {})
    later = Authenticator(
        REALM, SERVICE, issuer, TokenVerifier(issuer, SERVICE), demoted, limiter()
    )
    assert await later.refresh_login(grant.refresh_token, CLIENT) == Principal("alice")


async def test_refresh_token_of_another_gate_refused(
    authenticator: Authenticator, users: UserDirectory
) -> None:
    other = TokenIssuer(
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "registry-gate",
        SERVICE,
        300,
    )
    forged = other.issue(Principal("alice"), [Scope("refresh", "login", ("refresh",))])
    with pytest.raises(CredentialsInvalid):
        await authenticator.refresh_login(forged, CLIENT)


# --- per-request checks ---------------------------------------------------------------------


def test_method_actions() -> None:
    assert METHOD_ACTIONS == {
        "GET": "pull",
        "HEAD": "pull",
        "POST": "push",
        "PUT": "push",
        "PATCH": "push",
        "DELETE": "delete",
    }


def test_challenge_parses_back(authenticator: Authenticator) -> None:
    header = authenticator.challenge(REALM, "repository:team/a:pull,push", "invalid_token")
    challenge = bearer_challenge(header)
    assert challenge is not None
    assert challenge.params == {
        "realm": REALM,
        "service": SERVICE,
        "scope": "repository:team/a:pull,push",
        "error": "invalid_token",
    }
    assert bearer_challenge(authenticator.challenge(REALM, None)) is not None
    assert "scope" not in authenticator.challenge(REALM, None)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer   "},
        {"Authorization": basic("alice", "wonderland")},
        {"Authorization": "Token abc"},
    ],
)
async def test_missing_bearer_is_401_with_challenge(
    authenticator: Authenticator, headers: dict[str, str]
) -> None:
    with pytest.raises(Unauthorized) as info:
        await authenticator.verify_request(headers, REALM, "repository:team/a:pull")
    error = info.value
    assert (error.code, error.status) == ("UNAUTHORIZED", 401)
    challenge = bearer_challenge(error.headers["WWW-Authenticate"])
    assert challenge is not None
    assert challenge.params["scope"] == "repository:team/a:pull"
    assert "error" not in challenge.params


async def test_invalid_token_is_401_invalid_token(authenticator: Authenticator) -> None:
    with pytest.raises(Unauthorized) as info:
        await authenticator.verify_request(
            {"Authorization": "Bearer not.a.token"}, REALM, "repository:team/a:pull"
        )
    challenge = bearer_challenge(info.value.headers["WWW-Authenticate"])
    assert challenge is not None
    assert challenge.params["error"] == "invalid_token"
    assert "not.a.token" not in info.value.body().decode()


async def test_valid_token_passes(authenticator: Authenticator) -> None:
    alice = await authenticator.password_login("alice", "wonderland", CLIENT)
    grant = authenticator.grant(alice, ["repository:team/a:pull"], allow_all, offline=False)
    verified = await authenticator.verify_request(
        {"Authorization": f"bearer  {grant.token} "}, REALM, None
    )
    assert verified.principal == alice
    assert verified.allows("team/a", "pull")
    assert not verified.allows("team/b", "pull")


# --- timing: an unknown user costs what a known user costs (issue 11 #4) -----------------------


def spy_checkpw(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bcrypt cost of every hash `checkpw` is called with (rounds, not wall time)."""
    costs: list[int] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        costs.append(int(hashed[4:6]))
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    return costs


@pytest.mark.parametrize("cost", [4, 5, 10, 12])
def test_unknown_user_check_costs_the_files_bcrypt_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cost: int
) -> None:
    # Hashes made once per cost by a cheap trick: the cost field is what checkpw reads,
    # and a cost-12 hash is made only for this test (about 0.2 s).
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=cost)).decode()
    path.write_text(f"dave:$2y${hashed[4:]}\n")
    directory = UserDirectory(load_htpasswd(path), {})
    assert directory.dummy_cost == cost
    costs = spy_checkpw(monkeypatch)
    assert directory.authenticate("dave", "wrong") is None
    assert directory.authenticate("nobody", "wrong") is None
    assert costs == [cost, cost]


def test_dummy_cost_is_the_cost_most_entries_use(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    lines = []
    for number, cost in enumerate([4, 5, 5, 6]):
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=cost)).decode()
        lines.append(f"user{number}:$2y${hashed[4:]}")
    path.write_text("\n".join(lines) + "\n")
    assert UserDirectory(load_htpasswd(path), {}).dummy_cost == 5


# --- scopes with unknown actions (issue 11 #5) --------------------------------------------------


POLICY_ALLOWS = {("team/a", "pull"), ("team/a", "delete")}


def may_by_table(principal: Principal, action: str, name: str) -> bool:
    # Like the real policy, an unknown action is a programming error, never a question.
    assert action in ("pull", "push", "delete"), action
    return (name, action) in POLICY_ALLOWS


@pytest.mark.parametrize(
    ("scope", "granted"),
    [
        ("repository:team/a:*", ("pull", "delete")),
        ("repository:team/a:pull,*", ("pull", "delete")),
        ("repository:team/a:foo", ()),
        ("repository:team/a:pull,foo", ("pull",)),
        ("repository:team/a:", ()),
        ("repository:team/a:,,,", ()),
        ("repository:team/a:push", ()),
        ("registry:catalog:*", ()),
        ("repository(plugin):team/a:*", ("pull", "delete")),
    ],
)
def test_unknown_actions_are_ignored_and_star_is_what_policy_allows(
    authenticator: Authenticator, scope: str, granted: tuple[str, ...]
) -> None:
    grant = authenticator.grant(ANONYMOUS, [scope], may_by_table, offline=False)
    expected = (Scope("repository", "team/a", granted),) if granted else ()
    assert grant.scopes == expected


def test_scopes_of_one_repository_are_merged(authenticator: Authenticator) -> None:
    grant = authenticator.grant(
        ANONYMOUS,
        ["repository:team/a:delete", "repository:team/a:pull repository:team/a:pull"],
        may_by_table,
        offline=False,
    )
    assert grant.scopes == (Scope("repository", "team/a", ("pull", "delete")),)


def test_too_many_scopes_is_a_client_error(authenticator: Authenticator) -> None:
    many = " ".join(f"repository:r{n}:pull" for n in range(MAX_SCOPES + 1))
    with pytest.raises(ScopeInvalid):
        authenticator.grant(ANONYMOUS, [many], allow_all, offline=False)
    assert authenticator.grant(ANONYMOUS, [many.rpartition(" ")[0]], allow_all, offline=False)


# --- refused logins say why, to audit and metrics only (issue 11 #3) --------------------------


async def test_refusals_carry_reason_and_user_never_the_password(
    authenticator: Authenticator,
) -> None:
    cases = {
        basic("alice", "nope"): ("wrong_password", "alice"),
        basic("mallory", "nope"): ("unknown_user", "mallory"),
        "Basic !!!": ("malformed", None),
        "Digest x": ("unsupported_scheme", None),
    }
    for header, (reason, user) in cases.items():
        with pytest.raises(CredentialsInvalid) as info:
            await authenticator.principal_from_basic(header, CLIENT)
        assert (info.value.reason, info.value.user) == (reason, user)
        assert "nope" not in str(info.value)


async def test_a_limited_login_is_refused_before_its_password_is_checked(
    authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(LoginLimits().per_user_client.burst):
        with pytest.raises(CredentialsInvalid):
            await authenticator.password_login("alice", "guess", CLIENT)
    costs = spy_checkpw(monkeypatch)
    with pytest.raises(LoginLimited) as info:
        await authenticator.password_login("alice", "wonderland", CLIENT)
    assert info.value.bucket == "user_client" and info.value.retry_after >= 1
    assert costs == []  # not even the right password is checked while limited


_PROPERTY_KEY = ec.generate_private_key(ec.SECP256R1())
SCOPE_PARTS = st.one_of(
    st.sampled_from(["repository", "registry", "repository(plugin)", "", "*", "refresh"]),
    st.text(max_size=20),
)
ACTION_LISTS = st.lists(
    st.one_of(st.sampled_from(["pull", "push", "delete", "*", "", "foo", "PULL"]), st.text()),
    max_size=6,
).map(",".join)
SCOPE_TEXT = st.one_of(
    st.builds(lambda t, n, a: f"{t}:{n}:{a}", SCOPE_PARTS, st.text(max_size=40), ACTION_LISTS),
    st.text(max_size=200),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SCOPE_TEXT, max_size=8))
def test_any_scope_grants_only_known_actions_policy_allows(scopes: list[str]) -> None:
    issuer = TokenIssuer(_PROPERTY_KEY, "registry-gate", SERVICE, ttl=300)
    users = UserDirectory({}, {})
    authenticator = Authenticator(
        REALM, SERVICE, issuer, TokenVerifier(issuer, SERVICE), users, limiter()
    )
    try:
        grant = authenticator.grant(ANONYMOUS, scopes, may_by_table, offline=False)
    except ScopeInvalid:
        return
    for scope in grant.scopes:
        assert scope.type == "repository"
        assert scope.actions
        assert all((scope.name, action) in POLICY_ALLOWS for action in scope.actions)
