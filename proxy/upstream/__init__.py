"""Upstream registries: the client, its auth dance, egress rules and breakers."""
