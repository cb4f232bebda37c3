"""Client-facing authentication of a real gate process: failed logins, scopes, operators.

One module-wide gate with ``auth.mode: token`` (htpasswd with bcrypt cost 4, an ES256
signing key) and small login limits that never refill during the test (an interval of
an hour), so each test's outcome does not depend on timing. Clients are told apart by
their source address (``127.0.0.x``: the whole 127/8 is local), one set per test.

What is proven (issue 11 items 3, 5 and 10):

- a guessed password is refused 401 and audited (user, client, reason; never the
  password) and counted; past the per-(user, client) limit the answer is 429
  ``TOOMANYREQUESTS`` with ``Retry-After``, the right password included, while the real
  user elsewhere still logs in; guesses from many addresses lock a user out of new
  addresses only, never out of a client she logged in from; one address spraying many
  users is stopped by the per-client limit;
- scopes with unknown actions (``*``, ``foo``, ``pull,*``, empty), odd types and
  malformed or numerous scopes never get a 5xx: ``*`` grants what policy allows for
  each known action, unknown actions nothing (hypothesis drives the endpoint too);
- ``/metrics`` and ``/policy/explain`` on the main port answer operators only (401 with
  a challenge for anonymous, 403 for other users), ``/healthz``/``/readyz`` stay open,
  and a separate ``metrics.listen`` port stays open.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gate import GateProcess
from tests.support.registries import free_port
from tests.support.wire import HeaderLines, Reply, request

CORP = "registry.corp.example"
PASSWORDS = {
    "alice": "alice-pw-Xq81",
    "bob": "bob-pw-Lm27",
    "carol": "carol-pw-Tz55",
    "dave": "dave-pw-Rk40",
}
GUESS = "guess-sentinel-71c9"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LIMITS = {
    "per_user_client": {"burst": 3, "interval": 3600},
    "per_client": {"burst": 8, "interval": 3600},
    "per_user": {"burst": 6, "interval": 3600},
}
POLICY: dict[str, Any] = {
    "search": [CORP],
    "default": "deny",
    "rules": [
        {
            "name": "developers-push",
            "match": f"{CORP}/team/**",
            "actions": ["pull", "push"],
            "allow": True,
            "groups": ["developers"],
        },
        {"name": "everyone-pulls", "match": f"{CORP}/**", "actions": ["pull"], "allow": True},
    ],
}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Gate:
    process: GateProcess

    @property
    def url(self) -> str:
        return self.process.url

    def get(self, path: str, headers: HeaderLines = (), source: str | None = None) -> Reply:
        return request(self.url, "GET", path, headers, source=source)

    def token(
        self, user: str | None, password: str | None, *scopes: str, source: str | None = None
    ) -> Reply:
        query = urllib.parse.urlencode(
            [("service", "registry-gate"), *(("scope", s) for s in scopes)]
        )
        headers = {"Authorization": basic(user, password or "")} if user is not None else {}
        return self.get(f"/token?{query}", headers, source)

    def password_form(self, user: str, password: str, source: str) -> Reply:
        form = {"grant_type": "password", "username": user, "password": password}
        body = urllib.parse.urlencode(form).encode()
        return request(self.url, "POST", "/token", FORM, body, source=source)

    def audit(self) -> list[dict[str, Any]]:
        path = Path(self.process.config["audit"]["path"])
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def login_failures(self, client: str, count: int) -> list[dict[str, Any]]:
        """The `login_failure` records of `client`, waiting until `count` are written."""
        deadline = time.monotonic() + 10
        while True:
            found = [
                r for r in self.audit() if r["event"] == "login_failure" and r["client"] == client
            ]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics, read as the operator carol."""
        reply = self.get("/metrics", {"Authorization": basic("carol", PASSWORDS["carol"])})
        assert reply.status == 200, reply
        return sum(
            sample.value
            for family in text_string_to_metric_families(reply.body.decode())
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


def auth_section(directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for user, password in PASSWORDS.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"{user}:$2y${hashed[4:]}")  # as `htpasswd -B -C 4` writes it
    (directory / "htpasswd").write_text("\n".join(lines) + "\n")
    key = ec.generate_private_key(ec.SECP256R1())
    (directory / "token.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "mode": "token",
        "htpasswd": str(directory / "htpasswd"),
        "signing_key": str(directory / "token.pem"),
        "groups": {"developers": ["alice"], "ops": ["alice"]},
        "login_limits": LIMITS,
        "operators": {"users": ["carol"], "groups": ["ops"]},
    }


def gate_config(directory: Path, **extra: Any) -> dict[str, Any]:
    # The token endpoint and the operator endpoints never contact an upstream: one that
    # does not answer is enough (and shows nothing here depends on it).
    return {
        "upstreams": [{"registry": CORP, "url": f"http://127.0.0.1:{free_port()}"}],
        "auth": auth_section(directory / "auth"),
        **extra,
    }


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    root = tmp_path_factory.mktemp("client-auth")
    process = GateProcess(root / "gate", gate_config(root), policy=POLICY, name="client-auth")
    try:
        yield Gate(process.start())
    finally:
        process.stop()


def assert_limited(reply: Reply) -> None:
    assert reply.status == 429, reply
    assert reply.error_codes == ["TOOMANYREQUESTS"], reply
    retry_after = reply.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1


# -- failed logins (issue 11 #3) ---------------------------------------------------------------


def test_guessing_from_one_address_is_limited_audited_and_counted(gate: Gate) -> None:
    attacker, elsewhere = "127.0.0.21", "127.0.0.22"
    failures_before = gate.metric("registry_gate_login_failures_total", reason="wrong_password")
    limited_before = gate.metric("registry_gate_logins_limited_total", bucket="user_client")
    for _ in range(LIMITS["per_user_client"]["burst"]):
        reply = gate.token("alice", GUESS, source=attacker)
        assert reply.status == 401, reply
        assert reply.header("WWW-Authenticate") == 'Basic realm="registry-gate"'
    # Limited: refused unchecked, whatever the password and whichever login form.
    assert_limited(gate.token("alice", GUESS, source=attacker))
    assert_limited(gate.token("alice", PASSWORDS["alice"], source=attacker))
    assert_limited(gate.password_form("alice", PASSWORDS["alice"], attacker))
    # The real alice, on her own machine, is not locked out by the attacker.
    assert gate.token("alice", PASSWORDS["alice"], source=elsewhere).status == 200

    records = gate.login_failures(attacker, 6)
    assert [r["reason"] for r in records] == ["wrong_password"] * 3 + ["limited"] * 3
    assert {r["name"] for r in records} == {"alice"}
    assert [r["status"] for r in records] == [401] * 3 + [429] * 3
    assert all(r["action"] == "login" and r["decision"] == "deny" for r in records)
    assert records[-1]["extra"] == {"endpoint": "token", "bucket": "user_client"}
    written = Path(gate.process.config["audit"]["path"]).read_text() + gate.process.log_text()
    assert GUESS not in written and PASSWORDS["alice"] not in written

    failures = gate.metric("registry_gate_login_failures_total", reason="wrong_password")
    limited = gate.metric("registry_gate_logins_limited_total", bucket="user_client")
    assert failures - failures_before == 3
    assert limited - limited_before == 3


def test_guesses_from_many_addresses_never_lock_the_user_out_of_her_own_client(
    gate: Gate,
) -> None:
    home = "127.0.0.31"
    assert gate.token("bob", PASSWORDS["bob"], source=home).status == 200
    for number in range(LIMITS["per_user"]["burst"]):
        assert gate.token("bob", GUESS, source=f"127.0.0.{40 + number}").status == 401
    # A new address is refused for bob (the short per-user limit)...
    fresh = gate.token("bob", PASSWORDS["bob"], source="127.0.0.49")
    assert_limited(fresh)
    assert gate.login_failures("127.0.0.49", 1)[-1]["extra"]["bucket"] == "user"
    # ...but bob, from where he logged in before, is not; nor is anyone else.
    assert gate.token("bob", PASSWORDS["bob"], source=home).status == 200
    assert gate.token("carol", PASSWORDS["carol"], source="127.0.0.49").status == 200


def test_one_address_spraying_many_users_is_limited(gate: Gate) -> None:
    sprayer = "127.0.0.51"
    for number in range(LIMITS["per_client"]["burst"]):
        # Unknown users and garbage count as much as wrong passwords.
        header = basic(f"user{number}", GUESS) if number % 2 else "Basic !!!"
        reply = gate.get("/token?service=registry-gate", {"Authorization": header}, sprayer)
        assert reply.status == 401, reply
    assert_limited(gate.token("carol", PASSWORDS["carol"], source=sprayer))
    reasons = {r["reason"] for r in gate.login_failures(sprayer, 9)}
    assert reasons == {"unknown_user", "malformed", "limited"}


# -- scopes (issue 11 #5) ----------------------------------------------------------------------


def granted(reply: Reply) -> dict[str, list[str]]:
    assert reply.status == 200, reply
    claims = jwt.decode(reply.json()["token"], options={"verify_signature": False})
    return {entry["name"]: entry["actions"] for entry in claims["access"]}


@pytest.mark.parametrize(
    ("scope", "anonymous", "alice"),
    [
        # A short name: pull is granted, policy decides on the resolved name later.
        ("repository:x:*", {"x": ["pull"]}, {"x": ["pull"]}),
        (f"repository:{CORP}/team/app:*", {f"{CORP}/team/app": ["pull"]}, None),
        (f"repository:{CORP}/team/app:pull,*", {f"{CORP}/team/app": ["pull"]}, None),
        (f"repository:{CORP}/team/app:foo", {}, {}),
        (f"repository:{CORP}/team/app:", {}, {}),
        (f"repository:{CORP}/team/app:delete,foo", {}, {}),
        ("registry:catalog:*", {}, {}),
        (":foo", {}, {}),
        ("repository::*", {}, {}),
        ("repository:" + "a/" * 300 + "b:*", {}, {}),
    ],
)
def test_unknown_actions_never_fail_and_star_is_what_policy_allows(
    gate: Gate, scope: str, anonymous: dict[str, list[str]], alice: dict[str, list[str]] | None
) -> None:
    assert granted(gate.token(None, None, scope)) == anonymous
    everything = {f"{CORP}/team/app": ["pull", "push"]}  # never delete: policy has none
    expected = everything if alice is None else alice
    assert granted(gate.token("alice", PASSWORDS["alice"], scope, source="127.0.0.61")) == (
        expected
    )


def test_too_many_scopes_is_a_400(gate: Gate) -> None:
    scopes = [f"repository:{CORP}/r{n}:pull" for n in range(65)]
    reply = gate.token(None, None, " ".join(scopes))
    assert reply.status == 400 and reply.error_codes == ["UNSUPPORTED"], reply


SCOPES = st.lists(
    st.one_of(
        st.text(max_size=60),
        st.builds(
            lambda kind, name, actions: f"{kind}:{name}:{actions}",
            st.sampled_from(["repository", "registry", "repository(plugin)", "", "x"]),
            st.one_of(st.just(f"{CORP}/team/app"), st.text(max_size=30)),
            st.lists(
                st.one_of(st.sampled_from(["pull", "push", "delete", "*", ""]), st.text()),
                max_size=5,
            ).map(",".join),
        ),
    ),
    max_size=6,
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scopes=SCOPES, login=st.sampled_from([None, "alice", "mallory"]), form=st.booleans())
def test_the_token_endpoint_answers_any_scope_without_a_5xx(
    gate: Gate, scopes: list[str], login: str | None, form: bool
) -> None:
    source = "127.0.0.62"
    password = PASSWORDS.get(login or "", GUESS)
    if form and login is not None:
        fields = [("grant_type", "password"), ("username", login), ("password", password)]
        fields += [("scope", " ".join(scopes))]
        body = urllib.parse.urlencode(fields).encode()
        reply = request(gate.url, "POST", "/token", FORM, body, source=source)
    else:
        reply = gate.token(login, password, *scopes, source=source)
    assert reply.status < 500, reply
    json.loads(reply.body)  # always a JSON document


CONTENT_TYPES = st.one_of(
    st.builds(
        lambda kind, params: kind + params,
        st.sampled_from(
            ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain", ""]
        ),
        st.sampled_from(["", "; charset=klingon", "; charset=utf-16", "; boundary=xyz", ";"]),
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda fields: urllib.parse.urlencode(fields).encode(),
        st.lists(
            st.tuples(
                st.sampled_from(["grant_type", "username", "password", "scope", "refresh_token"]),
                st.one_of(st.sampled_from(["password", "refresh_token", "alice"]), st.text()),
            ),
            max_size=5,
        ),
    ),
    st.just(b'--xyz\r\nContent-Disposition: form-data; name="grant_type"\r\n\r\npassword'),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(content_type=CONTENT_TYPES, body=BODIES)
@example(content_type="application/x-www-form-urlencoded; charset=klingon", body=b"a=b")
def test_the_token_form_answers_any_body_without_a_5xx(
    gate: Gate, content_type: str, body: bytes
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    reply = request(gate.url, "POST", "/token", headers, body, source="127.0.0.63")
    assert reply.status < 500, reply
    json.loads(reply.body)


# -- operator endpoints (issue 11 #10) ---------------------------------------------------------


OPERATOR_PATHS = ["/metrics", f"/policy/explain?action=pull&reference={CORP}/team/app:1"]


def test_operator_endpoints_need_an_operator(gate: Gate) -> None:
    source = "127.0.0.71"
    alice_reply = gate.token("alice", PASSWORDS["alice"], source=source)
    assert alice_reply.status == 200, alice_reply
    alice_token = alice_reply.json()["token"]
    dave_token = gate.token("dave", PASSWORDS["dave"], source=source).json()["token"]
    anonymous_token = gate.token(None, None, source=source).json()["token"]
    for path in OPERATOR_PATHS:
        anonymous = gate.get(path, source=source)
        assert anonymous.status == 401, anonymous
        challenge = anonymous.header("WWW-Authenticate") or ""
        assert challenge.startswith('Bearer realm="') and 'Basic realm="' in challenge
        assert b"registry_gate_" not in anonymous.body and b"decision" not in anonymous.body
        for credential in (f"Bearer {dave_token}", basic("dave", PASSWORDS["dave"])):
            refused = gate.get(path, {"Authorization": credential}, source)
            assert refused.status == 403 and refused.error_codes == ["DENIED"], refused
        forged = gate.get(path, {"Authorization": f"Bearer {alice_token}x"}, source)
        assert forged.status == 401, forged
        nobody = gate.get(path, {"Authorization": f"Bearer {anonymous_token}"}, source)
        assert nobody.status == 401, nobody
        # Operators: a user listed by name (Basic, as a scraper sends it), a group member
        # with a token.
        for credential in (basic("carol", PASSWORDS["carol"]), f"Bearer {alice_token}"):
            allowed = gate.get(path, {"Authorization": credential}, source)
            assert allowed.status == 200, allowed
    for path in ("/healthz", "/readyz"):
        assert gate.get(path, source=source).status == 200


def test_a_wrong_operator_password_is_a_refused_login(gate: Gate) -> None:
    source = "127.0.0.72"
    reply = gate.get("/metrics", {"Authorization": basic("carol", GUESS)}, source)
    assert reply.status == 401, reply
    [record] = gate.login_failures(source, 1)
    assert record["name"] == "carol" and record["reason"] == "wrong_password"
    assert record["extra"] == {"endpoint": "operator"}


def test_a_separate_metrics_port_stays_as_configured(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("client-auth-metrics")
    port = free_port()
    process = GateProcess(
        root / "gate",
        gate_config(root, metrics={"listen": f"127.0.0.1:{port}"}),
        policy=POLICY,
        name="client-auth-metrics",
    )
    try:
        process.start()
        assert request(f"http://127.0.0.1:{port}", "GET", "/metrics").status == 200
        # The main port serves no metrics at all then.
        assert request(process.url, "GET", "/metrics").status == 404
    finally:
        process.stop()
