"""Faults injected into real processes (issue 12); shared helpers in conftest.py."""
