"""Suites: catalogs of checkpoints (revision ↔ step ↔ tokens seen) and checkpoint selectors."""
