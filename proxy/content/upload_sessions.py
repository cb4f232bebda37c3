"""The running digest of each upload session this gate process has passed bytes into.

Distribution 2.8 keeps the bytes of a session whose final PUT fails its digest check
(its cancel refuses a committed writer), so the gate only closes a session upstream once
its own hash of everything it passed into the session matches the client's digest.
That hash has to run across requests (POST, PATCH..., PUT) and `hashlib` state cannot be
exported, so it lives here, in the process: a bounded table keyed by upstream session,
each entry with the SHA-256 so far, its offset and a lock (one writer at a time).

A session whose entry is not here (before a restart, evicted, or, without Redis, on
another process) cannot be verified once bytes went into it; the pusher cancels it rather
than risk a failing PUT. With Redis, a request for a session another replica owns is
handed to that replica instead (`proxy/content/upload_handoff.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cachetools import TTLCache

if TYPE_CHECKING:
    from hashlib import _Hash

# How many sessions one process tracks, and how long an idle one is remembered. An entry
# is small (a hash state); a session idle for a day is one its client abandoned.
MAX_SESSIONS = 65_536
IDLE_SECONDS = 24 * 3600.0


@dataclass(eq=False)
class UploadProgress:
    """One session: the SHA-256 of the bytes passed into it, how many, and its writer lock."""

    hasher: _Hash = field(default_factory=hashlib.sha256)
    offset: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


SessionKey = tuple[str, str]  # (upstream registry, upstream session path)


class UploadLedger:
    """Upload sessions of this process, by upstream registry and session path."""

    def __init__(self, maxsize: int = MAX_SESSIONS, idle_seconds: float = IDLE_SECONDS) -> None:
        self._sessions: TTLCache[SessionKey, UploadProgress] = TTLCache(maxsize, idle_seconds)

    def begin(self, key: SessionKey) -> UploadProgress:
        """Track a new session, with nothing passed into it yet."""
        progress = UploadProgress()
        self._sessions[key] = progress
        return progress

    def get(self, key: SessionKey) -> UploadProgress | None:
        """The session's progress, if this process tracks it (refreshes its idle time)."""
        progress = self._sessions.get(key)
        if progress is not None:
            self._sessions[key] = progress
        return progress

    def forget(self, key: SessionKey) -> None:
        """Stop tracking a session (completed or cancelled)."""
        self._sessions.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)
