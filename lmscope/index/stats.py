r"""Corpus statistics over an index: term frequency by training step, top n-grams per domain, exact duplicates, contamination.

- :func:`term_frequency` — how often a term (any token sequence) occurs in the corpus and, for a
  mini suite, how many times the training had shown it whole by each checkpoint (Pythia's
  term-frequency study). Every occurrence is located with the suffix array, then joined with the
  suite's segment table (the pieces of documents inside training rows, sorted by document and
  offset): an occurrence :math:`[o, o+m)` of document :math:`d` is *seen whole* at step
  :math:`\lfloor r / B \rfloor` for every piece of :math:`d` in row :math:`r` that contains it.
  Checkpoint ``stepN`` has seen the exposures at steps :math:`< N`
  (:data:`lmscope.suites.replay.STEP_CONVENTION`). Rows past the last complete step never count.
- :func:`top_ngrams` — exact counts of every n-gram (never across documents), per domain and over
  all, from the index's token stream: each n-gram is packed into one ``uint64`` when
  :math:`n \cdot \lceil \log_2 V \rceil \le 64` (else compared as raw bytes), counted with
  ``np.unique`` chunk by chunk and merged exactly. Memory grows with the distinct n-grams.
- :func:`duplicate_documents` — documents with identical token sequences (BLAKE2b of each
  document's tokens, groups confirmed token by token).
- :func:`contamination` — the fraction of an evaluation set's documents that share at least one
  n-gram (13 tokens by default, as in GPT-3's and PaLM's contamination studies) with the corpus,
  and per document the fraction of its n-grams found and of its tokens they cover. The distinct
  n-grams of a document are counted together (:meth:`lmscope.index.Index.count_many`: the binary
  searches of all of them advance side by side on whole arrays). Matches inside the evaluated
  document itself are never counted; with ``against_split``, only matches in that split are.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress

TOP_NGRAM_MAX_N = 16
"""Longest n-gram :func:`top_ngrams` counts: memory is about ``n`` × 2–4 bytes per corpus token per chunk."""

_CHUNK = 1 << 22
"""Stream positions per chunk in :func:`top_ngrams`."""

DEFAULT_CONTAMINATION_N = 13


def _positive(name: str, value: Any, example: int, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise LmscopeError(f"--{name} {value!r} is not an integer ≥ {low}; give e.g. {example}.")
    return int(value)


# --- term frequency by training step ------------------------------------------------------


@dataclass
class TermFrequency:
    """How often a term occurs in the corpus and, for a mini suite, in the training seen by each checkpoint.

    Attributes:
        tokens: the term's token ids.
        corpus_count: its occurrences in the corpus (every split).
        documents: distinct documents holding it.
        by_split: occurrences per split.
        suite: the mini suite, or ``None`` (then the fields below are empty).
        trained: whole exposures over the run (an occurrence trained twice counts twice).
        checkpoints: the checkpoint steps asked about, ascending.
        seen: for each checkpoint ``stepN``, the whole exposures at steps ``< N``.
        first_step: the first step that showed it whole, or ``None``.
        text: the term as text, when given as text.
    """

    tokens: list[int]
    corpus_count: int
    documents: int
    by_split: dict[str, int]
    suite: str | None = None
    trained: int = 0
    checkpoints: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    first_step: int | None = None
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": self.tokens}
        if self.text is not None:
            out["text"] = self.text
        out.update(corpus_count=self.corpus_count, documents=self.documents, by_split=self.by_split, suite=self.suite)
        if self.suite is not None:
            out.update(
                trained=self.trained,
                first_step=self.first_step,
                seen_by_checkpoint=[{"step": s, "seen": n} for s, n in zip(self.checkpoints, self.seen)],
            )
        return out


def exposure_steps(source: Any, docs: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """The step of every whole training exposure of the occurrences ``(docs[k], offsets[k], length)``, unsorted, trained steps only.

    Args:
        source: a :class:`lmscope.suites.replay.MiniSuiteSource`.
        docs, offsets: ``int64`` arrays (corpus document index, token offset in it).
        length: tokens per occurrence.
    """
    if not len(docs):
        return np.zeros(0, dtype=np.int64)
    seg = source.by_row
    order = np.lexsort((seg.doc_offset, seg.doc_index))
    seg_doc, seg_off, seg_len, seg_row = seg.doc_index[order], seg.doc_offset[order], seg.length[order], seg.row[order]
    base = int(source.corpus.documents.column("n_tokens").to_numpy().max(initial=0)) + 1
    if base * (len(source.corpus) + 1) >= 2**62:  # pragma: no cover - beyond any corpus a mini suite holds
        raise LmscopeError(f"{source.describe()} is too large to join by packed keys; count the term with `lmscope replay find` instead.")
    keys = seg_doc * base + seg_off
    docs = np.asarray(docs, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    # a piece holding [o, o + length) starts in [o + length - row_length, o]: pieces are at most a row long
    lo = np.searchsorted(keys, docs * base + np.maximum(offsets + length - source.row_length, 0), side="left")
    hi = np.searchsorted(keys, docs * base + offsets, side="right")
    sizes = hi - lo
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(docs)), sizes)
    firsts = np.cumsum(sizes) - sizes
    candidate = np.arange(total, dtype=np.int64) - np.repeat(firsts, sizes) + np.repeat(lo, sizes)
    whole = seg_off[candidate] + seg_len[candidate] >= offsets[owner] + length
    steps = seg_row[candidate[whole]] // source.batch_size
    return steps[steps < source.num_steps]


def _checkpoint_steps(source: Any, steps: Any) -> list[int]:
    if steps is None:
        listed = source.meta.get("checkpoint_steps")
        if isinstance(listed, list) and listed and all(isinstance(s, int) and not isinstance(s, bool) for s in listed):
            return sorted(set(listed))
        return [source.num_steps]
    out = []
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise LmscopeError(f"--steps holds {step!r}, which is not a checkpoint step; give integers ≥ 0, e.g. 0,64,512.")
        out.append(int(step))
    return sorted(set(out))


def term_frequency(index: Any, tokens: Any, *, suite: Any = None, steps: Any = None, text: str | None = None) -> TermFrequency:
    """Occurrences of ``tokens`` in the corpus and, with a mini suite, in the training seen by each checkpoint.

    Args:
        index: an :class:`lmscope.index.Index`.
        tokens: the term's token ids.
        suite: a mini suite trained on the index's corpus (directory or source).
        steps: the checkpoints ``stepN`` to report (seen = exposures at steps ``< N``); by default
            the suite's saved checkpoints (``suite.json``), else its last step.
        text: the term as text, for display only.
    """
    pattern = index.check_tokens(tokens, "term")
    docs, offsets = index.occurrences(pattern)
    splits = index.documents.column("split").to_numpy(zero_copy_only=False)
    values, counts = np.unique(splits[docs].astype(str), return_counts=True) if len(docs) else (np.array([]), np.array([]))
    result = TermFrequency(
        tokens=pattern.astype(np.int64).tolist(),
        corpus_count=int(len(docs)),
        documents=int(len(np.unique(docs))),
        by_split={str(v): int(c) for v, c in zip(values.tolist(), counts.tolist())},
        text=text,
    )
    if suite is None:
        if steps is not None:
            raise LmscopeError("--steps counts exposures in a suite's training; name the suite with --suite.")
        return result
    from lmscope.index.exposures import check_same_corpus, open_suite

    source = open_suite(suite)
    check_same_corpus(index, source)
    checkpoints = _checkpoint_steps(source, steps)
    seen_steps = np.sort(exposure_steps(source, docs, offsets, len(pattern)))
    result.suite = str(source.root)
    result.trained = int(len(seen_steps))
    result.checkpoints = checkpoints
    result.seen = np.searchsorted(seen_steps, np.asarray(checkpoints, dtype=np.int64), side="left").astype(int).tolist()
    result.first_step = int(seen_steps[0]) if len(seen_steps) else None
    return result


# --- top n-grams per domain ---------------------------------------------------------------


@dataclass
class NgramCount:
    """One n-gram and its count (``text`` when decoded)."""

    tokens: list[int]
    count: int
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": self.tokens, "count": self.count}
        if self.text is not None:
            out["text"] = self.text
        return out


ALL_DOMAINS = "(all)"


@dataclass
class TopNgrams:
    """The most frequent n-grams per domain (and over all of them, under ``"(all)"``).

    Attributes:
        n: tokens per n-gram.
        top: how many were asked for per domain.
        split: the split counted, or ``None`` for all.
        by_domain: domain → n-grams, most frequent first (ties in token order).
        totals: domain → n-grams counted (positions).
        distinct: domain → distinct n-grams.
    """

    n: int
    top: int
    split: str | None
    by_domain: dict[str, list[NgramCount]]
    totals: dict[str, int]
    distinct: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "top": self.top,
            "split": self.split,
            "domains": [
                {"domain": d, "total": self.totals[d], "distinct": self.distinct[d], "ngrams": [g.to_dict() for g in grams]}
                for d, grams in self.by_domain.items()
            ],
        }


class _Packer:
    """N-grams as sortable keys: one ``uint64`` each when they fit, else raw bytes."""

    def __init__(self, n: int, vocab_size: int, dtype: np.dtype) -> None:
        self.n = n
        self.dtype = dtype
        self.bits = max(1, math.ceil(math.log2(max(vocab_size, 2))))
        self.packed = n * self.bits <= 64

    def keys(self, stream: np.ndarray, starts: np.ndarray) -> np.ndarray:
        if self.packed:
            keys = np.zeros(len(starts), dtype=np.uint64)
            for j in range(self.n):
                keys = (keys << np.uint64(self.bits)) | stream[starts + j].astype(np.uint64)
            return keys
        grams = np.stack([stream[starts + j] for j in range(self.n)], axis=1).astype(self.dtype.newbyteorder(">"))
        return np.ascontiguousarray(grams).view(np.dtype((np.void, self.n * self.dtype.itemsize))).ravel()

    def tokens(self, keys: np.ndarray) -> np.ndarray:
        """``[len(keys), n]`` int64 token ids."""
        if self.packed:
            mask = np.uint64((1 << self.bits) - 1)
            return np.stack([(keys >> np.uint64(self.bits * (self.n - 1 - j))) & mask for j in range(self.n)], axis=1).astype(np.int64)
        raw = np.frombuffer(np.ascontiguousarray(keys).tobytes(), dtype=self.dtype.newbyteorder(">"))
        return raw.reshape(len(keys), self.n).astype(np.int64)


def _merge(tables: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal keys across ``(keys, counts)`` tables."""
    if len(tables) == 1:
        return tables[0]
    keys = np.concatenate([k for k, _ in tables])
    counts = np.concatenate([c for _, c in tables])
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse.ravel(), weights=counts, minlength=len(unique)).astype(np.int64)


def top_ngrams(
    index: Any,
    n: int,
    *,
    top: int = 20,
    domains: list[str] | None = None,
    split: str | None = None,
    decode: bool = False,
    progress: Progress = no_progress,
) -> TopNgrams:
    """The ``top`` most frequent ``n``-grams of each domain and of all of them together, with exact counts.

    Args:
        index: an :class:`lmscope.index.Index`.
        n: tokens per n-gram, 1 … :data:`TOP_NGRAM_MAX_N`.
        top: n-grams listed per domain.
        domains: only these domains (default: every domain).
        split: count only documents of this split (default: all).
        decode: add each n-gram's text.
        progress: receives ``("n-gram chunks", 1, total)``.
    """
    n, top = _positive("n", n, 3), _positive("top", top, 20)
    if n > TOP_NGRAM_MAX_N:
        raise LmscopeError(f"--n {n} is above {TOP_NGRAM_MAX_N}; count longer n-grams one by one with `lmscope index count`.")
    domain_column = index.documents.column("domain").to_numpy(zero_copy_only=False).astype(str)
    split_column = index.documents.column("split").to_numpy(zero_copy_only=False).astype(str)
    names, codes = np.unique(domain_column, return_inverse=True)
    names = names.tolist()
    for wanted, present, what in ((domains or [], names, "domain"), ([split] if split is not None else [], sorted(set(split_column.tolist())), "split")):
        for value in wanted:
            if value not in present:
                raise LmscopeError(f"{what} {value!r} is not in the index's corpus; it holds {', '.join(present) or 'no documents'}.")
    chosen = [names.index(d) for d in domains] if domains else list(range(len(names)))
    allowed = np.zeros(len(names), dtype=bool)
    allowed[chosen] = True
    keep_doc = allowed[codes] & ((split_column == split) if split is not None else True)
    packer = _Packer(n, index.vocab_size, index.dtype)
    tables: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in chosen}
    n_chunks = sum(max(1, math.ceil(max(shard.n - n + 1, 0) / _CHUNK)) for shard in index.shards)
    progress("n-gram chunks", 0, n_chunks)
    for shard in index.shards:
        starts_of_docs = np.asarray(shard.starts, dtype=np.int64)
        positions = max(shard.n - n + 1, 0)
        for a in range(0, max(positions, 1), _CHUNK):
            b = min(a + _CHUNK, positions)
            if b <= a:
                progress("n-gram chunks", 1, n_chunks)
                continue
            window = np.asarray(shard.stream[a : b + n - 1])
            separators = np.concatenate([[0], np.cumsum(window == index.separator)])
            valid = np.flatnonzero(separators[n : n + b - a] - separators[: b - a] == 0)
            local = np.searchsorted(starts_of_docs, a + valid, side="right") - 1
            doc = shard.info.doc_start + local
            valid, doc = valid[keep_doc[doc]], doc[keep_doc[doc]]
            if len(valid):
                keys = packer.keys(window, valid)
                dom = codes[doc]
                order = np.argsort(dom, kind="stable")
                dom, keys = dom[order], keys[order]
                bounds = np.flatnonzero(np.diff(dom)) + 1
                for part_keys, code in zip(np.split(keys, bounds), dom[np.concatenate([[0], bounds])].tolist()):
                    unique, counts = np.unique(part_keys, return_counts=True)
                    tables[code] = [_merge(tables[code] + [(unique, counts.astype(np.int64))])]
            progress("n-gram chunks", 1, n_chunks)
    by_domain: dict[str, list[NgramCount]] = {}
    totals: dict[str, int] = {}
    distinct: dict[str, int] = {}
    merged_all: list[tuple[np.ndarray, np.ndarray]] = []
    for code in chosen:
        table = tables[code][0] if tables[code] else (np.zeros(0, dtype=np.uint64 if packer.packed else None), np.zeros(0, dtype=np.int64))
        if tables[code]:
            merged_all.append(table)
        by_domain[names[code]], totals[names[code]], distinct[names[code]] = _top(table, top, packer)
    everything = _merge(merged_all) if merged_all else (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64))
    by_domain[ALL_DOMAINS], totals[ALL_DOMAINS], distinct[ALL_DOMAINS] = _top(everything, top, packer)
    if decode:
        for grams in by_domain.values():
            for gram in grams:
                gram.text = index.decode(gram.tokens)
    return TopNgrams(n, top, split, by_domain, totals, distinct)


def _top(table: tuple[np.ndarray, np.ndarray], top: int, packer: _Packer) -> tuple[list[NgramCount], int, int]:
    keys, counts = table
    if not len(keys):
        return [], 0, 0
    cutoff = np.partition(counts, len(counts) - min(top, len(counts)))[len(counts) - min(top, len(counts))]
    candidates = np.flatnonzero(counts >= cutoff)
    grams = packer.tokens(keys[candidates])
    order = np.lexsort(tuple(grams[:, j] for j in range(packer.n - 1, -1, -1)) + (-counts[candidates],))[:top]
    out = [NgramCount(grams[k].tolist(), int(counts[candidates][k])) for k in order]
    return out, int(counts.sum()), int(len(keys))


# --- exact duplicate documents ------------------------------------------------------------


@dataclass
class DuplicateGroup:
    """Documents with identical tokens.

    Attributes:
        doc_indices, doc_ids, domains, splits: the documents, in corpus order.
        n_tokens: tokens in each.
    """

    doc_indices: list[int]
    doc_ids: list[str]
    domains: list[str]
    splits: list[str]
    n_tokens: int

    @property
    def crosses_splits(self) -> bool:
        """Whether copies sit in different splits (a held-out document that was also trained on)."""
        return len(set(self.splits)) > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_tokens": self.n_tokens,
            "copies": len(self.doc_indices),
            "crosses_splits": self.crosses_splits,
            "documents": [
                {"doc_index": i, "doc_id": d, "domain": dom, "split": s} for i, d, dom, s in zip(self.doc_indices, self.doc_ids, self.domains, self.splits)
            ],
        }


@dataclass
class Duplicates:
    """Every group of exact duplicate documents, largest waste (copies × tokens) first.

    Attributes:
        groups: the groups.
        n_documents: documents examined (those with at least ``min_tokens`` tokens).
        min_tokens: shorter documents were ignored.
    """

    groups: list[DuplicateGroup]
    n_documents: int
    min_tokens: int

    @property
    def redundant_documents(self) -> int:
        """Copies beyond the first of each group."""
        return sum(len(g.doc_indices) - 1 for g in self.groups)

    @property
    def redundant_tokens(self) -> int:
        return sum((len(g.doc_indices) - 1) * g.n_tokens for g in self.groups)

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        return {
            "n_documents": self.n_documents,
            "min_tokens": self.min_tokens,
            "groups": len(self.groups),
            "redundant_documents": self.redundant_documents,
            "redundant_tokens": self.redundant_tokens,
            "groups_across_splits": sum(1 for g in self.groups if g.crosses_splits),
            "duplicate_groups": [g.to_dict() for g in self.groups[:limit]],
        }


def duplicate_documents(index: Any, *, min_tokens: int = 1, progress: Progress = no_progress) -> Duplicates:
    """Groups of documents whose token sequences are identical (documents shorter than ``min_tokens`` are ignored)."""
    min_tokens = _positive("min-tokens", min_tokens, 1, low=0)
    by_hash: dict[bytes, list[int]] = {}
    examined = 0
    progress("documents hashed", 0, index.n_documents)
    for shard in index.shards:
        starts = np.asarray(shard.starts, dtype=np.int64)
        stops = np.append(starts[1:] - 1, shard.n)
        for local, (a, b) in enumerate(zip(starts.tolist(), stops.tolist())):
            if b - a < min_tokens:
                continue
            examined += 1
            digest = hashlib.blake2b(np.asarray(shard.stream[a:b]).tobytes(), digest_size=16).digest() + (b - a).to_bytes(8, "little")
            by_hash.setdefault(digest, []).append(shard.info.doc_start + local)
        progress("documents hashed", len(starts), index.n_documents)
    ids = index.documents.column("id")
    domains = index.documents.column("domain")
    splits = index.documents.column("split")
    groups = []
    for members in by_hash.values():
        if len(members) < 2:
            continue
        exact: dict[bytes, list[int]] = {}  # confirm token by token: a hash collision must not merge documents
        for doc in members:
            exact.setdefault(np.asarray(index.document_tokens(doc)).tobytes(), []).append(doc)
        for same in exact.values():
            if len(same) > 1:
                groups.append(
                    DuplicateGroup(
                        doc_indices=same,
                        doc_ids=[str(ids[d].as_py()) for d in same],
                        domains=[str(domains[d].as_py()) for d in same],
                        splits=[str(splits[d].as_py()) for d in same],
                        n_tokens=len(index.document_tokens(same[0])),
                    )
                )
    groups.sort(key=lambda g: (-(len(g.doc_indices) - 1) * g.n_tokens, g.doc_indices[0]))
    return Duplicates(groups, examined, min_tokens)


# --- contamination ------------------------------------------------------------------------


@dataclass
class EvalDocument:
    """A document of an evaluation set, tokenized with the corpus's tokenizer.

    Attributes:
        id: its id.
        tokens: its token ids.
        doc_index: when it is itself a document of the index's corpus, its index there (its own
            matches are then never counted).
    """

    id: str
    tokens: list[int]
    doc_index: int | None = None


@dataclass
class DocumentOverlap:
    """How much of one evaluation document occurs in the corpus.

    Attributes:
        id: the document.
        n_tokens: its tokens.
        n_ngrams: its n-grams (``n_tokens - n + 1``, or 0 when shorter than ``n``).
        matched_ngrams: those found in the corpus.
        covered_tokens: its tokens inside at least one found n-gram.
    """

    id: str
    n_tokens: int
    n_ngrams: int
    matched_ngrams: int
    covered_tokens: int

    @property
    def contaminated(self) -> bool:
        return self.matched_ngrams > 0

    @property
    def ngram_overlap(self) -> float:
        return self.matched_ngrams / self.n_ngrams if self.n_ngrams else 0.0

    @property
    def token_overlap(self) -> float:
        return self.covered_tokens / self.n_tokens if self.n_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "n_tokens": self.n_tokens,
            "n_ngrams": self.n_ngrams,
            "matched_ngrams": self.matched_ngrams,
            "ngram_overlap": round(self.ngram_overlap, 6),
            "token_overlap": round(self.token_overlap, 6),
            "contaminated": self.contaminated,
        }


@dataclass
class Contamination:
    """The n-gram overlap of an evaluation set with the corpus.

    Attributes:
        n: tokens per n-gram.
        against_split: only corpus documents of this split counted, or ``None`` for all.
        documents: per evaluation document, in the order given.
    """

    n: int
    against_split: str | None
    documents: list[DocumentOverlap]

    @property
    def contaminated(self) -> int:
        return sum(1 for d in self.documents if d.contaminated)

    @property
    def too_short(self) -> int:
        """Documents shorter than ``n`` tokens (they cannot be contaminated)."""
        return sum(1 for d in self.documents if d.n_ngrams == 0)

    @property
    def fraction(self) -> float:
        """Contaminated documents over all documents."""
        return self.contaminated / len(self.documents) if self.documents else 0.0

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        ordered = sorted(self.documents, key=lambda d: (-d.ngram_overlap, d.id))
        total_ngrams = sum(d.n_ngrams for d in self.documents)
        return {
            "n": self.n,
            "against_split": self.against_split,
            "n_documents": len(self.documents),
            "contaminated": self.contaminated,
            "fraction": round(self.fraction, 6),
            "too_short": self.too_short,
            "ngram_overlap": round(sum(d.matched_ngrams for d in self.documents) / total_ngrams, 6) if total_ngrams else 0.0,
            "documents": [d.to_dict() for d in ordered[:limit]],
        }


def contamination(
    index: Any,
    documents: list[EvalDocument],
    *,
    n: int = DEFAULT_CONTAMINATION_N,
    against_split: str | None = None,
    progress: Progress = no_progress,
) -> Contamination:
    """Which evaluation documents share an ``n``-gram with the corpus, and how much of each.

    Args:
        index: an :class:`lmscope.index.Index`.
        documents: the evaluation set (:func:`read_eval_set`).
        n: tokens per n-gram.
        against_split: count only occurrences in corpus documents of this split (e.g. ``train``).
        progress: receives ``("documents checked", 1, total)``.
    """
    n = _positive("n", n, DEFAULT_CONTAMINATION_N)
    split_column = index.documents.column("split").to_numpy(zero_copy_only=False).astype(str)
    if against_split is not None and against_split not in set(split_column.tolist()):
        raise LmscopeError(f"--against-split {against_split!r} is not a split of the index's corpus; it holds {', '.join(sorted(set(split_column.tolist())))}.")
    in_split = (split_column == against_split) if against_split is not None else None
    results = []
    progress("documents checked", 0, len(documents))
    for document in documents:
        size = len(document.tokens)
        if size < n:
            results.append(DocumentOverlap(document.id, size, 0, 0, 0))
            progress("documents checked", 1, len(documents))
            continue
        tokens = index.check_tokens(document.tokens, f"evaluation document {document.id!r}").astype(np.int64)
        grams = np.lib.stride_tricks.sliding_window_view(tokens, n)
        distinct, inverse = np.unique(grams, axis=0, return_inverse=True)
        counts = index.count_many(distinct)[inverse.ravel()]
        found = counts > 0
        if in_split is not None or document.doc_index is not None:
            own: Counter[tuple[int, ...]] = Counter()  # occurrences inside the document itself, never counted
            if document.doc_index is not None:
                own.update(tuple(document.tokens[i : i + n]) for i in range(size - n + 1))
            cache: dict[tuple[int, ...], bool] = {}
            for i in np.flatnonzero(found).tolist():
                gram = tuple(document.tokens[i : i + n])
                if gram not in cache:
                    elsewhere = int(counts[i]) - own[gram]
                    if elsewhere <= 0 or in_split is None:
                        cache[gram] = elsewhere > 0
                    else:
                        docs, _ = index.occurrences(list(gram))
                        keep = in_split[docs]
                        if document.doc_index is not None:
                            keep &= docs != document.doc_index
                        cache[gram] = bool(keep.any())
                found[i] = cache[gram]
        covered = np.zeros(size + 1, dtype=np.int64)
        hits = np.flatnonzero(found)
        np.add.at(covered, hits, 1)
        np.add.at(covered, hits + n, -1)
        results.append(DocumentOverlap(document.id, size, size - n + 1, int(len(hits)), int((np.cumsum(covered)[:size] > 0).sum())))
        progress("documents checked", 1, len(documents))
    return Contamination(n, against_split, results)


def read_eval_set(source: str | os.PathLike[str], index: Any, *, split: str | None = None, text_field: str = "text") -> list[EvalDocument]:
    """An evaluation set as :class:`EvalDocument` s, in the corpus's tokenization.

    ``source`` is one of:

    - a tokenized corpus (or mini-suite) directory, tokenized with the index's tokenizer —
      optionally only its ``split``; when it is the index's own corpus, each document remembers
      its index so that it does not match itself;
    - a ``.txt`` file: one document per non-blank line;
    - anything :func:`lmscope.data.readers.read_documents` reads (JSONL, plain or compressed,
      Parquet, a directory of text files), with the text in ``text_field``.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise LmscopeError(f"evaluation set {str(path)!r} does not exist; give a JSONL, Parquet or .txt file, or a tokenized corpus directory.")
    from lmscope.data.tokenized import is_tokenized_corpus
    from lmscope.suites.replay.mini import mini_suite_root

    if path.is_dir() and (is_tokenized_corpus(path) or mini_suite_root(path) is not None):
        from lmscope.index.build import open_corpus
        from lmscope.index.layout import corpus_identity

        corpus = open_corpus(path)
        mine = (index.manifest["corpus"].get("tokenizer") or {}).get("sha256")
        theirs = (corpus.manifest.get("tokenizer") or {}).get("sha256")
        if not mine or mine != theirs:
            raise LmscopeError(
                f"evaluation corpus {str(corpus.path)!r} was tokenized with {(corpus.manifest.get('tokenizer') or {}).get('spec')!r}, "
                f"not with the index's tokenizer {(index.manifest['corpus'].get('tokenizer') or {}).get('spec')!r}; give its documents as text instead."
            )
        same = corpus_identity(corpus) == index.corpus_identity
        ids = corpus.documents.column("id").to_pylist()
        chosen = corpus.select(split=split).tolist()
        return [EvalDocument(str(ids[i]), corpus.document_tokens(i).astype(np.int64).tolist(), i if same else None) for i in chosen]
    if split is not None:
        raise LmscopeError(f"--split picks documents of a tokenized corpus, but {str(path)!r} is a file of text; leave --split out.")
    if path.is_file() and path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise LmscopeError(f"{path} could not be read as UTF-8 text ({err}); give a UTF-8 .txt file.") from None
        records = [(f"{path.name}:{k}", line) for k, line in enumerate(lines, start=1) if line.strip()]
    else:
        from lmscope.data.readers import read_documents

        records = [(doc.id, doc.text) for doc in read_documents(path, strict=True, text_field=text_field)]
    if not records:
        raise LmscopeError(f"evaluation set {str(path)!r} holds no documents; give a file with some text.")
    return [EvalDocument(doc_id, index.encode(text) if text else []) for doc_id, text in records]
