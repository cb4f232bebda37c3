"""Observability: metrics, the audit log and process logging."""
