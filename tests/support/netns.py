"""Loopback-only network namespaces for running real clients (podman, containerd).

Owns the one recipe tests use to keep a misconfigured client from reaching the
internet: ``unshare --net`` gives a process a private network namespace whose only
interface is ``lo`` (brought up first), so 127.0.0.1 works and nothing else does.
Everything started inside lives and dies there; host-side ports are unreachable.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

__all__ = ["NETNS_PREFIX", "can_unshare_net", "netns_argv"]

# `exec "$@"` replaces bash, so the command's exit status and signals pass through;
# "netns" becomes $0 (the name bash reports in errors).
NETNS_PREFIX: tuple[str, ...] = (
    "unshare",
    "--net",
    "--",
    "bash",
    "-c",
    'ip link set lo up && exec "$@"',
    "netns",
)


def netns_argv(*command: str) -> list[str]:
    """``command`` wrapped to run in a fresh loopback-only network namespace."""
    if not command:
        raise ValueError("netns_argv needs a command")
    return [*NETNS_PREFIX, *command]


@functools.cache
def can_unshare_net() -> bool:
    """Whether this process may create such a namespace (root / CAP_SYS_ADMIN, and
    ``unshare`` and ``ip`` installed). Probed once: it runs the real prefix."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        proc = subprocess.run(
            netns_argv("true"),
            check=False,
            capture_output=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0
