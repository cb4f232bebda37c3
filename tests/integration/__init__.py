"""Integration tests that run against real upstream registries."""
