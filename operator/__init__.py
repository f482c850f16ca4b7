"""Consortium operator (import name consortium_operator): kopf reconcilers for sessions, placement,
audits, failover and receipts, one concern per module."""
