r"""Bits per byte by domain (Paloma's measure), with a sliding window for long documents.

For a document of UTF-8 byte length :math:`B` and tokens :math:`t_1 … t_n`,

.. math::  \mathrm{bits} = -\sum_i \log_2 p(t_i \mid \text{context}_i), \qquad \mathrm{bpb}_{domain} = \frac{\sum_{d \in domain} \mathrm{bits}_d}{\sum_{d \in domain} B_d}

(total bits over total bytes of the domain, so long documents weigh by their length).

Every token is scored exactly once. A *prefix token* (the model's BOS, else its EOS)
is put before each document so that :math:`t_1` is scored too; a model with neither
leaves :math:`t_1` unscored, and the count of unscored tokens is reported.

Documents longer than the context ``L`` are scored with a sliding window of stride
``S`` (default ``L // 2``): windows start at ``0, S, 2S, …`` of the prefixed sequence,
and each scores only the tokens that no earlier window scored, so every token after
the first window sees at least ``L - S`` tokens of context. ``S = 1`` gives every
token a full ``L - 1`` tokens of context (exact but slow).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress


@dataclass
class DomainBitsPerByte:
    """Bits per byte of one domain (``domain == "all"``: every document).

    Attributes:
        domain: the domain.
        documents: documents scored.
        tokens: tokens scored.
        unscored_tokens: first tokens left unscored (only when the model has no prefix token).
        bytes: UTF-8 bytes of those documents.
        bits: total bits, ``-Σ log2 p``.
        bits_per_byte: ``bits / bytes``.
    """

    domain: str
    documents: int
    tokens: int
    unscored_tokens: int
    bytes: int
    bits: float
    bits_per_byte: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a sequence of ``n_tokens`` (the prefix included): ``(begin, end, first_scored)``.

    The window feeds positions ``[begin, end)`` and scores the targets at positions
    ``[first_scored, end)`` (each predicted from the position before it). Positions
    ``1 … n_tokens - 1`` are scored exactly once overall.
    """
    if ctx < 2 or not 1 <= stride <= ctx - 1:
        raise LmscopeError(f"context {ctx} and stride {stride} must satisfy ctx >= 2 and 1 <= stride < ctx.")
    out: list[tuple[int, int, int]] = []
    scored_until = 1
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + ctx, n_tokens)
        out.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
        if end == n_tokens:
            break
    return out


def _prefix_token(model: Any, tokenizer: Any) -> int | None:
    for source in (tokenizer, getattr(model, "config", None), getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return None


@torch.no_grad()
def _first_per_domain(indices: np.ndarray, domains: list[str], n: int) -> np.ndarray:
    """The first ``n`` of ``indices`` (document indices, in order) from each domain, order kept."""
    if n < 1:
        raise LmscopeError(f"max_per_domain={n}: give a positive number of documents per domain.")
    taken: dict[str, int] = {}
    keep = []
    for index in indices.tolist():
        domain = domains[index]
        if taken.get(domain, 0) < n:
            taken[domain] = taken.get(domain, 0) + 1
            keep.append(index)
    return np.asarray(keep, dtype=indices.dtype)


def bits_per_byte_by_domain(
    model: Any,
    corpus: Any,
    *,
    split: str | None = "heldout",
    domain: str | None = None,
    ctx: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_documents: int | None = None,
    max_per_domain: int | None = None,
    prefix_token_id: int | None | str = "auto",
    tokenizer: Any = None,
    progress: Progress = no_progress,
) -> list[DomainBitsPerByte]:
    """Bits per byte of ``model`` on the documents of a tokenized corpus, per domain and overall.

    Args:
        model: a ``transformers`` causal LM (or a :class:`lmscope.models.hooks.HookedModel`).
        corpus: a :class:`lmscope.data.tokenized.TokenizedCorpus` (needs ``select``,
            ``document_tokens`` and the ``n_bytes``/``domain`` columns of its document table).
        split, domain: which documents (``None``: all).
        ctx: window length in tokens; default the model's ``max_position_embeddings`` (capped at 2048).
        stride: sliding-window stride; default ``ctx // 2``.
        batch_size: windows per forward pass; results do not depend on it (beyond float rounding).
        max_documents: score only the first N selected documents (in corpus order).
        max_per_domain: score only the first N selected documents of each domain (in corpus
            order), so that every domain is measured on a fixed sample as in Paloma.
        prefix_token_id: token put before each document; ``"auto"``: BOS, else EOS; ``None``: no prefix.

    Returns one :class:`DomainBitsPerByte` per domain (sorted), then ``"all"``.
    """
    hf = getattr(model, "model", model) if hasattr(model, "hook_point") else model
    if tokenizer is None and hasattr(model, "tokenizer"):
        tokenizer = model.tokenizer
    config = hf.config
    ctx = ctx or min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 2048)
    stride = stride or max(ctx // 2, 1)
    prefix = _prefix_token(hf, tokenizer) if prefix_token_id == "auto" else prefix_token_id
    device = next(hf.parameters()).device

    indices = corpus.select(split=split, domain=domain)
    if max_per_domain is not None:
        indices = _first_per_domain(indices, corpus.documents.column("domain").to_pylist(), max_per_domain)
    if max_documents is not None:
        indices = indices[:max_documents]
    if len(indices) == 0:
        raise LmscopeError(f"no documents to score in split {split!r}, domain {domain!r}; check the corpus.")
    table = corpus.documents
    domains = table.column("domain").to_pylist()
    n_bytes = table.column("n_bytes").to_numpy()

    jobs: list[tuple[int, np.ndarray, int]] = []  # (document, input ids, first scored offset within the window)
    for doc in indices.tolist():
        tokens = np.asarray(corpus.document_tokens(doc), dtype=np.int64)
        sequence = np.concatenate([[prefix], tokens]) if prefix is not None else tokens
        for begin, end, first in windows(len(sequence), ctx, stride):
            jobs.append((doc, sequence[begin:end], first - begin))

    nats = np.zeros(len(domains), dtype=np.float64)
    scored = np.zeros(len(domains), dtype=np.int64)
    # Longest windows first keeps padding low; the order cannot change any window's result.
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][1]))
    progress("bits per byte", 0, len(jobs))
    for start in range(0, len(order), batch_size):
        batch = [jobs[j] for j in order[start : start + batch_size]]
        width = max(len(ids) for _, ids, _ in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.from_numpy(ids)
            mask[row, : len(ids)] = 1
        logits = hf(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:].to(device)
        token_nats = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
        for row, (doc, ids, first) in enumerate(batch):
            # target at position p is predicted from position p - 1: row entries [first - 1, len - 1)
            nats[doc] += token_nats[row, first - 1 : len(ids) - 1].sum().item()
            scored[doc] += len(ids) - first
        progress("bits per byte", len(batch), len(jobs))

    results: list[DomainBitsPerByte] = []
    groups: dict[str, list[int]] = {}
    for doc in indices.tolist():
        groups.setdefault(domains[doc], []).append(doc)
    groups_in_order = [(name, groups[name]) for name in sorted(groups)] + [("all", indices.tolist())]
    unscored_each = 0 if prefix is not None else 1
    for name, docs in groups_in_order:
        bits = float(nats[docs].sum() / math.log(2))
        total_bytes = int(n_bytes[docs].sum())
        results.append(DomainBitsPerByte(
            domain=name, documents=len(docs), tokens=int(scored[docs].sum()),
            unscored_tokens=unscored_each * sum(1 for d in docs if len(corpus.document_tokens(d)) > 0),
            bytes=total_bytes, bits=bits, bits_per_byte=bits / total_bytes if total_bytes else float("nan"),
        ))
    return results


def result_rows(results: list[DomainBitsPerByte], **identity: Any) -> list[dict[str, Any]]:
    """Rows of the results schema (``metric = "bits_per_byte"``, one per domain and ``all``).

    ``identity`` fills the model columns (``suite, model, size, seed, revision, step, tokens_seen``);
    ``tokens``, ``bytes`` and ``documents`` are kept as extra columns.
    """
    return [
        {**identity, "metric": "bits_per_byte", "domain": r.domain, "value": r.bits_per_byte,
         "tokens": r.tokens, "bytes": r.bytes, "documents": r.documents}
        for r in results
    ]
