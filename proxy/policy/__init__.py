"""Decisions: the policy files, their patterns, and who may do what per request."""
