"""Properties of proxy/names/references.py and proxy/names/addressing.py on any text.

Names, tags, digests, registry hosts, `?ns=` values and user-written references raise
only their OCI error (NameInvalid, TagInvalid, DigestInvalid, NameUnknown: all 4xx);
an accepted reference reads back the same when written out again.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import RegistryError
from proxy.names.addressing import locate, parse_v2_path
from proxy.names.references import (
    Repository,
    parse_reference,
    validate_name,
    validate_reference,
    validate_registry,
)

T = TypeVar("T")
PROPERTIES = settings(max_examples=200, deadline=None)
KNOWN = frozenset({"docker.io", "quay.io", "registry.corp.example", "localhost:5000"})
_PIECES = st.sampled_from(
    [
        "docker.io",
        "quay.io",
        "localhost",
        "localhost:5000",
        "a",
        "B",
        "..",
        ".",
        "-",
        "_",
        "__",
        "/",
        "//",
        ":",
        "@",
        "sha256:",
        "sha256:" + "a" * 64,
        "%2F",
        "\x00",
        "é",
        " ",
        "9" * 6,
    ]
)
_TEXT = st.one_of(
    st.text(max_size=120),
    st.text(alphabet=string.ascii_letters + string.digits + "._-/:@", max_size=300),
    st.lists(_PIECES, max_size=12).map("".join),
)


def only_client_errors(call: Callable[..., T], *args: object) -> T | None:
    """`call(*args)`, or None when it refused with a 4xx error (anything else fails)."""
    try:
        return call(*args)
    except RegistryError as error:
        assert 400 <= error.status < 500
        return None


@PROPERTIES
@given(_TEXT)
def test_validators_raise_only_client_errors(text: str) -> None:
    for validator in (validate_name, validate_reference, validate_registry, parse_v2_path):
        only_client_errors(validator, text)


@PROPERTIES
@given(_TEXT, st.one_of(st.none(), _TEXT, st.sampled_from(sorted(KNOWN))))
def test_locate_any_name_and_ns_is_a_target_or_a_client_error(name: str, ns: str | None) -> None:
    target = only_client_errors(locate, name, ns, KNOWN)
    if target is not None and target.repository is not None:
        repository: Repository = target.repository
        assert ns is None or target.mode == "ns"
        assert repository.registry in KNOWN
        assert validate_name(repository.path) == repository.path


@PROPERTIES
@given(_TEXT)
def test_a_parsed_reference_reads_back(text: str) -> None:
    parsed = only_client_errors(parse_reference, text)
    if parsed is None:
        return
    written = parsed.path
    if parsed.registry is not None:
        written = f"{parsed.registry}/{written}"
    if parsed.tag is not None:
        written += f":{parsed.tag}"
    if parsed.digest is not None:
        written += f"@{parsed.digest}"
    assert parse_reference(written) == parsed
