"""Faults injected into real processes (issue 12)."""
