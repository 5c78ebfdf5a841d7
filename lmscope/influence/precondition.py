r"""Damped inverse-curvature products :math:`(\hat F + \lambda I)^{-1} v` with fitted factors, layer by layer.

With the eigenbasis :math:`Q_S, Q_A` and eigenvalues :math:`\Lambda` (``[d_out, d_in(+1)]``) of a layer's
approximate Fisher :math:`\hat F = (Q_A \otimes Q_S)\,\mathrm{diag}(\Lambda)\,(Q_A \otimes Q_S)^\top`, a gradient
``V`` (``[d_out, d_in(+1)]``) is preconditioned as

.. math::  Q_S \left[ (Q_S^\top V Q_A) \oslash (\Lambda + \lambda) \right] Q_A^\top

(``kfac``: :math:`\Lambda = \Lambda_S \Lambda_A^\top`; ``ekfac``: the refitted eigenvalues; ``diagonal``:
no rotation, :math:`\Lambda` the diagonal Fisher; ``identity``: ``V`` unchanged, no damping).

K-FAC's factors are means over tokens, so its :math:`\hat F = A \otimes S` approximates the Fisher of *one token*
(:math:`F / \bar T`, with :math:`F` the per-row Fisher and :math:`\bar T` tokens per row, when the pseudo-gradients of
different tokens are uncorrelated), while EK-FAC's eigenvalues and the diagonal are per row. This is kronfluence's
convention, kept so that scores agree with it at the same damping: K-FAC scores are about :math:`\bar T` times those
of EK-FAC, and the same absolute damping weighs :math:`\bar T` times more against K-FAC's curvature.

Damping :math:`\lambda` is a number (default ``1e-8``, kronfluence's default) or ``heuristic``:
0.1 × the mean of the layer's :math:`\Lambda` (the heuristic kronfluence offers with ``damping_factor=None``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmscope.errors import LmscopeError
from lmscope.influence.factors import Factors

DEFAULT_DAMPING = 1e-8
HEURISTIC_SCALE = 0.1


def parse_damping(value: Any) -> float | str:
    """A damping value from the CLI or a config: a non-negative number or ``heuristic``."""
    if isinstance(value, str):
        if value.strip().lower() == "heuristic":
            return "heuristic"
        try:
            value = float(value)
        except ValueError:
            raise LmscopeError(f"damping {value!r} is neither a number nor 'heuristic'; give e.g. 1e-8 or heuristic.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise LmscopeError(f"damping {value!r} must be a non-negative number or 'heuristic'.")
    return float(value)


class Preconditioner:
    """Applies one set of factors, damped, to gradients ``[Q, d_out, d_in(+1)]`` of each layer."""

    def __init__(self, factors: Factors, damping: float | str = DEFAULT_DAMPING) -> None:
        self.factors = factors
        self.strategy = factors.settings.strategy
        self.damping = parse_damping(damping)
        self._eigenvalues: dict[str, Tensor] = {}
        self.damping_used: dict[str, float] = {}
        for name, layer in factors.layers.items():
            if self.strategy == "identity":
                continue
            if self.strategy == "kfac":
                values = torch.outer(layer.gradient_eigenvalues, layer.activation_eigenvalues)
            else:
                values = layer.lambda_matrix
            if values is None:
                raise LmscopeError(f"the factors of layer {name!r} are incomplete for strategy {self.strategy}; fit them again.")
            values = values.double()
            damp = HEURISTIC_SCALE * float(values.mean()) if self.damping == "heuristic" else float(self.damping)
            if self.strategy in ("kfac", "ekfac"):
                values = values.clamp_min(0.0)  # eigenvalues of PSD matrices, rounding aside
            if damp == 0.0 and bool((values <= 0).any()):
                raise LmscopeError(f"layer {name!r} has zero curvature in some directions and damping is 0; give a positive damping.")
            self.damping_used[name] = damp
            self._eigenvalues[name] = values + damp

    def __call__(self, name: str, gradient: Tensor) -> Tensor:
        """``[Q, O, I]`` (or ``[O, I]``) → the same shape, preconditioned; float64 inside, input dtype out."""
        if self.strategy == "identity":
            return gradient
        dtype = gradient.dtype
        values = self._eigenvalues[name].to(gradient.device)
        g = gradient.double()
        if self.strategy == "diagonal":
            return (g / values).to(dtype)
        layer = self.factors.layers[name]
        q_s = layer.gradient_eigenvectors.to(gradient.device, torch.float64)
        q_a = layer.activation_eigenvectors.to(gradient.device, torch.float64)
        rotated = q_s.T @ g @ q_a
        return (q_s @ (rotated / values) @ q_a.T).to(dtype)

    def dense_inverse(self, name: str) -> Tensor:
        """``[O·I, O·I]`` float64: the damped inverse as a matrix acting on row-major ``vec(V)`` (for tests and small layers)."""
        o, i = self.factors.shapes[name]
        eye = torch.eye(o * i, dtype=torch.float64).view(o * i, o, i)
        return self(name, eye).reshape(o * i, o * i)
