"""Names: reference grammar, addressing modes and short-name resolution (pure)."""
