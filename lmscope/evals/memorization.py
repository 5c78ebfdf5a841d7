r"""Memorization of training sequences across checkpoints, after Biderman et al. (2023), "Emergent and Predictable Memorization".

**Score.** A *trained sequence* is ``P + C`` consecutive tokens of a row the run trained on:
a prefix :math:`x_1 … x_P` and its true continuation :math:`y_1 … y_C` (Pythia: ``P = C = 32``,
taken from the start of each 2049-token row). The model decodes ``C`` tokens greedily from the
raw prefix (no BOS or anything else put before it),
:math:`\hat y_j = \arg\max_v p(v \mid x_1 … x_P, \hat y_1 … \hat y_{j-1})`, and

.. math::  \mathrm{memorization} = \frac{1}{C}\sum_{j=1}^{C} [\hat y_j = y_j] \in [0, 1]

(position by position: one early miss does not zero the rest). The sequence is
*k-extractable* (``k = P``) when the score is 1. Ties in the argmax go to the lowest token id,
as in ``transformers``' greedy search. Pythia's script called ``generate(min_length=64)``,
which also bars the EOS token from the continuation; ``suppress_tokens=[eos]`` reproduces that,
and by default nothing is barred.

**Sampling.** Sequences come from data-order replay (:mod:`lmscope.suites.replay`), so each one
records ``step``, the step whose batch trained it (step ``N`` = rows ``[B·N, B·N + B)``). ``n``
sequences are stratified over the steps ``s_0 < … < s_{m-1}`` asked for (default all,
``0 … num_steps - 1``): sequence ``i`` comes from step ``s_{⌊i·m/n⌋}``, so when ``n ≤ m`` the steps
are evenly spaced from the first, and when ``n > m`` every step gets ``⌊n/m⌋`` or ``⌈n/m⌉``.
Within a step the rows are drawn uniformly without replacement by a generator seeded with
``(seed, step)``, so the draw at one step depends on nothing else. Only the drawn rows are read.

**Seen and unseen.** Checkpoint ``stepS`` was trained on steps ``< S``. Sequences with
``step ≥ S`` have not been seen by that checkpoint yet: their scores are a built-in control,
the memorization that comes from predicting text well rather than from having trained on it.
The summary rows (:func:`result_rows`) average over the seen sequences only; the per-sequence
rows carry ``seen`` so that the control can be read beside them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress

PREFIX_LEN = 32
CONTINUATION_LEN = 32


@dataclass(frozen=True, eq=False)
class TrainedSequence:
    """``prefix_len + continuation_len`` tokens of one training row, and when it was trained.

    Attributes:
        step: the step whose batch holds the row (checkpoint ``step{step + 1}`` is the first to have seen it).
        row: the row's index in the source's data (:attr:`lmscope.suites.replay.StepBatch.rows`).
        offset: where the sequence starts in the row (Pythia: 0).
        tokens: int64 ``[prefix_len + continuation_len]``, row tokens ``offset …``.
        domain: domain of the document segment covering token ``offset``, when the source knows it.
        doc_id: id of that document, when the source knows it.
    """

    step: int
    row: int
    offset: int
    tokens: np.ndarray
    domain: str | None = None
    doc_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "row": self.row, "offset": self.offset, "tokens": self.tokens.tolist(),
                "domain": self.domain, "doc_id": self.doc_id}


@dataclass(frozen=True, eq=False)
class MemorizationResult:
    """Greedy continuation of one trained sequence and its memorization score.

    Attributes:
        step, row, offset, domain, doc_id: those of the :class:`TrainedSequence`.
        generated: int64 ``[continuation_len]``, the greedy continuation of the prefix.
        matches: positions where ``generated`` equals the true continuation.
        continuation_len: ``C``.
        score: ``matches / continuation_len``, in ``[0, 1]``.
    """

    step: int
    row: int
    offset: int
    domain: str | None
    doc_id: str | None
    generated: np.ndarray
    matches: int
    continuation_len: int
    score: float

    @property
    def extractable(self) -> bool:
        """k-extractable: every continuation token was reproduced (score 1)."""
        return self.matches == self.continuation_len

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "row": self.row, "offset": self.offset, "domain": self.domain, "doc_id": self.doc_id,
                "generated": self.generated.tolist(), "matches": self.matches, "continuation_len": self.continuation_len,
                "score": self.score, "extractable": self.extractable}


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LmscopeError(f"{name}={value!r} must be an integer of at least {minimum}.")
    return int(value)


def _stratified_steps(steps: Sequence[int], n_sequences: int) -> dict[int, int]:
    """How many sequences each step gets: sequence ``i`` goes to ``steps[i·m // n]``."""
    counts: dict[int, int] = {}
    for i in range(n_sequences):
        step = steps[i * len(steps) // n_sequences]
        counts[step] = counts.get(step, 0) + 1
    return counts


def _draw_rows(seed: int, step: int, count: int, rows_in_step: int) -> list[int]:
    """``count`` distinct rows of ``range(rows_in_step)``, uniform, from a generator seeded with ``(seed, step)``."""
    rng = np.random.default_rng([seed, step])
    chosen: list[int] = []
    taken: set[int] = set()
    while len(chosen) < count:
        row = int(rng.integers(rows_in_step))
        if row not in taken:
            taken.add(row)
            chosen.append(row)
    return sorted(chosen)


def sample_trained_sequences(
    source: Any,
    n_sequences: int = 512,
    *,
    seed: int = 0,
    prefix_len: int = PREFIX_LEN,
    continuation_len: int = CONTINUATION_LEN,
    offset: int = 0,
    steps: Iterable[int] | None = None,
) -> list[TrainedSequence]:
    """Trained sequences stratified over the training steps (the module docstring gives the scheme).

    Args:
        source: a :class:`lmscope.suites.replay.ReplaySource`, or a path :func:`~lmscope.suites.replay.open_source` accepts.
        n_sequences: how many; at most the rows in the steps sampled from.
        seed: seed of the row drawn within each step (a non-negative integer).
        prefix_len, continuation_len: ``P`` and ``C``; each sequence is ``P + C`` tokens.
        offset: where in the row each sequence starts (Pythia: 0, the row's start).
        steps: sample from these steps only (e.g. ``range(0, 256)``); default every step.

    Returns the sequences by step, then by place in the step's batch. Deterministic in its
    arguments; reads only the chosen rows. The default of 512 is one row per step of the default
    mini suite (512 steps); the same sequences serve every checkpoint and size of a suite.
    """
    from lmscope.suites.replay import ReplaySource, open_source

    if not isinstance(source, ReplaySource):
        if not isinstance(source, (str, os.PathLike)):
            raise LmscopeError(f"source {source!r} is not a replay source; pass a ReplaySource or a path that open_source accepts.")
        source = open_source(source)
    n_sequences = _positive("n_sequences", n_sequences)
    prefix_len = _positive("prefix_len", prefix_len)
    continuation_len = _positive("continuation_len", continuation_len)
    offset = _positive("offset", offset, minimum=0)
    seed = _positive("seed", seed, minimum=0)
    length = offset + prefix_len + continuation_len
    if length > source.row_length:
        raise LmscopeError(
            f"rows of {source.describe()} hold {source.row_length} tokens, fewer than offset + prefix_len + continuation_len "
            f"= {offset} + {prefix_len} + {continuation_len} = {length}; pass shorter lengths or a smaller offset."
        )
    if steps is None:
        if source.num_steps == 0:
            source.check_step(0)  # raises: the source holds no complete step
        chosen = list(range(source.num_steps))
    else:
        chosen = sorted({source.check_step(step) for step in steps})
        if not chosen:
            raise LmscopeError(f"steps is empty; give at least one step from 0 to {source.num_steps - 1}, or None for all.")
    available = len(chosen) * min(source.rows_in_step(step) for step in chosen)  # every step gets ⌈n/m⌉ at most
    if n_sequences > available:
        raise LmscopeError(
            f"n_sequences={n_sequences} is more than the {available} rows of the {len(chosen)} step(s) sampled from; "
            f"pass at most {available}."
        )

    sequences: list[TrainedSequence] = []
    for step, count in sorted(_stratified_steps(chosen, n_sequences).items()):
        for index in _draw_rows(seed, step, count, source.rows_in_step(step)):
            batch = source.step(step, rows=slice(index, index + 1))
            tokens = np.asarray(batch.tokens[0, offset : offset + prefix_len + continuation_len], dtype=np.int64)
            pieces = batch.segments[0] if batch.segments else []
            piece = next((p for p in pieces if p.row_offset <= offset < p.row_offset + p.length), None)
            sequences.append(TrainedSequence(
                step=step, row=int(batch.rows[0]), offset=offset, tokens=tokens,
                domain=piece.domain if piece is not None else None, doc_id=piece.doc_id if piece is not None else None,
            ))
    return sequences


def _unwrap(model: Any) -> Any:
    return getattr(model, "model", model) if hasattr(model, "hook_point") else model


def _cache_argument(output: Any) -> dict[str, Any]:
    """The key/value cache of a forward pass, as the keyword that feeds it back (``cache``; ``past_key_values`` before its rename)."""
    for name in ("cache", "past_key_values"):
        if name in output.keys():
            return {name: output[name]}
    raise LmscopeError(f"the model returned no key/value cache ({type(output).__name__}); score a transformers causal LM that supports use_cache=True.")


@torch.no_grad()
def greedy_continuations(
    model: Any, prefixes: Tensor, n_tokens: int, *, batch_size: int = 16, suppress_tokens: Collection[int] = (),
    progress: Progress = no_progress,
) -> Tensor:
    """Greedy decoding of ``n_tokens`` tokens after each prefix: ``[n, P]`` int64 -> ``[n, n_tokens]`` int64 (on the CPU).

    All prefixes have the same length, so no padding or attention mask is needed; one forward
    pass over the prefixes fills the key/value cache, then one token is fed per step. Each row's
    result does not depend on the others in its batch (beyond float rounding of near-ties), and
    the model is put in eval mode for the call (and back after). ``suppress_tokens`` are never
    generated (their logits are set to ``-inf``).
    """
    if prefixes.ndim != 2 or prefixes.shape[1] < 1:
        raise LmscopeError(f"prefixes of shape {tuple(prefixes.shape)} are not [n, P] with P >= 1; stack equal-length prefixes.")
    n_tokens, batch_size = _positive("n_tokens", n_tokens), _positive("batch_size", batch_size)
    hf = _unwrap(model)
    device = next(hf.parameters()).device
    banned = torch.tensor(sorted({int(t) for t in suppress_tokens}), dtype=torch.long, device=device)
    out = torch.empty((prefixes.shape[0], n_tokens), dtype=torch.long)
    # Only the last position's logits are needed (as in transformers' own generate): saves [batch, P, vocab] floats.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    was_training = hf.training
    hf.eval()
    try:
        progress("greedy decoding", 0, int(prefixes.shape[0]))
        for start in range(0, prefixes.shape[0], batch_size):
            step_input = prefixes[start : start + batch_size].to(device=device, dtype=torch.long)
            count = int(step_input.shape[0])
            cache: dict[str, Any] = {}
            generated = []
            for position in range(n_tokens):
                output = hf(input_ids=step_input, use_cache=True, **cache, **last_only)
                logits = output.logits[:, -1].float()
                if len(banned):
                    logits[:, banned] = -float("inf")
                token = logits.argmax(dim=-1)
                generated.append(token)
                if position + 1 < n_tokens:
                    cache, step_input = _cache_argument(output), token[:, None]
            out[start : start + count] = torch.stack(generated, dim=1).cpu()
            progress("greedy decoding", count, int(prefixes.shape[0]))
    finally:
        hf.train(was_training)
    return out


def memorization_scores(
    model: Any,
    sequences: Sequence[TrainedSequence],
    *,
    prefix_len: int = PREFIX_LEN,
    batch_size: int = 16,
    suppress_tokens: Collection[int] = (),
    progress: Progress = no_progress,
) -> list[MemorizationResult]:
    """Memorization score of ``model`` on each sequence, in the order given.

    Args:
        model: a ``transformers`` causal LM (or a :class:`lmscope.models.hooks.HookedModel`).
        sequences: from :func:`sample_trained_sequences`, all of the same length ``P + C``.
        prefix_len: ``P``; the remaining ``C`` tokens are the true continuation.
        batch_size: prefixes decoded together; results do not depend on it.
        suppress_tokens: token ids never generated (Pythia's script: its EOS, see the module docstring).
    """
    if len(sequences) == 0:
        raise LmscopeError("no sequences to score; pass the list sample_trained_sequences returns.")
    batch_size = _positive("batch_size", batch_size)
    lengths = sorted({int(np.asarray(s.tokens).shape[0]) for s in sequences})
    if len(lengths) > 1:
        raise LmscopeError(f"the sequences have different lengths ({', '.join(map(str, lengths))} tokens); sample them with one prefix_len and continuation_len.")
    length = lengths[0]
    if not isinstance(prefix_len, (int, np.integer)) or isinstance(prefix_len, bool) or not 1 <= prefix_len < length:
        raise LmscopeError(f"prefix_len={prefix_len!r} leaves no prefix or no continuation of the {length}-token sequences; pass 1 to {length - 1}.")
    continuation_len = length - int(prefix_len)
    hf = _unwrap(model)
    limit = int(getattr(hf.config, "max_position_embeddings", 0) or 0)
    if limit and length - 1 > limit:
        raise LmscopeError(
            f"decoding {continuation_len} tokens after a {prefix_len}-token prefix feeds {length - 1} positions, but the model "
            f"takes at most {limit}; sample shorter sequences."
        )
    tokens = torch.from_numpy(np.stack([np.asarray(s.tokens, dtype=np.int64) for s in sequences]))
    vocab = int(hf.config.vocab_size)
    if tokens.min().item() < 0 or tokens.max().item() >= vocab:
        bad = next(s for s in sequences if np.asarray(s.tokens).min() < 0 or np.asarray(s.tokens).max() >= vocab)
        raise LmscopeError(
            f"the sequence at step {bad.step}, row {bad.row} holds token ids outside the model's vocabulary of {vocab}; "
            "score a model trained on this data (its tokenizer)."
        )
    generated = greedy_continuations(hf, tokens[:, :prefix_len], continuation_len, batch_size=batch_size,
                                     suppress_tokens=suppress_tokens, progress=progress)
    matches = (generated == tokens[:, prefix_len:]).sum(dim=1).tolist()
    rows = generated.numpy()
    return [
        MemorizationResult(step=s.step, row=s.row, offset=s.offset, domain=s.domain, doc_id=s.doc_id,
                           generated=rows[i].copy(), matches=int(matches[i]), continuation_len=continuation_len,
                           score=matches[i] / continuation_len)
        for i, s in enumerate(sequences)
    ]


def result_rows(results: Sequence[MemorizationResult], **identity: Any) -> list[dict[str, Any]]:
    """Rows of the results schema: one per sequence, then two summary rows.

    Per sequence: ``metric = "memorization_score"``, ``domain`` = the sequence's domain (``"all"``
    when unknown), ``value`` = its score, extra columns ``step_seen`` (the step that trained it),
    ``row``, ``extractable`` and ``seen`` (``step_seen < step`` of the checkpoint; null when
    ``identity`` has no step).

    Summary, on ``domain = "all"``: ``memorization_mean`` (mean score) and
    ``k_extractable_fraction`` (fraction with score 1) over the sequences this checkpoint has
    seen (all of them when ``identity`` has no step), with extra columns ``sequences`` (how many)
    and ``seen`` (true; null when over all). A checkpoint that has seen none of them (``step0``)
    gets no summary rows: a mean of nothing is not a number to plot.
    ``identity`` fills the model columns (``suite, model, size, seed, revision, step, tokens_seen``).
    """
    checkpoint = identity.get("step")
    rows: list[dict[str, Any]] = []
    for r in results:
        seen = None if checkpoint is None else bool(r.step < checkpoint)
        rows.append({**identity, "metric": "memorization_score", "domain": r.domain if r.domain is not None else "all",
                     "value": float(r.score), "step_seen": int(r.step), "row": int(r.row), "seen": seen,
                     "extractable": bool(r.extractable)})
    counted = [r for r in results if checkpoint is None or r.step < checkpoint]
    if counted:
        summary = {"memorization_mean": float(np.mean([r.score for r in counted])),
                   "k_extractable_fraction": sum(r.extractable for r in counted) / len(counted)}
        for metric, value in summary.items():
            rows.append({**identity, "metric": metric, "domain": "all", "value": value, "sequences": len(counted),
                         "seen": None if checkpoint is None else True})
    return rows
