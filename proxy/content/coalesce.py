"""Coalesced work: one task per key at a time, shared by every caller that asks meanwhile.

Owns `Coalescer`, the single-flight primitive for small upstream exchanges (a tag
revalidation HEAD, a manifest GET by digest, a tag list, a repository check): the first
caller for a key starts a task, later callers for the same key join it while it runs,
and the key is free again once it ends (its result is not kept: caching is the caller's
business). Blob fills have their own coordinator (`proxy.content.singleflight`), since their
readers stream a growing file rather than wait for one result.

The tasks belong to the coalescer, not to any request: a client that disconnects does
not cancel the work others wait for (they await it through `asyncio.shield`), and
`close()` cancels whatever still runs at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
# Called only by the caller that starts the task.
Work = Callable[[], Coroutine[Any, Any, V]]


class Coalescer(Generic[K, V]):
    """At most one running task per key; callers for a busy key share its outcome."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def running(self, key: K) -> bool:
        """Whether a task for `key` is under way."""
        return key in self._tasks

    def start(self, key: K, work: Work[V]) -> tuple[asyncio.Task[V], bool]:
        """The running task for `key`, or a new one running `work()`; and whether it is
        new (the caller leads)."""
        task = self._tasks.get(key)
        if task is not None:
            return task, False
        task = asyncio.create_task(work(), name=f"{self._name} {key!r}")
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return task, True

    async def run(self, key: K, work: Work[V]) -> V:
        """Join the task for `key`, or start it with `work()`, and wait for its outcome."""
        task, _ = self.start(key, work)
        return await asyncio.shield(task)

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        # Retrieved here, so a failure nobody awaited is not reported as "never retrieved"
        # (a background revalidation's failure is counted by its own code).
        if not task.cancelled():
            task.exception()

    async def close(self) -> None:
        """Cancel every running task and wait until they have ended (shutdown)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
