"""Activations: the on-disk activation store (write, resume, stream)."""
