"""Did a suite learn? Held-out bits per byte of a model, against a unigram model of the training data.

Both measures score exactly the same tokens — every token of the same held-out documents
(:func:`evaluation_documents`) — and divide by the same bytes, so they compare fairly:

    bits per byte = (Σ −ln p(token)) / ln 2 / (UTF-8 bytes of the evaluated documents)

using the corpus's ``n_bytes`` column for the bytes. The unigram model is fitted on the
token counts of the train split with add-one smoothing, ``p(t) = (c_t + 1) / (N + V)``.

The model sees each document on its own, after one ``<|endoftext|>`` token — the context a
document has in training rows — and in windows of at most ``ctx`` predicted tokens: window
``w`` feeds ``x[w·ctx : w·ctx + ctx]`` of ``x = [EOS] + document`` and scores the next token
at each position. So the first token of a document is predicted from EOS alone, and the
first token of every later window from the one token before it (the window does not carry
context over; this slightly underrates long documents, and never favours the model).

A general bits-per-byte metric by domain comes with the evaluation stage; this module
stays small on purpose.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError


@dataclass(frozen=True)
class BitsPerByte:
    """A bits-per-byte figure and what it was computed over.

    Attributes:
        bits_per_byte: total negative log-likelihood in bits over UTF-8 bytes.
        nats: total negative log-likelihood in nats.
        tokens: tokens scored.
        bytes: UTF-8 bytes of the scored documents.
        documents: documents scored.
    """

    bits_per_byte: float
    nats: float
    tokens: int
    bytes: int
    documents: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluation_documents(corpus: TokenizedCorpus, max_tokens: int, split: str = "heldout") -> np.ndarray:
    """Whole documents of ``split``, taken round-robin over domains (in document order within each) until they hold at least ``max_tokens`` tokens (or all are taken).

    Empty documents are left out. Returns doc indices, ascending.
    """
    if max_tokens < 1:
        raise LmscopeError(f"max_tokens must be at least 1, not {max_tokens}.")
    chosen = corpus.select(split=split)
    lengths = corpus.documents.column("n_tokens").to_numpy()
    domains = np.asarray(corpus.documents.column("domain").to_pylist(), dtype=object)
    chosen = chosen[lengths[chosen] > 0]
    queues = [list(chosen[domains[chosen] == domain]) for domain in sorted(set(domains[chosen].tolist()))]
    picked: list[int] = []
    total = 0
    position = 0
    while total < max_tokens and any(position < len(queue) for queue in queues):
        for queue in queues:
            if position < len(queue) and total < max_tokens:
                picked.append(int(queue[position]))
                total += int(lengths[queue[position]])
        position += 1
    return np.asarray(sorted(picked), dtype=np.int64)


def _bytes_of(corpus: TokenizedCorpus, documents: np.ndarray) -> int:
    return int(corpus.documents.column("n_bytes").to_numpy()[documents].sum())


def unigram_bits_per_byte(corpus: TokenizedCorpus, max_tokens: int = 65536, vocab_size: int | None = None) -> BitsPerByte:
    """Bits per byte of the add-one-smoothed unigram model of the train split, on :func:`evaluation_documents`.

    Args:
        corpus: the tokenized corpus (its train split fits the model, its held-out split is scored).
        max_tokens: held-out tokens to score (whole documents; see :func:`evaluation_documents`).
        vocab_size: ``V`` of the smoothing; default the corpus tokenizer's vocabulary size.
    """
    vocab = int(vocab_size or corpus.manifest.get("tokenizer", {}).get("vocab_size") or int(corpus.tokens.max()) + 1)
    offsets = corpus.documents.column("token_offset").to_numpy()
    lengths = corpus.documents.column("n_tokens").to_numpy()
    counts = np.zeros(vocab, dtype=np.int64)
    for doc in corpus.select(split="train").tolist():
        start = int(offsets[doc])
        counts += np.bincount(corpus.tokens[start : start + int(lengths[doc])], minlength=vocab)[:vocab]
    log_p = np.log(counts + 1.0) - math.log(float(counts.sum()) + vocab)
    documents = evaluation_documents(corpus, max_tokens)
    nats = tokens = 0.0
    for doc in documents.tolist():
        ids = corpus.document_tokens(doc)
        nats -= float(log_p[ids.astype(np.int64)].sum())
        tokens += len(ids)
    n_bytes = _bytes_of(corpus, documents)
    return BitsPerByte(nats / math.log(2) / n_bytes, nats, int(tokens), n_bytes, len(documents))


def _load(model: Any, device: str | torch.device) -> Any:
    if isinstance(model, torch.nn.Module):
        return model
    if isinstance(model, (str, os.PathLike)):
        from lmscope.models.loading import load_model

        return load_model(str(model), device=device).model
    raise LmscopeError(f"model must be a model spec, a directory or a torch module, not {type(model).__name__}.")


@torch.no_grad()
def heldout_bits_per_byte(
    model: Any,
    corpus: TokenizedCorpus,
    max_tokens: int = 65536,
    *,
    ctx: int | None = None,
    batch_size: int = 16,
    eos_token_id: int | None = None,
    device: str | torch.device = "cpu",
) -> BitsPerByte:
    """Bits per byte of a causal LM on :func:`evaluation_documents` of ``corpus``.

    Args:
        model: a loaded ``transformers`` causal LM, or a model spec / directory
            (``SUITE_DIR/SIZE@step384``).
        corpus: the tokenized corpus, tokenized with the model's tokenizer.
        max_tokens: held-out tokens to score (whole documents).
        ctx: predicted tokens per window; default the model's ``max_position_embeddings``.
        batch_size: windows per forward pass.
        eos_token_id: the document separator fed before each document; default the model config's.
        device: where a model given by spec is loaded (a module stays where it is).
    """
    module = _load(model, device)
    config = module.config
    eos = eos_token_id if eos_token_id is not None else config.eos_token_id
    if eos is None:
        raise LmscopeError("the model config names no eos_token_id; pass eos_token_id.")
    ctx = int(ctx or getattr(config, "max_position_embeddings", 256))
    run_device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    documents = evaluation_documents(corpus, max_tokens)
    windows: list[np.ndarray] = []
    for doc in documents.tolist():
        x = np.concatenate([[eos], corpus.document_tokens(doc).astype(np.int64)])
        windows += [x[start : start + ctx + 1] for start in range(0, len(x) - 1, ctx)]
    nats = 0.0
    tokens = 0
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        width = max(len(w) for w in group) - 1
        inputs = torch.full((len(group), width), int(eos), dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)
        for i, window in enumerate(group):
            inputs[i, : len(window) - 1] = torch.from_numpy(window[:-1])
            targets[i, : len(window) - 1] = torch.from_numpy(window[1:])
        logits = module(input_ids=inputs.to(run_device), use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.to(run_device).reshape(-1), ignore_index=-100, reduction="sum"
        )
        nats += float(loss)
        tokens += int((targets != -100).sum())
    module.train(was_training)
    n_bytes = _bytes_of(corpus, documents)
    return BitsPerByte(nats / math.log(2) / n_bytes, nats, tokens, n_bytes, len(documents))
