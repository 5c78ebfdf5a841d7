r"""Influence scores of candidate training sequences on queries.

For query ``q`` with measurement gradient :math:`\nabla m_q` and a training sequence ``n`` with loss
gradient :math:`G_n`, the score is, summed over the tracked layers ``l``,

.. math::  s_{qn} = \sum_l \langle P_l \nabla_l m_q,\; G_{n,l} \rangle
           = \sum_l \sum_t g_{n,t}^\top \,(P_l \nabla_l m_q)\, \bar a_{n,t}

(``P_l``: the layer's damped inverse curvature, :mod:`lmscope.influence.precondition`). Query gradients are
preconditioned once; training sequences are then scored in batches from their layer inputs and output
gradients, one forward and backward pass per batch, with no per-sequence gradient kept.

**Query batching.** With ``rank=r`` each preconditioned query gradient is replaced by its best rank-``r``
approximation :math:`U_r \Sigma_r V_r^\top` (SVD), stored as two thin factors (``r·(d_out + d_in)`` numbers instead
of ``d_out·d_in`` per query and layer; Grosse et al. 2023, §3.2.1). Each layer is then contracted along the cheaper
path: through the thin factors token by token (``Q·T·r·(d_out + d_in)`` per row), or through each row's gradient
(``T·d_out·d_in + Q·d_out·d_in`` per row, with the rank-``r`` matrix rebuilt once); the scores are the same.

**Per-token scores.** :math:`s_{qn} = \sum_t s_{qnt}` with :math:`s_{qnt} = \sum_l g_{n,t}^\top (P_l \nabla_l m_q) \bar a_{n,t}`:
which tokens of a training sequence carry its influence (the gradient of the loss at token ``t`` flows to
every layer input at ``t``; the split is by position of the layer activation, as kronfluence's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from lmscope.errors import LmscopeError
from lmscope.influence.objectives import TokenBatch, activation_gradients_only, logits_of, token_losses, training_batch
from lmscope.influence.precondition import Preconditioner
from lmscope.influence.taps import LinearTaps
from lmscope.progress import Progress, no_progress


def batch_gradients(model: nn.Module, modules: dict[str, nn.Linear], batch: TokenBatch) -> tuple[dict[str, Tensor], Tensor]:
    """Per-row gradients ``{layer: [B, O, I]}`` of the summed masked loss of each row, and the losses ``[B]``."""
    batch = batch.to(next(model.parameters()).device)
    with LinearTaps(modules) as taps, activation_gradients_only(model):
        logits = logits_of(model, batch.inputs)
        losses = token_losses(logits, batch.targets, batch.mask).sum(dim=1)
        losses.sum().backward()
        taps.check_complete()
        grads = {name: taps.per_sequence_gradients(name) for name in modules}
    return grads, losses.detach()


@dataclass
class PreparedQueries:
    """Preconditioned query gradients, dense (``[Q, O, I]``) or as rank-``r`` factors (``[Q, O, r]``, ``[Q, r, I]``)."""

    dense: dict[str, Tensor] | None
    low_rank: dict[str, tuple[Tensor, Tensor]] | None
    measurements: Tensor
    """``[Q]``: each query's measurement, the completion's loss :math:`-\\log p(c \\mid p)` in nats."""

    @property
    def n_queries(self) -> int:
        return int(self.measurements.shape[0])

    def dense_of(self, name: str) -> Tensor:
        """``[Q, O, I]``: layer ``name``'s preconditioned query gradients (rebuilt once from the rank-``r`` factors if need be)."""
        if self.dense is not None and name in self.dense:
            return self.dense[name]
        left, right = self.low_rank[name]
        self.dense = {} if self.dense is None else self.dense
        self.dense[name] = left @ right
        return self.dense[name]


def prepare_queries(model: nn.Module, modules: dict[str, nn.Linear], queries: TokenBatch, preconditioner: Preconditioner,
                    rank: int | None = None) -> PreparedQueries:
    """Gradients of each query's measurement, preconditioned (and reduced to rank ``rank`` when given)."""
    grads, measurements = batch_gradients(model, modules, queries)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LmscopeError(f"query rank {rank!r} must be a positive integer (or unset for full-rank query gradients).")
    preconditioned = {name: preconditioner(name, g) for name, g in grads.items()}
    if rank is None:
        return PreparedQueries(preconditioned, None, measurements)
    low: dict[str, tuple[Tensor, Tensor]] = {}
    for name, g in preconditioned.items():
        u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
        r = min(rank, s.shape[-1])
        low[name] = ((u[..., :r] * s[..., None, :r]).float(), vh[..., :r, :].float())
    return PreparedQueries(None, low, measurements)


def score_batch(model: nn.Module, modules: dict[str, nn.Linear], prepared: PreparedQueries, rows: Tensor,
                per_token: bool = False) -> tuple[Tensor, Tensor | None]:
    """Scores ``[Q, B]`` of training rows ``[B, L]`` (and per-token scores ``[Q, B, L-1]`` when asked)."""
    batch = training_batch(rows).to(next(model.parameters()).device)
    with LinearTaps(modules) as taps, activation_gradients_only(model):
        logits = logits_of(model, batch.inputs)
        loss = token_losses(logits, batch.targets, batch.mask).sum()
        loss.backward()
        taps.check_complete()
        q, b, t = prepared.n_queries, batch.inputs.shape[0], batch.inputs.shape[1]
        scores = torch.zeros(q, b, dtype=torch.float64)
        token_scores = torch.zeros(q, b, t, dtype=torch.float64) if per_token else None
        for name in modules:
            a, g = taps.activations[name], taps.output_grads[name]
            o, i = g.shape[-1], a.shape[-1]
            low = prepared.low_rank[name] if prepared.low_rank is not None else None
            if low is not None and q * t * low[0].shape[-1] * (o + i) <= t * o * i + q * o * i:
                left, right = low  # the thin factors' path is the cheaper one: Σ_r (g_t·u_r)(v_r·ā_t)
                u = torch.einsum("bto,qor->qbtr", g, left.to(g.dtype))
                v = torch.einsum("bti,qri->qbtr", a, right.to(a.dtype))
                contrib = (u * v).sum(dim=-1).double()
                scores += contrib.sum(dim=2)
                if token_scores is not None:
                    token_scores += contrib
                continue
            pq = prepared.dense_of(name).to(a.dtype)
            if per_token:
                contrib = torch.einsum("qoi,bto,bti->qbt", pq, g, a).double()
                token_scores += contrib
                scores += contrib.sum(dim=2)
            else:
                per_sequence = torch.einsum("bto,bti->boi", g, a)
                scores += torch.einsum("qoi,boi->qb", pq, per_sequence).double()
    return scores, token_scores


def score_rows(model: nn.Module, modules: dict[str, nn.Linear], prepared: PreparedQueries, rows: Any, *,
               batch_size: int = 8, progress: Progress = no_progress) -> np.ndarray:
    """Scores ``[Q, N]`` float64 of every row of ``rows`` (``[N, L]`` token ids, read in batches)."""
    n = int(rows.shape[0])
    out = np.zeros((prepared.n_queries, n), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            chunk = torch.as_tensor(np.asarray(rows[start : start + batch_size]).astype(np.int64))
            scores, _ = score_batch(model, modules, prepared, chunk)
            out[:, start : start + chunk.shape[0]] = scores.cpu().numpy()
            progress("influence scores", chunk.shape[0], n)
    finally:
        model.train(was_training)
    return out
