"""Executors run dispatched jobs: ``local`` (subprocesses) or ``ray`` (a Ray cluster)."""
