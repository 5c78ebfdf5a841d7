r"""Activations streamed straight from a model through a mixing buffer: SAE training without an activation store.

**Rows.** The contexts are exactly those :func:`lmscope.activations.job.capture_corpus_activations`
would store for the same corpus and settings: documents of ``split``/``domain`` taken round-robin
across domains (:func:`~lmscope.activations.job.round_robin_by_domain`), cut by
:func:`~lmscope.activations.contexts.iter_contexts` (one document per context, ``ctx`` tokens, BOS
when ``bos_token_id`` is set, short windows right-padded) up to ``n_tokens`` valid positions per
pass. Every ``context_batch`` contexts go through one forward pass,
``HookedModel.run_with_cache(ids, names=hooks, need_logits=False)``, which captures every requested
hook at once and stops after the deepest one. A row is one valid position (a BOS row included,
padding never), flattened to ``[d]`` float32 — the rows a float32 store would hold. When a pass is
over the next one starts from the first context again (``passes=None``, for training), or the
stream ends (``passes=k``).

**Mixing buffer** (as SAELens's): the buffer holds ``B = buffer_rows`` rows of every hook. It is
filled (a forward batch that does not fit waits for the next fill), permuted by one permutation
shared by all hooks — so row ``n`` of every hook is the same token, and a transcoder's input and
target stay paired — and its first ``E = ⌊B / 2 / N⌋ · N`` rows are yielded as ``E / N`` batches of
``N = batch_size`` rows; the other ``B − E`` stay to be mixed with the next fill. A finite stream
ends by permuting what is left and yielding all of it (the last batch may be short). The
permutations are drawn from ``numpy.random.default_rng(seed)``, so the stream is a pure function of
``(model, corpus, settings, seed)``; on CPU it is bitwise reproducible.

**Mixing quality.** Rows of one context (``L`` valid positions) are strongly correlated. A batch
is a uniform draw from the ``B`` rows in the buffer, so it holds about ``N·L/B`` rows of any one
buffered context, against ``N·L/R`` for a store of ``R`` rows shuffled globally; consecutive
batches of one refill share their contexts, and a row leaves after a geometric number of refills
(mean 2, since half the buffer goes out each time). A larger buffer mixes better but costs memory
(``B × Σ_h d_h × 4`` bytes on the training device, about twice that during a refill) and delays the
first step by ``B`` rows of forward passes. The default, ``B = 16 N``, gives ``L/16`` rows of a
context per batch (8 for ``L = 128``). ``B`` must hold at least two batches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmscope.activations.contexts import Context, iter_contexts
from lmscope.activations.job import CONTEXT_POLICY, corpus_identity, round_robin_by_domain
from lmscope.errors import LmscopeError

STREAM_POLICY = "model-stream/mixing-buffer/v1"
"""Name of the stream's row order (contexts, batching, buffer, permutations); bump when it changes."""
DEFAULT_BUFFER_BATCHES = 16
"""``buffer_rows`` when unset: this many batches."""


@dataclass(frozen=True)
class StreamConfig:
    """Where streamed activations come from and how they are mixed; part of a streamed run's identity."""

    ctx: int = 128
    """Tokens per context (BOS and padding included); at most the model's positions."""
    buffer_rows: int | None = None
    """Rows held by the mixing buffer (per hook); at least two batches. ``None``: 16 batches."""
    n_tokens: int | None = None
    """Valid positions read per pass over the corpus (the capture's token budget). ``None``: the whole split."""
    split: str | None = "train"
    """Corpus split to read (``None``: every document)."""
    domain: str | None = None
    """Corpus domain to read (``None``: every domain, taken round-robin)."""
    context_batch: int = 8
    """Contexts per forward pass (the capture's ``batch_size``)."""
    bos_token_id: int | None = None
    """Token opening every context, or ``None`` for no BOS (the BOS row is a training row, as in a store)."""
    pad_token_id: int | None = None
    """Token padding short windows (never a row). ``None``: the BOS id, else 0."""
    min_tokens: int = 1
    """Shortest document window worth a context."""

    def __post_init__(self) -> None:
        if self.ctx < 1 + (self.bos_token_id is not None):
            raise LmscopeError(f"ctx={self.ctx} is too short; a context needs at least {1 + (self.bos_token_id is not None)} tokens.")
        if self.buffer_rows is not None and self.buffer_rows < 2:
            raise LmscopeError(f"buffer_rows={self.buffer_rows} must be at least two batches (or unset for 16 batches).")
        if self.n_tokens is not None and self.n_tokens < 1:
            raise LmscopeError(f"n_tokens={self.n_tokens} must be at least 1 (or unset for the whole split).")
        if self.context_batch < 1:
            raise LmscopeError(f"context_batch={self.context_batch} must be at least 1.")
        if self.min_tokens < 1:
            raise LmscopeError(f"min_tokens={self.min_tokens} must be at least 1.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ActivationStream:
    """Training batches of several hooks from one forward pass per ``context_batch`` contexts (module docstring).

    Iterating yields ``{hook: Tensor[batch_size, d_hook]}`` (float32, on ``device``), rows aligned
    across hooks; each iteration starts the stream afresh and yields the same batches.

    Args:
        hooked: a :class:`~lmscope.models.hooks.HookedModel` (``run_with_cache``, ``hook_point``, ``device``).
        corpus: a :class:`~lmscope.data.tokenized.TokenizedCorpus` (``iter_documents``).
        hooks: per-token hooks to capture (attention patterns are refused).
        config: contexts and buffer (:class:`StreamConfig`).
        batch_size: rows per yielded batch.
        seed: seeds the buffer's permutations.
        passes: passes over the corpus before the stream ends; ``None``: endless (training).
        device: where the buffer and the batches live (``None``: the model's device).
    """

    def __init__(self, hooked: Any, corpus: Any, hooks: Sequence[str], config: StreamConfig, *, batch_size: int,
                 seed: int = 0, passes: int | None = None, device: str | torch.device | None = None) -> None:
        if isinstance(hooks, str):
            hooks = [hooks]
        self.hooks = list(hooks)
        if not self.hooks:
            raise LmscopeError("no hooks were given to stream; name at least one hook point, e.g. blocks.0.hook_resid_post.")
        if len(set(self.hooks)) != len(self.hooks):
            raise LmscopeError(f"hooks {self.hooks} name the same hook twice; list each hook once.")
        for hook in self.hooks:
            if hook.endswith("hook_pattern"):
                raise LmscopeError(f"hook {hook!r} is an attention pattern, not per-token activations; stream a per-token hook.")
            hooked.hook_point(hook)  # an unknown name raises with the valid ones
        if batch_size < 1:
            raise LmscopeError(f"batch_size={batch_size} must be at least 1.")
        if seed < 0:
            raise LmscopeError(f"seed={seed} must be a non-negative integer.")
        if passes is not None and passes < 1:
            raise LmscopeError(f"passes={passes} must be at least 1 (or None for an endless stream).")
        buffer_rows = config.buffer_rows if config.buffer_rows is not None else DEFAULT_BUFFER_BATCHES * batch_size
        if buffer_rows < 2 * batch_size:
            raise LmscopeError(f"buffer_rows={buffer_rows} is less than two batches of {batch_size}; the mixing buffer "
                               f"yields half its rows per refill, so give it at least {2 * batch_size} rows.")
        limit = int(getattr(hooked.config, "max_position_embeddings", 0) or 0)
        if limit and config.ctx > limit:
            raise LmscopeError(f"ctx={config.ctx} is longer than the model's {limit} positions; pass a smaller ctx.")
        self.hooked, self.corpus, self.config = hooked, corpus, config
        self.batch_size, self.seed, self.passes, self.buffer_rows = batch_size, seed, passes, buffer_rows
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else (config.bos_token_id or 0)
        self.device = torch.device(device) if device is not None else hooked.device

    @property
    def identity(self) -> dict[str, Any]:
        """Everything that determines each hook's batches (not the set of hooks: it changes no hook's rows)."""
        parameter = next(self.hooked.model.parameters())
        return {
            "policy": STREAM_POLICY, "context_policy": CONTEXT_POLICY,
            "model": {"spec": self.hooked.spec, "source": self.hooked.source, "dtype": str(parameter.dtype).removeprefix("torch.")},
            "corpus": corpus_identity(self.corpus),
            **self.config.to_dict(), "buffer_rows": self.buffer_rows, "pad_token_id": self.pad_token_id,
            "batch_size": self.batch_size, "seed": self.seed,
        }

    def widths(self) -> dict[str, int]:
        """Values per row of each hook, from one forward pass over a single context of padding."""
        tokens = np.full(self.config.ctx, self.pad_token_id, dtype=np.int64)
        return {hook: rows.shape[1] for hook, rows in self._run([_padding_context(tokens)]).items()}

    def contexts(self) -> Iterator[Context]:
        """One pass of contexts, as :func:`~lmscope.activations.job.capture_corpus_activations` cuts them."""
        config = self.config
        documents = ((int(index), tokens) for index, _, _, tokens in
                     round_robin_by_domain(self.corpus.iter_documents(split=config.split, domain=config.domain)))
        budget = config.n_tokens if config.n_tokens is not None else sys.maxsize
        return iter_contexts(documents, config.ctx, budget, bos_token_id=config.bos_token_id, pad_token_id=self.pad_token_id,
                             min_tokens=config.min_tokens)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rng = np.random.default_rng(self.seed)
        size, batch = self.buffer_rows, self.batch_size
        n_emit = size // 2 // batch * batch
        source = self._forward_rows()
        kept: dict[str, Tensor] | None = None
        carry: dict[str, Tensor] | None = None
        while True:
            parts = [kept] if kept is not None else []
            n = _n_rows(kept)
            exhausted = False
            while n < size:
                if carry is not None:
                    chunk, carry = carry, None
                else:
                    chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    break
                take = min(_n_rows(chunk), size - n)
                parts.append({hook: rows[:take] for hook, rows in chunk.items()})
                if take < _n_rows(chunk):
                    carry = {hook: rows[take:] for hook, rows in chunk.items()}
                n += take
            if n == 0:
                return
            perm = torch.from_numpy(rng.permutation(n)).to(self.device)
            buffer = {hook: torch.cat([part[hook] for part in parts])[perm] for hook in self.hooks}
            n_out = n if exhausted else n_emit
            for start in range(0, n_out, batch):
                yield {hook: rows[start : start + batch] for hook, rows in buffer.items()}
            if exhausted:
                return
            kept = {hook: rows[n_out:] for hook, rows in buffer.items()}

    # -- forward passes ----------------------------------------------------------------------------

    def _forward_rows(self) -> Iterator[dict[str, Tensor]]:
        """The valid rows of each forward batch, in context order; pass after pass."""
        done = 0
        while self.passes is None or done < self.passes:
            contexts = self.contexts()
            rows = 0
            while batch := list(islice(contexts, self.config.context_batch)):
                out = self._run(batch)
                rows += _n_rows(out)
                yield out
            if rows == 0:
                raise LmscopeError(f"the corpus yields no tokens for split {self.config.split!r} and domain {self.config.domain!r}; "
                                   "check the split, the domain and the token budget.")
            done += 1

    @torch.no_grad()
    def _run(self, batch: list[Context]) -> dict[str, Tensor]:
        ids = torch.from_numpy(np.stack([c.tokens for c in batch]).astype(np.int64, copy=False))
        valid = torch.from_numpy(np.stack([np.arange(len(c)) < c.n_valid for c in batch]))
        cache = self.hooked.run_with_cache(ids.to(self.hooked.device), names=self.hooks, need_logits=False)[1]
        out = {}
        for hook in self.hooks:
            tensor = cache[hook]
            if tensor.ndim < 3 or tuple(tensor.shape[:2]) != tuple(ids.shape):
                raise LmscopeError(f"hook {hook!r} gave a tensor of shape {tuple(tensor.shape)} for input {tuple(ids.shape)}; "
                                   "an SAE reads per-token activations shaped [batch, pos, ...].")
            rows = tensor.to(torch.float32)[valid.to(tensor.device)]
            out[hook] = rows.reshape(rows.shape[0], -1).to(self.device)
        return out


def _padding_context(tokens: np.ndarray) -> Context:
    n = tokens.shape[0]
    return Context(tokens=tokens, doc_index=np.zeros(n, dtype=np.int64), position=np.arange(n, dtype=np.int32), n_valid=n)


def _n_rows(rows: dict[str, Tensor] | None) -> int:
    return 0 if rows is None else int(next(iter(rows.values())).shape[0])
