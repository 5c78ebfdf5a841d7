"""Evals: per-checkpoint metrics written in the results schema."""
