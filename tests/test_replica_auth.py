"""Replica-to-replica request signatures (proxy/auth/replica_auth.py)."""

from __future__ import annotations

import pytest

from proxy.auth.replica_auth import HEADER, MAX_SKEW, ReplicaSigner

PATH = "/_replica/fills/sha256:" + "a" * 64
NOW = 1_800_000_000.0


def test_a_signed_request_verifies_for_its_method_path_and_time() -> None:
    signer = ReplicaSigner(b"shared secret")
    header = signer.sign("GET", PATH, now=NOW)[HEADER]
    assert signer.verify("GET", PATH, header, now=NOW)
    assert signer.verify("GET", PATH, header, now=NOW + MAX_SKEW)
    assert ReplicaSigner(b"shared secret").verify("GET", PATH, header, now=NOW - 10)


@pytest.mark.parametrize(
    "what",
    ["other secret", "other path", "other method", "stale", "future", "none", "garbage"],
)
def test_anything_else_is_refused(what: str) -> None:
    signer = ReplicaSigner(b"shared secret")
    header: str | None = signer.sign("GET", PATH, now=NOW)[HEADER]
    path, method, now = PATH, "GET", NOW
    if what == "other secret":
        header = ReplicaSigner(b"another secret").sign("GET", PATH, now=NOW)[HEADER]
    elif what == "other path":
        path = PATH.replace("a", "b")
    elif what == "other method":
        method = "DELETE"
    elif what == "stale":
        now = NOW + MAX_SKEW + 1
    elif what == "future":
        now = NOW - MAX_SKEW - 1
    elif what == "none":
        header = None
    else:
        header = "v1 1800000000 \u00e9" + "0" * 63
    assert not signer.verify(method, path, header, now=now)


@pytest.mark.parametrize(
    "header",
    ["", "v1", "v1 x y", "v2 1800000000 00", "v1 -1 00", "v1 1800000000", "v1 " + "9" * 40 + " 0"],
)
def test_malformed_headers_are_refused(header: str) -> None:
    assert not ReplicaSigner(b"s").verify("GET", PATH, header, now=NOW)


def test_the_upload_secret_itself_is_not_the_key() -> None:
    # Derived key: a MAC made directly with the shared secret (as upload ids are) fails.
    import hashlib
    import hmac

    stamp = int(NOW)
    raw = hmac.new(b"s", f"{stamp}\nGET\n{PATH}".encode(), hashlib.sha256).hexdigest()
    assert not ReplicaSigner(b"s").verify("GET", PATH, f"v1 {stamp} {raw}", now=NOW)
