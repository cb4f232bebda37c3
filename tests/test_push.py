"""proxy/content/push.py: what a client's manifest body may be before anything goes upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.content.manifest_checks import MAX_MANIFEST_SIZE
from proxy.content.push import read_manifest_body
from proxy.errors import ManifestTooLarge


async def _chunks(total: int, size: int = 1 << 20) -> AsyncIterator[bytes]:
    while total > 0:
        yield b"x" * min(size, total)
        total -= size


async def test_a_manifest_up_to_the_cap_is_read_whole() -> None:
    body = await read_manifest_body(_chunks(MAX_MANIFEST_SIZE))
    assert len(body) == MAX_MANIFEST_SIZE


async def test_a_manifest_over_the_cap_is_413_manifest_invalid() -> None:
    with pytest.raises(ManifestTooLarge) as caught:
        await read_manifest_body(_chunks(MAX_MANIFEST_SIZE + 1))
    assert (caught.value.status, caught.value.code) == (413, "MANIFEST_INVALID")
