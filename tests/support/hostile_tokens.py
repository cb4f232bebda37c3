"""Hypothesis strategies for the bearer tokens an attacker can present to the gate.

Headers and claims of any JSON shape are written by hand (PyJWT refuses to encode many of
them), signed by nobody (`alg: none`), with a guessable HMAC secret, with garbage, or
properly by a key the gate does not trust; or text that only looks like a JWT.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import strategies as st

_JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _claims(issuers: Sequence[str], audience: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "iss": st.one_of(st.sampled_from(issuers), _JSON_VALUE),
            "aud": st.one_of(st.just(audience), _JSON_VALUE),
            "sub": _JSON_VALUE,
            "exp": st.one_of(st.integers(), _JSON_VALUE),
            "nbf": st.one_of(st.integers(), _JSON_VALUE),
            "iat": _JSON_VALUE,
            "access": _JSON_VALUE,
            "groups": _JSON_VALUE,
        },
    )


_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "kid": _JSON_VALUE,
        "crit": _JSON_VALUE,
        "jwk": _JSON_VALUE,
        "typ": _JSON_VALUE,
        "alg": st.sampled_from(["none", "HS256", "RS256", "ES256", "x", ""]),
    },
)


FOREIGN_KEY = ec.generate_private_key(ec.SECP256R1())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def presented_tokens(draw: st.DrawFn, issuers: Sequence[str], audience: str) -> str:
    """A JWT an attacker could build: any header and claims (written by hand, so claims
    PyJWT would refuse to encode get through), signed by nobody, with a guessable HMAC
    secret or with garbage; a well-formed token signed by a foreign key; or bytes that
    only look like a token."""
    how = draw(st.sampled_from(["none", "hmac", "garbage-signature", "foreign", "garbage"]))
    if how == "garbage":
        return draw(st.text(alphabet="abcXYZ019-_.=", max_size=120))
    if how == "foreign":
        claims = {
            "iss": draw(st.sampled_from(issuers)),
            "aud": audience,
            "exp": 4_000_000_000,
            "sub": "alice",
        }
        return jwt.encode(claims, FOREIGN_KEY, algorithm="ES256", headers={"kid": draw(st.text())})
    header = {"alg": {"none": "none", "hmac": "HS256"}.get(how, "RS256"), **draw(_HEADERS)}
    signing_input = ".".join(
        b64url(json.dumps(part, default=str).encode())
        for part in (header, draw(_claims(issuers, audience)))
    )
    if how == "none":
        signature = b""
    elif how == "hmac":
        signature = hmac.new(b"secret" * 6, signing_input.encode(), hashlib.sha256).digest()
    else:
        signature = draw(st.binary(max_size=300))
    return f"{signing_input}.{b64url(signature)}"
