"""registry-gate: an access-policy proxy for container registries."""

__version__ = "0.1.0"
