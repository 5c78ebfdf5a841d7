"""Glue: capture a model's activations over a tokenized corpus into an activation store.

Duck-typed on purpose: ``hooked_model`` needs ``run_with_cache(ids, names=..., need_logits=False)``
returning ``(logits, {hook: Tensor[batch, pos, ...]})``; ``corpus`` needs
``iter_documents(split=..., domain=...)`` yielding ``(doc_index, id, domain, tokens)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscope.activations.contexts import iter_contexts
from lmscope.activations.store import write_activations
from lmscope.fsio import sha256_file
from lmscope.progress import Progress, no_progress

CONTEXT_POLICY = "document-windows-right-padded/domain-round-robin/v2"
"""Name of the context policy of :func:`lmscope.activations.contexts.iter_contexts`; bump when it changes."""


def round_robin_by_domain(items: Iterable[tuple[int, str, str, Any]]) -> Iterator[tuple[int, str, str, Any]]:
    """Reorder ``(doc_index, id, domain, tokens)`` items: first document of each domain, then the second, …

    Domains take turns in order of first appearance; within a domain the input order is kept.
    Deterministic. Holds the items (token arrays are memmap views, so this is cheap) until yielded.
    """
    by_domain: dict[str, list[tuple[int, str, str, Any]]] = {}
    for item in items:
        by_domain.setdefault(item[2], []).append(item)
    queues = list(by_domain.values())
    for rank in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if rank < len(queue):
                yield queue[rank]


def capture_corpus_activations(
    hooked_model: Any,
    corpus: Any,
    hooks: Sequence[str],
    n_tokens: int,
    ctx: int,
    out_dir: str | os.PathLike[str],
    *,
    split: str | None = "heldout",
    domain: str | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    shard_tokens: int = 16384,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    min_tokens: int = 1,
    overwrite: bool = False,
    meta: Mapping[str, Any] | None = None,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Capture ``hooks`` over the first ``n_tokens`` positions of ``corpus`` into the store ``out_dir``.

    Contexts follow :func:`~lmscope.activations.contexts.iter_contexts` (one document per
    context, ``ctx`` tokens, BOS if ``bos_token_id`` is given, short windows right-padded with
    ``pad_token_id``, default the BOS id or 0). Rerunning with the same arguments resumes.

    Args:
        hooks: hook names to store; ``n_tokens``: rows to store (BOS included); ``ctx``: context length.
        split, domain: which documents of the corpus to read (``None``: all). Documents are taken
            round-robin across domains (see :func:`round_robin_by_domain`), so that a token budget
            smaller than the corpus still samples every domain.
        dtype: storage dtype of the activations; the model runs in whatever dtype it was loaded in.
        shard_tokens: rows per shard (at least; shards end on batch boundaries). Shards are held in
            memory while filled: ``shard_tokens * d * bytes`` per hook.
        meta: the caller's identification of the model (spec, revision, dtype, device-independent
            settings); it is merged with the corpus and context settings into the store's meta,
            so a rerun with a different model is refused instead of mixing activations.

    Returns the store manifest (see :func:`lmscope.activations.store.write_activations`).
    """
    documents: dict[int, dict[str, str]] = {}

    def corpus_documents() -> Iterator[tuple[int, np.ndarray]]:
        for doc_index, doc_id, doc_domain, tokens in round_robin_by_domain(corpus.iter_documents(split=split, domain=domain)):
            documents[int(doc_index)] = {"id": str(doc_id), "domain": str(doc_domain)}
            yield int(doc_index), tokens

    if pad_token_id is None:
        pad_token_id = bos_token_id if bos_token_id is not None else 0
    contexts = iter_contexts(
        corpus_documents(), ctx, n_tokens, bos_token_id=bos_token_id, pad_token_id=pad_token_id, min_tokens=min_tokens
    )
    names = list(hooks)
    device = getattr(hooked_model, "device", None)

    def capture(ids: torch.Tensor) -> Mapping[str, torch.Tensor]:
        if isinstance(device, (str, torch.device)):
            ids = ids.to(device)
        return hooked_model.run_with_cache(ids, names=names, need_logits=False)[1]

    store_meta = {
        **dict(meta or {}),
        "corpus": corpus_identity(corpus),
        "split": split,
        "domain": domain,
        "n_tokens": int(n_tokens),
        "ctx_len": int(ctx),
        "context_policy": CONTEXT_POLICY,
        "bos_token_id": bos_token_id,
        "pad_token_id": pad_token_id,
        "min_tokens": int(min_tokens),
    }
    return write_activations(
        capture,
        contexts,
        names,
        out_dir,
        batch_size=batch_size,
        shard_tokens=shard_tokens,
        dtype=dtype,
        meta=store_meta,
        documents=documents,
        overwrite=overwrite,
        total_tokens=n_tokens,
        progress=progress,
    )


def corpus_identity(corpus: Any) -> dict[str, Any]:
    """Where the corpus lives and the sha256 of its manifest, so ``doc_index`` resolves to a document."""
    for attribute in ("path", "root", "directory"):
        location = getattr(corpus, attribute, None)
        if isinstance(location, (str, os.PathLike)):
            path = Path(location)
            manifest = path / "manifest.json"
            return {
                "path": str(path.resolve()),
                "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            }
    return {"path": None, "manifest_sha256": None}
