"""The `backend` fixture: every contract test runs once per store implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.contract.backends import Backend, S3Backend, backend_named


@pytest.fixture(params=["filesystem", "s3"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    # SeaweedFS starts only when an s3 case runs.
    async with backend_named(
        request.param, tmp_path, lambda: request.getfixturevalue("seaweed_s3"), monkeypatch
    ) as opened:
        yield opened


@pytest.fixture
async def s3_backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[S3Backend]:
    """The S3 backend alone, for what only an object store has (multipart uploads)."""
    async with backend_named(
        "s3", tmp_path, lambda: request.getfixturevalue("seaweed_s3"), monkeypatch
    ) as opened:
        assert isinstance(opened, S3Backend)
        yield opened
