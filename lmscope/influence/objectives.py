r"""What influence is measured on: a training sequence's loss and a query's measurement, token by token.

Both are sums of next-token negative log-likelihoods over chosen target positions:

- the **training loss** of a row of ``L`` tokens (``seq_len + 1`` in a suite's data) is the sum over
  its ``L - 1`` next-token targets (the model reads ``row[:-1]`` and predicts ``row[1:]``, as in
  training);
- the **measurement** of a query (prompt ``p``, completion ``c``) is
  :math:`m = -\log p(c \mid p) = -\sum_j \log p(c_j \mid p, c_{<j})`, the completion's targets only.

Influence scores are :math:`\nabla m^\top (G + \lambda I)^{-1} \nabla L_{train}`: to first order, how
much upweighting the training sequence raises :math:`\log p(c \mid p)` (kronfluence's convention with
the measurement taken as the completion's loss). Positive: a proponent; negative: an opponent.

For curvature fitting, targets are drawn from the model's own predictive distribution (the *true*
Fisher, as in Grosse et al. 2023 and kronfluence's default), or taken from the data (the empirical
Fisher) when asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from lmscope.errors import LmscopeError


@dataclass
class TokenBatch:
    """Model inputs and next-token targets of a batch.

    Attributes:
        inputs: int64 ``[B, T]`` token ids the model reads.
        targets: int64 ``[B, T]`` the token to predict after each input position.
        mask: bool ``[B, T]`` which targets count (the rest, e.g. prompt or padding, are left out).
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))


def training_batch(rows: Tensor) -> TokenBatch:
    """Rows ``[B, L]`` of training data → read ``rows[:, :-1]``, predict ``rows[:, 1:]``, every target counted."""
    rows = torch.as_tensor(rows).long()
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise LmscopeError(f"training rows must be a [batch, length ≥ 2] array of token ids; got shape {tuple(rows.shape)}.")
    return TokenBatch(rows[:, :-1], rows[:, 1:], torch.ones(rows.shape[0], rows.shape[1] - 1, dtype=torch.bool))


def query_batch(queries: list[tuple[list[int], list[int]]], pad_id: int = 0) -> TokenBatch:
    """Queries ``(prompt ids, completion ids)`` → a right-padded batch whose counted targets are the completions.

    Right padding changes nothing before it in a causal model, and padded targets are masked out, so
    each query's measurement and gradients are those it would have alone.
    """
    if not queries:
        raise LmscopeError("no query given; give at least one prompt and completion.")
    rows = []
    for i, (prompt, completion) in enumerate(queries):
        if len(prompt) < 1:
            raise LmscopeError(f"query {i}'s prompt is empty; give a prompt of at least one token (the model needs a context).")
        if len(completion) < 1:
            raise LmscopeError(f"query {i}'s completion is empty; give the completion whose probability is measured.")
        rows.append((list(prompt) + list(completion), len(prompt)))
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        inputs[b, : len(ids) - 1] = ids_t[:-1]
        targets[b, : len(ids) - 1] = ids_t[1:]
        mask[b, n_prompt - 1 : len(ids) - 1] = True
    return TokenBatch(inputs, targets, mask)


def logits_of(model: nn.Module, inputs: Tensor) -> Tensor:
    """``[B, T, V]`` float32 logits of a ``transformers`` causal LM, differentiable through its activations.

    The model reads its input embeddings as a leaf that requires grad, so gradients reach every layer's
    activations even when no parameter requires grad (see :func:`activation_gradients_only`).
    """
    embeddings = model.get_input_embeddings()(inputs).detach().requires_grad_(True)
    return model(inputs_embeds=embeddings, use_cache=False).logits.float()


@contextmanager
def activation_gradients_only(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter for the duration (restored after).

    Influence needs the gradients at layer outputs, never the parameters' own ``.grad``: skipping the
    weight-gradient products saves about a third of each backward pass.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def token_losses(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``[B, T]`` negative log-likelihood of each target (0 where ``mask`` is False)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape)
    return nll * mask


def sampled_targets(logits: Tensor, generator: torch.Generator) -> Tensor:
    """``[B, T]`` targets drawn from the model's predictive distribution at each position (for the true Fisher).

    Inverse-CDF sampling: one uniform draw per position from ``generator`` (on the CPU), located in the
    cumulative distribution; an order of magnitude faster than ``torch.multinomial`` over large vocabularies.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1).reshape(-1, logits.shape[-1]).cpu()
    cdf = probs.cumsum(dim=-1)
    uniform = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, uniform, right=True).clamp_max(cdf.shape[1] - 1)
    return draws.view(logits.shape[:-1]).to(logits.device)
