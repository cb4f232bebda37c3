"""Who is asking: the principal (user and groups) that policy and audit see."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user with groups, or the anonymous principal (user None)."""

    user: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def anonymous(self) -> bool:
        """Whether no user authenticated."""
        return self.user is None

    def describe(self) -> str:
        """A short human form for messages and logs: `alice (platform, dev)`."""
        if self.user is None:
            return "anonymous"
        groups = ", ".join(sorted(self.groups))
        return f"{self.user} ({groups})" if groups else self.user


ANONYMOUS = Principal()
