"""Models: load a spec at a revision, attach uniform hook points, capture, patch, ablate."""
