r"""Training losses of sparse autoencoders: reconstruction, sparsity penalties, AuxK and JumpReLU's estimators.

Shapes: ``N`` rows (tokens), ``d`` the reconstructed width (``d_out``), ``W`` the number of latents
(``width``). Inputs are the *normalised* activations the SAE trains on (see :mod:`lmscope.sae.train`).
Every function is pure: tensors in, tensors out, nothing stored.

- :func:`reconstruction_mse`, :func:`fvu` — how well :math:`\hat y` reconstructs :math:`y`;
- :func:`l1_penalty` — ``relu`` SAEs (Towards Monosemanticity; Conerly et al. 2024 update);
- :func:`aux_latents`, :func:`auxk_loss`, :func:`auxk_loss_dense` — ``topk``/``batchtopk`` SAEs (Gao et al. 2024);
- :func:`rectangle`, :class:`HeavisideSTE`, :class:`JumpReLUSTE`, :func:`jumprelu`, :func:`jumprelu_l0` —
  ``jumprelu`` SAEs (Rajamanoharan et al. 2024, as in Gemma Scope and SAELens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DEFAULT_AUX_COEFFICIENT = 1.0 / 32.0
"""Weight of the AuxK loss (Gao et al. 2024, appendix A.2)."""

DEFAULT_BANDWIDTH = 1e-3
"""Width :math:`\\varepsilon` of the rectangle kernel of JumpReLU's straight-through estimators (Gemma Scope)."""


# -- reconstruction --------------------------------------------------------------------------------


def reconstruction_mse(y_hat: Tensor, y: Tensor) -> Tensor:
    r"""Squared error summed over dimensions, averaged over rows: :math:`\frac1N \sum_n \lVert y_n - \hat y_n \rVert^2`.

    ``y_hat``, ``y``: ``[N, d]`` → scalar.
    """
    return (y - y_hat).pow(2).sum(-1).mean()


def fvu(y_hat: Tensor, y: Tensor) -> Tensor:
    r"""Fraction of variance unexplained, :math:`\sum_n \lVert y_n - \hat y_n \rVert^2 / \sum_n \lVert y_n - \bar y \rVert^2`.

    :math:`\bar y` is the mean row of ``y``. ``y_hat``, ``y``: ``[N, d]`` → scalar (``nan``/``inf`` if ``y`` does not vary).
    """
    return (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()


# -- relu ----------------------------------------------------------------------------------------


def l1_penalty(features: Tensor, w_dec: Tensor) -> Tensor:
    r"""L1 of the features weighted by their decoder norms, :math:`\frac1N \sum_n \sum_i f_{n,i} \lVert W_{dec,i} \rVert_2`.

    Weighting by the decoder norm makes the penalty invariant to moving scale between a feature's
    activation and its decoder row, so the decoder needs no unit-norm constraint (Conerly et al.
    2024, "Training SAEs", an update to Towards Monosemanticity). ``features``: ``[N, W]``
    (non-negative); ``w_dec``: ``[W, d]`` → scalar.
    """
    return (features * w_dec.norm(dim=1)).sum(-1).mean()


# -- topk / batchtopk: AuxK -------------------------------------------------------------------------


def aux_latents(pre: Tensor, dead: Tensor, k_aux: int) -> Tensor | None:
    r"""Indices ``[N, k']`` of each row's ``k' = min(k_aux, #dead)`` largest pre-activations among dead latents.

    ``pre``: ``[N, W]`` pre-activations; ``dead``: bool ``[W]``. ``None`` when no latent is dead
    (then the AuxK loss is 0). Indices are sorted ascending within each row.
    """
    dead_index = dead.nonzero().flatten()
    if dead_index.numel() == 0 or k_aux < 1:
        return None
    if dead_index.numel() <= k_aux:  # every dead latent is chosen; no search needed
        return dead_index.expand(pre.shape[0], -1)
    _, local = pre.index_select(1, dead_index).topk(int(k_aux), dim=-1, sorted=False)
    return dead_index[local].sort(dim=-1).values


def auxk_loss(residual: Tensor, residual_hat: Tensor) -> Tensor:
    r"""The AuxK loss (Gao et al. 2024): how well the dead latents reconstruct the main reconstruction's error.

    With the residual error :math:`e = y - \hat y` (``residual``, treated as a constant) and its
    reconstruction :math:`\hat e = \sum_{i \in \mathrm{aux}} \mathrm{ReLU}(pre_i) W_{dec,i}` from the
    ``k_aux`` largest pre-activations among dead latents, through the decoder *without* its bias
    (``residual_hat``)::

        L_aux = Σ_n ||e_n − ê_n||² / Σ_n ||e_n − ē||²        (ē: the mean residual row)

    i.e. the FVU of :math:`\hat e` as a prediction of :math:`e`; the trainer adds it with coefficient
    :data:`DEFAULT_AUX_COEFFICIENT` (1/32). ``residual``, ``residual_hat``: ``[N, d]`` → scalar.
    The gradient reaches only the dead latents' encoder columns and decoder rows, pulling them
    toward directions the live latents miss.
    """
    e = residual.detach()
    return (e - residual_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(torch.finfo(e.dtype).tiny)


def auxk_loss_dense(pre: Tensor, dead: Tensor, residual: Tensor, w_dec: Tensor, k_aux: int) -> Tensor:
    r""":func:`auxk_loss` from pre-activations, with a dense decode; 0 when no latent is dead.

    ``pre``: ``[N, W]`` (differentiable); ``dead``: bool ``[W]``; ``residual``: ``[N, d]`` (:math:`e = y - \hat y`);
    ``w_dec``: ``[W, d]``; ``k_aux``: latents per row (Gao et al.: ``d // 2``) → scalar.
    """
    index = aux_latents(pre.detach(), dead, k_aux)
    if index is None:
        return pre.new_zeros(())
    aux = torch.zeros_like(pre).scatter(-1, index, torch.relu(pre.gather(-1, index)))
    return auxk_loss(residual, aux @ w_dec)


# -- jumprelu --------------------------------------------------------------------------------------


def rectangle(z: Tensor) -> Tensor:
    r"""The rectangle kernel :math:`K(z) = 1[-\frac12 < z < \frac12]` (same dtype as ``z``)."""
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class HeavisideSTE(torch.autograd.Function):
    r"""The step :math:`H(x - \theta) = 1[x > \theta]` with a straight-through estimator for :math:`\theta`.

    Forward: ``x [N, W]``, ``threshold`` :math:`\theta` (``[W]``, broadcast) → ``1[x > θ]`` as ``x``'s dtype.
    Backward (Rajamanoharan et al. 2024, eq. 11)::

        ∂/∂x  := 0
        ∂/∂θ  := −(1/ε) · K((x − θ)/ε)          summed over the rows broadcast against θ

    which is the exact derivative of the box-smoothed step :math:`\mathrm{clamp}((x - \theta)/\varepsilon + \tfrac12, 0, 1)`
    (a kernel density estimate of :math:`-p(\theta)` when :math:`x` has density :math:`p`).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = (-(1.0 / eps) * rectangle((x - threshold) / eps) * grad_output).sum_to_size(threshold.shape)
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        return grad_x, grad_threshold, None


class JumpReLUSTE(torch.autograd.Function):
    r"""JumpReLU :math:`x \cdot H(x - \theta)` with a straight-through estimator for :math:`\theta`.

    Forward: ``x [N, W]``, ``threshold`` :math:`\theta` (``[W]``, broadcast) → ``x · 1[x > θ]``.
    Backward (Rajamanoharan et al. 2024, eq. 12)::

        ∂/∂x  := 1[x > θ]
        ∂/∂θ  := −(θ/ε) · K((x − θ)/ε)          summed over the rows broadcast against θ

    (a kernel estimate of :math:`\partial_\theta \mathbb{E}[x\,1[x > \theta]] = -\theta\, p(\theta)`).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = (x > threshold).to(x.dtype) * grad_output if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = (-(threshold / eps) * rectangle((x - threshold) / eps) * grad_output).sum_to_size(threshold.shape)
        return grad_x, grad_threshold, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float = DEFAULT_BANDWIDTH) -> Tensor:
    """Feature activations ``[N, W]`` of a JumpReLU SAE in training (see :class:`JumpReLUSTE`)."""
    return JumpReLUSTE.apply(pre, threshold, bandwidth)


def jumprelu_l0(pre: Tensor, threshold: Tensor, bandwidth: float = DEFAULT_BANDWIDTH) -> Tensor:
    r"""Mean L0 :math:`\frac1N \sum_n \sum_i H(pre_{n,i} - \theta_i)`, differentiable in :math:`\theta` by :class:`HeavisideSTE`.

    The JumpReLU sparsity loss is :math:`\lambda \cdot` this. ``pre``: ``[N, W]``; ``threshold``: ``[W]`` → scalar.
    """
    return HeavisideSTE.apply(pre, threshold, bandwidth).sum(-1).mean()
