"""Cut documents into fixed-length model contexts, deterministically.

The policy (one context never mixes two documents):

1. Documents are consumed in the order given. With ``bos_token_id`` set, every
   context starts with that token and holds ``B = ctx_len - 1`` document tokens;
   without it, ``B = ctx_len``.
2. Each document is cut into consecutive, non-overlapping windows of ``B`` tokens
   starting at its first token: window ``w`` holds positions ``[w*B, (w+1)*B)``.
3. A window shorter than ``B`` (a document's tail, or a whole document shorter
   than ``B``) is kept when it has at least ``min_tokens`` tokens and skipped
   otherwise. A kept short window is right-padded with ``pad_token_id`` up to
   ``ctx_len``. For a causal LM, right padding cannot change the activations at
   the real positions (no position attends to a later one), so no attention mask
   is needed; padded positions are marked invalid and never stored.
4. The budget ``n_tokens`` counts valid positions (BOS included): the stream
   stops once ``n_tokens`` have been produced, truncating the last context (its
   cut-off positions become padding), so a store holds exactly ``n_tokens`` rows
   unless the documents run out first.

Every position carries ``(doc_index, position)``: the document and the offset of
the token inside it; a BOS has ``position == -1`` and the ``doc_index`` of the
window it opens; padding has ``doc_index == position == -1``. Valid positions
always form a prefix of the context, ``[0, n_valid)``.

Padding keeps each activation a function of its own document only, at the price
of compute spent on padding when documents are much shorter than ``ctx_len``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from lmscope.errors import LmscopeError


@dataclass(frozen=True)
class Context:
    """One model input of ``ctx_len`` tokens with the origin of every position.

    Attributes:
        tokens: int64 ``[ctx_len]`` token ids fed to the model (padding included).
        doc_index: int64 ``[ctx_len]`` document of each position; -1 for padding.
        position: int32 ``[ctx_len]`` offset of each token in its document; -1 for BOS and padding.
        n_valid: number of real positions (BOS included); they are ``[0, n_valid)``.
    """

    tokens: np.ndarray
    doc_index: np.ndarray
    position: np.ndarray
    n_valid: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def update_hash(self, digest: "hashlib._Hash") -> None:
        """Feed everything that identifies this context (tokens, origins, length) into ``digest``."""
        digest.update(np.int64(self.n_valid).tobytes())
        digest.update(np.ascontiguousarray(self.tokens, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.doc_index, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.position, dtype=np.int32).tobytes())


def iter_contexts(
    documents: Iterable[tuple[int, ArrayLike]],
    ctx_len: int,
    n_tokens: int,
    *,
    bos_token_id: int | None = None,
    pad_token_id: int = 0,
    min_tokens: int = 1,
) -> Iterator[Context]:
    """Yield :class:`Context` objects cut from ``documents`` by the policy in the module docstring.

    Args:
        documents: ``(doc_index, tokens)`` pairs, in a fixed order; ``tokens`` is a 1-D
            integer array (a memmap slice is fine, it is copied window by window).
        ctx_len: tokens per context, ``L`` (BOS and padding included).
        n_tokens: budget of valid positions (BOS included); the last context is truncated to fit.
        bos_token_id: token that opens every context, or ``None`` for no BOS.
        pad_token_id: token used to right-pad short windows (any id in the vocabulary).
        min_tokens: shortest window of document tokens worth a context; shorter ones are skipped.
    """
    has_bos = bos_token_id is not None
    if ctx_len < 1 + has_bos:
        raise LmscopeError(f"context length {ctx_len} is too short; use at least {1 + has_bos} (BOS takes one position).")
    if n_tokens < 1:
        raise LmscopeError(f"token budget {n_tokens} must be at least 1.")
    body = ctx_len - has_bos
    if not 1 <= min_tokens <= body:
        raise LmscopeError(f"min_tokens={min_tokens} must be between 1 and the {body} document tokens a context holds.")

    remaining = n_tokens
    for doc_index, doc_tokens in documents:
        doc_index = int(doc_index)
        if doc_index < 0:
            raise LmscopeError(f"document index {doc_index} is negative; document indices must be >= 0.")
        tokens = np.asarray(doc_tokens)
        if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
            raise LmscopeError(
                f"document {doc_index} has tokens of shape {tokens.shape} and dtype {tokens.dtype}; "
                "pass a 1-D integer array of token ids."
            )
        for start in range(0, tokens.shape[0], body):
            window = tokens[start : start + body]
            if window.shape[0] < min_tokens:
                continue
            context = _make_context(window, doc_index, start, ctx_len, bos_token_id, pad_token_id, remaining)
            yield context
            remaining -= context.n_valid
            if remaining == 0:
                return


def _make_context(
    window: np.ndarray,
    doc_index: int,
    start: int,
    ctx_len: int,
    bos_token_id: int | None,
    pad_token_id: int,
    budget: int,
) -> Context:
    tokens = np.full(ctx_len, pad_token_id, dtype=np.int64)
    doc = np.full(ctx_len, -1, dtype=np.int64)
    position = np.full(ctx_len, -1, dtype=np.int32)
    offset = 0
    if bos_token_id is not None:
        tokens[0] = bos_token_id
        doc[0] = doc_index
        offset = 1
    n_body = min(window.shape[0], budget - offset)
    if n_body > 0:
        tokens[offset : offset + n_body] = window[:n_body]
        doc[offset : offset + n_body] = doc_index
        position[offset : offset + n_body] = np.arange(start, start + n_body, dtype=np.int32)
    n_valid = min(offset + window.shape[0], budget)
    return Context(tokens=tokens, doc_index=doc, position=position, n_valid=n_valid)
