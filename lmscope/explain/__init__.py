"""Automated explanations of neurons and SAE features, scored by simulation, detection and fuzzing."""
