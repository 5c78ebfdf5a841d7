"""Influence functions: which training sequences raise the probability of a completion, and when they were seen.

Stages (one module each):

- :mod:`.taps` — the ``nn.Linear`` modules whose weights influence is computed over, and hooks that
  record their inputs and the gradients at their outputs;
- :mod:`.objectives` — the training loss of a sequence and the query measurement, token by token;
- :mod:`.factors` — curvature: identity, diagonal, K-FAC and EK-FAC factors fitted on training sequences;
- :mod:`.precondition` — damped inverse-curvature products with those factors;
- :mod:`.scores` — query gradients, low-rank query batching, and scores of candidate sequences
  (per sequence and per token);
- :mod:`.candidates` — which training sequences to score, and their provenance (documents, steps).
"""
