"""proxy/auth.py and proxy/credentials.py: users, the token endpoint's grants, request checks."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.auth import METHOD_ACTIONS, REFRESH_TOKEN_TTL, Authenticator, CredentialsInvalid
from proxy.challenge import Scope, bearer_challenge
from proxy.credentials import UserDirectory, load_groups, load_htpasswd
from proxy.errors import Unauthorized
from proxy.login_limits import LoginLimiter
from proxy.principal import ANONYMOUS, Principal
from proxy.settings import AuthSettings, ConfigError, LoginLimits
from proxy.tokens import TokenIssuer, TokenVerifier

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
