"""Corpus statistics: documents, tokens and bytes per domain and split.

For a tokenized corpus the figures are computed from its document table (not copied
from its manifest, so they cross-check it); for raw documents (a JSONL/Parquet file,
a text directory, or a default-corpus build directory) the documents are read once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from lmscope.data.default_corpus import DOCUMENTS_FILE, read_documents_manifest
from lmscope.data.readers import read_documents
from lmscope.data.split import SPLITS
from lmscope.data.tokenize_job import WORK_DIR
from lmscope.data.tokenized import TokenizedCorpus, is_tokenized_corpus
from lmscope.progress import Progress, no_progress


def tokenized_stats(corpus: TokenizedCorpus) -> dict[str, Any]:
    """Documents, tokens and UTF-8 bytes per (domain, split) of a tokenized corpus, with totals.

    Returns a dict with ``kind="tokenized"``, ``path``, ``tokenizer``, ``dtype``, ``documents``,
    ``tokens``, ``bytes``, ``rows`` (one per domain and split, sorted), ``by_split`` and ``reader``
    (what the readers counted when it was tokenized, from the manifest).
    """
    table = corpus.documents
    grouped = table.group_by(["domain", "split"]).aggregate([("doc_index", "count"), ("n_tokens", "sum"), ("n_bytes", "sum")])
    found = {(row["domain"], row["split"]): row for row in grouped.to_pylist()}
    rows = []
    for domain in sorted({domain for domain, _ in found}):
        for split in SPLITS:
            row = found.get((domain, split), {})
            rows.append(
                {
                    "domain": domain,
                    "split": split,
                    "documents": int(row.get("doc_index_count", 0)),
                    "tokens": int(row.get("n_tokens_sum", 0) or 0),
                    "bytes": int(row.get("n_bytes_sum", 0) or 0),
                }
            )
    by_split = {split: {key: sum(row[key] for row in rows if row["split"] == split) for key in ("documents", "tokens", "bytes")} for split in SPLITS}
    tokens = int(pc.sum(table.column("n_tokens")).as_py() or 0)
    n_bytes = int(pc.sum(table.column("n_bytes")).as_py() or 0)
    return {
        "kind": "tokenized",
        "path": str(corpus.path),
        "tokenizer": corpus.manifest.get("tokenizer", {}),
        "dtype": corpus.manifest.get("dtype"),
        "documents": len(corpus),
        "tokens": tokens,
        "bytes": n_bytes,
        "bytes_per_token": round(n_bytes / tokens, 4) if tokens else None,
        "rows": rows,
        "by_split": by_split,
        "reader": corpus.manifest.get("reader", {}),
    }


def document_stats(path: str | os.PathLike[str], progress: Progress = no_progress, **reader_options: Any) -> dict[str, Any]:
    """Documents and UTF-8 bytes per domain of raw documents, plus the reader's counts (malformed, replaced).

    Returns a dict with ``kind="documents"``, ``path``, ``documents``, ``bytes``, ``rows`` (one per
    domain, sorted) and ``reader`` (:class:`~lmscope.data.documents.ReadStats` as a dict).
    """
    reader = read_documents(path, **reader_options)
    per_domain: dict[str, dict[str, int]] = {}
    for document in reader:
        cell = per_domain.setdefault(document.domain, {"documents": 0, "bytes": 0})
        cell["documents"] += 1
        cell["bytes"] += len(document.text.encode("utf-8"))
        if reader.stats.documents % 1000 == 0:
            progress("read", advance=1000)
    rows = [{"domain": domain, **per_domain[domain]} for domain in sorted(per_domain)]
    return {
        "kind": "documents",
        "path": str(path),
        "documents": reader.stats.documents,
        "bytes": reader.stats.text_bytes,
        "rows": rows,
        "reader": reader.stats.to_dict(),
    }


def corpus_stats(path: str | os.PathLike[str], progress: Progress = no_progress, **reader_options: Any) -> dict[str, Any]:
    """Statistics of whatever ``path`` is: a tokenized corpus, a default-corpus build directory, or document sources."""
    path = Path(path)
    if path.is_dir():
        if is_tokenized_corpus(path) or (path / WORK_DIR).is_dir():
            return tokenized_stats(TokenizedCorpus.open(path))  # an unfinished one fails with a clear message
        if read_documents_manifest(path) is not None:
            return document_stats(path / DOCUMENTS_FILE, progress, **reader_options)
    return document_stats(path, progress, **reader_options)
