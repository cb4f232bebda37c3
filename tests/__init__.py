"""Tests for registry-gate."""
