"""Who the gate's users are: htpasswd (bcrypt) passwords and group membership.

Password checks cost the same whether or not the user exists (a dummy bcrypt hash is
checked for unknown users), so response time does not reveal which users exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import bcrypt
import yaml

from proxy.principal import Principal
from proxy.settings import AuthSettings, ConfigError

# `$2y$` (htpasswd), `$2b$`, `$2a$`; a cost; 22 characters of salt and 31 of hash.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# A valid bcrypt hash of a random string: checked for unknown users to even out timing.
_DUMMY_HASH = bcrypt.hashpw(b"registry-gate-no-such-user", bcrypt.gensalt(rounds=10))


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

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> UserDirectory:
        """Load the htpasswd file and the groups named in the auth settings."""
        users = load_htpasswd(settings.htpasswd) if settings.htpasswd else {}
        return cls(users, load_groups(settings))

    def authenticate(self, user: str, password: str) -> Principal | None:
        """The principal for valid credentials, None otherwise (constant-cost check)."""
        hashed = self._users.get(user)
        # bcrypt reads 72 bytes (htpasswd -B hashes only those); bcrypt>=5 raises past them.
        candidate = password.encode()[:72]
        ok = bcrypt.checkpw(candidate, hashed if hashed is not None else _DUMMY_HASH)
        if hashed is None or not ok:
            return None
        return Principal(user, self.groups_of(user))

    def groups_of(self, user: str) -> frozenset[str]:
        """The groups a user belongs to by the gate's own tables."""
        return self._groups.get(user, frozenset())
