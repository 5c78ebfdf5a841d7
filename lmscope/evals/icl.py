r"""In-context learning score and induction-head (prefix-matching) scores, after Olsson et al. (2022).

**In-context learning score.** For a context :math:`c_0 … c_{n-1}` the loss at token index
:math:`k \ge 1` is :math:`\ell_k = -\ln p(c_k \mid c_0 … c_{k-1})` (nats). The score is

.. math::  \mathrm{ICL} = \frac{1}{N}\sum_{j=1}^{N} \ell^{(j)}_{late} - \frac{1}{N}\sum_{j=1}^{N} \ell^{(j)}_{early}

over :math:`N` contexts, at the exact token indices ``late`` and ``early`` (Olsson use 500 and
50). A negative score means later tokens are predicted better: the model uses its context.
Contexts are the first ``late + 1`` tokens of held-out documents that have at least that many
tokens (tokens after ``late`` cannot change :math:`\ell_{late}` in a causal model), taken in
corpus order; no BOS/EOS is put before them, so ``c_0`` is the document's first token.

When ``late`` does not fit, i.e. ``late > L - 1`` with ``L = min(model context, longest selected
document)``, both positions are scaled to that length:
``late = floor(0.9 (L - 1))``, ``early = max(1, floor(0.1 (L - 1)))``; the result records the
positions used and ``scaled = True``.

**Induction (prefix-matching) score.** Random tokens :math:`r_0 … r_{T-1}` (uniform over the
vocabulary without special tokens, fixed seed) are repeated, ``[BOS,] r, r``, so that with
``o`` = 1 if a BOS is prepended else 0, position :math:`i \in [o + T, o + 2T)` holds the second
occurrence of the token first seen at :math:`i - T`. An induction head attends from :math:`i` to the
token *after* that first occurrence, key :math:`i - T + 1`. Per layer and head,

.. math::  \mathrm{induction} = \frac{1}{B\,T}\sum_{b=1}^{B}\sum_{i=o+T}^{o+2T-1} A_b[i,\ i - T + 1]

with :math:`A` the attention pattern ``[query, key]`` (rows sum to 1), so the score lies in
``[0, 1]``; 1 means all attention of every second-half query is on the induction target.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmscope.errors import LmscopeError

INDUCTION_DOMAIN = "repeated_random_tokens"


@dataclass
class ICLScore:
    """In-context learning score of one model on a corpus split.

    Attributes:
        score: ``loss_late - loss_early`` in nats (negative: the model uses context).
        loss_late: mean loss (nats) at token index ``late`` over the contexts.
        loss_early: mean loss (nats) at token index ``early`` over the contexts.
        late, early: the token indices used (after any scaling).
        scaled: whether the requested positions did not fit and were scaled (see the module docstring).
        contexts: number of contexts averaged.
        context_tokens: tokens per context (``late + 1``).
        split: the corpus split the documents came from (``None``: all).
    """

    score: float
    loss_late: float
    loss_early: float
    late: int
    early: int
    scaled: bool
    contexts: int
    context_tokens: int
    split: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scaled_positions(length: int) -> tuple[int, int]:
    """``(late, early) = (floor(0.9 (L - 1)), max(1, floor(0.1 (L - 1))))`` for contexts of at most ``L`` tokens."""
    return math.floor(0.9 * (length - 1)), max(1, math.floor(0.1 * (length - 1)))


def _unwrap(model: Any) -> Any:
    return getattr(model, "model", model) if hasattr(model, "hook_point") else model


def _model_context(hf: Any) -> int:
    return min(int(getattr(hf.config, "max_position_embeddings", 2048) or 2048), 2048)


@torch.no_grad()
def in_context_learning_score(
    model: Any,
    corpus: Any,
    *,
    late: int = 500,
    early: int = 50,
    ctx: int | None = None,
    n_contexts: int | None = 256,
    batch_size: int = 8,
    split: str | None = "heldout",
) -> ICLScore:
    """Loss at token index ``late`` minus loss at ``early``, averaged over contexts from ``corpus``.

    Args:
        model: a ``transformers`` causal LM (or a :class:`lmscope.models.hooks.HookedModel`).
        corpus: a :class:`lmscope.data.tokenized.TokenizedCorpus` (needs ``select`` and ``document_tokens``).
        late, early: token indices, ``1 <= early < late`` (Olsson et al.: 500 and 50).
        ctx: the longest context the model may see; default its ``max_position_embeddings`` (capped at 2048).
        n_contexts: use the first N long-enough documents in corpus order (``None``: all).
        batch_size: contexts per forward pass; results do not depend on it (beyond float rounding).
        split: which documents (``None``: all).

    When ``late`` does not fit the model context or the longest document, both positions
    are scaled as the module docstring says; the result records the positions used.
    """
    if not 1 <= early < late:
        raise LmscopeError(f"positions early={early} and late={late} must satisfy 1 <= early < late; pass e.g. late=500, early=50.")
    if (n_contexts is not None and n_contexts < 1) or batch_size < 1:
        raise LmscopeError(f"n_contexts={n_contexts} and batch_size={batch_size} must be at least 1 (n_contexts=None: all).")
    hf = _unwrap(model)
    limit = ctx or _model_context(hf)
    indices = corpus.select(split=split).tolist()
    if not indices:
        raise LmscopeError(f"no documents in split {split!r}; check the corpus or pass split=None.")
    lengths = {doc: len(corpus.document_tokens(doc)) for doc in indices}
    available = min(limit, max(lengths.values()))
    scaled = late > available - 1
    if scaled:
        late, early = scaled_positions(available)
        if early >= late:
            raise LmscopeError(
                f"contexts of at most {available} tokens (model context {limit}, longest document {max(lengths.values())} "
                f"tokens in split {split!r}) are too short for an in-context learning score; use documents and a context of at least 4 tokens."
            )
    length = late + 1
    chosen = [doc for doc in indices if lengths[doc] >= length]
    if n_contexts is not None:
        chosen = chosen[:n_contexts]
    contexts = torch.from_numpy(np.stack([np.asarray(corpus.document_tokens(d)[:length], dtype=np.int64) for d in chosen]))
    device = next(hf.parameters()).device

    totals = {late: 0.0, early: 0.0}
    for start in range(0, len(contexts), batch_size):
        ids = contexts[start : start + batch_size].to(device)
        logits = hf(input_ids=ids, use_cache=False).logits.float()
        for position in totals:
            # the token at index k is predicted from the logits at k - 1
            totals[position] += torch.nn.functional.cross_entropy(
                logits[:, position - 1].double(), ids[:, position], reduction="sum"
            ).item()
    loss_late, loss_early = totals[late] / len(contexts), totals[early] / len(contexts)
    return ICLScore(
        score=loss_late - loss_early, loss_late=loss_late, loss_early=loss_early, late=late, early=early,
        scaled=scaled, contexts=len(contexts), context_tokens=length, split=split,
    )


def prefix_matching_score(pattern: Tensor, seq_len: int, offset: int = 0) -> Tensor:
    """Mean attention on the induction target, per head: ``pattern [batch, heads, o + 2T, o + 2T]`` -> ``[heads]``.

    ``seq_len`` is ``T`` and ``offset`` is ``o`` (1 with a BOS before the repeated tokens); query
    ``i`` in ``[o + T, o + 2T)`` is scored on key ``i - T + 1``.
    """
    size = offset + 2 * seq_len
    if pattern.ndim != 4 or pattern.shape[-2:] != (size, size):
        raise LmscopeError(
            f"attention pattern of shape {tuple(pattern.shape)} does not fit seq_len={seq_len}, offset={offset}; "
            f"it must be [batch, heads, {size}, {size}]."
        )
    queries = torch.arange(offset + seq_len, size, device=pattern.device)
    on_target = pattern[:, :, queries, queries - seq_len + 1]  # [batch, heads, T]
    return on_target.double().mean(dim=(0, 2))


def _special_ids(hf: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set(getattr(tokenizer, "all_special_ids", None) or [])
    for source in (hf.config, getattr(hf, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(source, name, None) if source is not None else None
            for v in value if isinstance(value, list) else [value]:
                if v is not None:
                    ids.add(int(v))
    return ids


def _bos_id(hf: Any, tokenizer: Any) -> int | None:
    for source in (tokenizer, hf.config):
        value = getattr(source, "bos_token_id", None) if source is not None else None
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def repeated_random_tokens(
    vocab_size: int, seq_len: int, n_sequences: int, *, seed: int = 0, exclude: Collection[int] = (), bos: int | None = None
) -> Tensor:
    """``[n_sequences, o + 2T]`` int64: ``[bos,] r, r`` with ``r`` uniform over ``range(vocab_size)`` minus ``exclude``."""
    excluded = set(exclude)
    allowed = torch.tensor([t for t in range(vocab_size) if t not in excluded], dtype=torch.long)
    if len(allowed) == 0:
        raise LmscopeError(f"no tokens left to sample from a vocabulary of {vocab_size} without {len(excluded)} special tokens.")
    generator = torch.Generator().manual_seed(seed)
    r = allowed[torch.randint(len(allowed), (n_sequences, seq_len), generator=generator)]
    parts = [r, r]
    if bos is not None:
        parts.insert(0, torch.full((n_sequences, 1), bos, dtype=torch.long))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def induction_scores(
    hooked_model: Any, *, seq_len: int = 50, n_sequences: int = 10, seed: int = 0, prepend_bos: bool | None = None
) -> Tensor:
    """Prefix-matching score of every head on repeated random tokens: ``[n_layers, n_heads]`` float64.

    Args:
        hooked_model: a :class:`lmscope.models.hooks.HookedModel` (a plain ``transformers`` model is wrapped).
        seq_len: ``T``, length of the random sequence that is repeated once.
        n_sequences: sequences averaged (one forward pass).
        seed: seed of the random tokens (special tokens of the tokenizer/config are never drawn).
        prepend_bos: put the model's BOS first; ``None``: when it has one.
    """
    from lmscope.models.hooks import HookedModel

    hooked = hooked_model if isinstance(hooked_model, HookedModel) else HookedModel(hooked_model)
    hf, tokenizer = hooked.model, hooked.tokenizer
    bos = _bos_id(hf, tokenizer) if prepend_bos in (None, True) else None
    if prepend_bos and bos is None:
        raise LmscopeError("prepend_bos=True but the model has no BOS token; pass prepend_bos=False.")
    offset = 1 if bos is not None else 0
    limit = int(getattr(hf.config, "max_position_embeddings", 0) or 0) or None
    if seq_len < 1 or (limit is not None and offset + 2 * seq_len > limit):
        raise LmscopeError(
            f"seq_len={seq_len} gives {offset + 2 * seq_len} tokens but the model takes at most {limit}; "
            f"pass a seq_len from 1 to {((limit or 2 + offset) - offset) // 2}."
        )
    vocab = int(hf.config.vocab_size)
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    ids = repeated_random_tokens(vocab, seq_len, n_sequences, seed=seed, exclude=_special_ids(hf, tokenizer), bos=bos)
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(hooked.n_layers)]
    _, cache = hooked.run_with_cache(ids, names, need_logits=False)
    return torch.stack([prefix_matching_score(cache[name].float().cpu(), seq_len, offset) for name in names])


def uniform_induction_score(seq_len: int, bos: bool = True) -> float:
    """The induction score of a head attending uniformly to every earlier position (the chance level).

    Query ``i`` (0-based, of ``[BOS,] r, r``) spreads ``1 / (i + 1)`` on each key, the induction target included.
    """
    offset = 1 if bos else 0
    return sum(1.0 / (i + 1) for i in range(offset + seq_len, offset + 2 * seq_len)) / seq_len


def result_rows(result: ICLScore | Tensor, **identity: Any) -> list[dict[str, Any]]:
    """Rows of the results schema for either metric.

    An :class:`ICLScore` gives one row, ``metric = "icl_score"``, ``domain = "all"``, with extra
    columns ``late, early, contexts, loss_late, loss_early``. A ``[n_layers, n_heads]`` tensor of
    :func:`induction_scores` gives one row per head, ``metric = "induction_score"``,
    ``domain = "repeated_random_tokens"``, extra columns ``layer, head``. ``identity`` fills the model
    columns (``suite, model, size, seed, revision, step, tokens_seen``).
    """
    if isinstance(result, ICLScore):
        return [{**identity, "metric": "icl_score", "domain": "all", "value": result.score, "late": result.late,
                 "early": result.early, "contexts": result.contexts, "loss_late": result.loss_late, "loss_early": result.loss_early}]
    scores = torch.as_tensor(result)
    if scores.ndim != 2:
        raise LmscopeError(f"induction scores of shape {tuple(scores.shape)} are not [n_layers, n_heads]; pass the tensor induction_scores returns.")
    return [
        {**identity, "metric": "induction_score", "domain": INDUCTION_DOMAIN, "value": float(scores[layer, head]),
         "layer": layer, "head": head}
        for layer in range(scores.shape[0]) for head in range(scores.shape[1])
    ]
