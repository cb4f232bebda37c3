"""Who the gate's users are: htpasswd (bcrypt) passwords and group membership.

Password checks cost the same whether or not the user exists: an unknown user's password
is checked against a dummy bcrypt hash made with the cost the file's own hashes use (the
most common one; `htpasswd -B` writes 5, `-C` sets it), so response time does not reveal
which users exist, whatever cost the operator chose.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import bcrypt
import yaml

from proxy.policy.principal import Principal
from proxy.settings import AuthSettings, ConfigError

# `$2y$` (htpasswd), `$2b$`, `$2a$`; a cost; 22 characters of salt and 31 of hash.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# The dummy hash's cost when the file has no entries (nobody can log in then anyway).
DEFAULT_DUMMY_COST = 10
_DUMMY_PASSWORD = b"registry-gate-no-such-user"


def bcrypt_cost(hashed: bytes) -> int:
    """The cost (log2 rounds) of a `$2b$NN$...` hash."""
    return int(hashed[4:6])


def typical_cost(hashes: list[bytes]) -> int:
    """The cost most of the hashes use (the higher one on a tie)."""
    if not hashes:
        return DEFAULT_DUMMY_COST
    counts = Counter(bcrypt_cost(h) for h in hashes)
    return max(counts, key=lambda cost: (counts[cost], cost))


def load_htpasswd(path: Path) -> dict[str, bytes]:
    """Read `user:bcrypt-hash` lines; other hash schemes are refused (exit 2)."""
    users: dict[str, bytes] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"auth.htpasswd: cannot read {path}: {exc.strerror}") from exc
    for number, raw_line in enumerate(lines, start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not _BCRYPT_RE.fullmatch(hashed):
            raise ConfigError(
                f"auth.htpasswd: {path}:{number}: only bcrypt entries are accepted (htpasswd -B)"
            )
        # htpasswd writes $2y$; the bcrypt library knows the identical scheme as $2b$.
        users[user] = ("$2b$" + hashed[4:]).encode()
    return users


def load_groups(settings: AuthSettings) -> dict[str, frozenset[str]]:
    """user -> groups, from `auth.groups` (group -> members) and `auth.groups_file`."""
    table: dict[str, list[str]] = {k: list(v) for k, v in settings.groups.items()}
    if settings.groups_file is not None:
        try:
            document = yaml.safe_load(settings.groups_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"auth.groups_file: cannot read {settings.groups_file}") from exc
        if not isinstance(document, dict) or not all(
            isinstance(members, list) for members in document.values()
        ):
            raise ConfigError("auth.groups_file: expected a mapping of group -> [users]")
        for group, members in document.items():
            table.setdefault(str(group), []).extend(str(member) for member in members)
    memberships: dict[str, set[str]] = {}
    for group, members in table.items():
        for member in members:
            memberships.setdefault(member, set()).add(group)
    return {user: frozenset(groups) for user, groups in memberships.items()}


class UserDirectory:
    """Checks passwords and knows group membership."""

    def __init__(self, users: dict[str, bytes], groups: dict[str, frozenset[str]]) -> None:
        self._users = users
        self._groups = groups
        # Made when the file is loaded, at the cost its users' checks take: an unknown
        # user must cost what a known user with a wrong password costs.
        self.dummy_cost = typical_cost(list(users.values()))
        self._dummy_hash = bcrypt.hashpw(_DUMMY_PASSWORD, bcrypt.gensalt(rounds=self.dummy_cost))

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> UserDirectory:
        """Load the htpasswd file and the groups named in the auth settings."""
        users = load_htpasswd(settings.htpasswd) if settings.htpasswd else {}
        return cls(users, load_groups(settings))

    def knows(self, user: str) -> bool:
        """Whether the htpasswd file has this user (for audit reasons, never for clients)."""
        return user in self._users

    def authenticate(self, user: str, password: str) -> Principal | None:
        """The principal for valid credentials, None otherwise (constant-cost check).

        CPU-bound for milliseconds: call it off the event loop (bcrypt releases the GIL).
        """
        hashed = self._users.get(user)
        # bcrypt reads 72 bytes (htpasswd -B hashes only those); bcrypt>=5 raises past them.
        candidate = password.encode(errors="surrogatepass")[:72]
        ok = bcrypt.checkpw(candidate, hashed if hashed is not None else self._dummy_hash)
        if hashed is None or not ok:
            return None
        return Principal(user, self.groups_of(user))

    def groups_of(self, user: str) -> frozenset[str]:
        """The groups a user belongs to by the gate's own tables."""
        return self._groups.get(user, frozenset())
