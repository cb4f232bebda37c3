"""Loopback-only network namespaces for running real clients (podman, containerd).

Owns the one recipe tests use to keep a misconfigured client from reaching the
internet: ``unshare --net`` gives a process a private network namespace whose only
interface is ``lo`` (brought up first), so 127.0.0.1 works and nothing else does.
Everything started inside lives and dies there; host-side ports are unreachable.
"""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess

__all__ = ["NETNS_PREFIX", "can_unshare_net", "in_private_netns", "interfaces", "netns_argv"]

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


def interfaces() -> list[str]:
    """Names of the network interfaces of *this process's* network namespace.

    Not ``/sys/class/net``: sysfs shows the namespace of whoever mounted it, so after a
    bare ``unshare --net`` (no new mount namespace) it still lists the host's
    interfaces. ``if_nameindex()`` asks the kernel about the current namespace, and
    ``/proc/self/net/dev`` is per-namespace too (the fallback).
    """
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        pass
    try:
        with open("/proc/self/net/dev") as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return []
    return sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)


def in_private_netns() -> bool:
    """True when ``lo`` is the only interface this process can see, and it is up
    (127.0.0.1 connects): nothing started from here can leave the machine."""
    if interfaces() != ["lo"]:
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            # Binding works while lo is down; connecting does not.
            with socket.create_connection(server.getsockname()[:2], timeout=2):
                pass
    except OSError:
        return False
    return True
