"""Which training sequences to score for a query, and where each came from.

A candidate is one training row of a suite's data order, named by its *position* in the training
order (Pythia's convention, :data:`lmscope.suites.replay.base.STEP_CONVENTION`): position ``p`` is in the
batch of step ``p // B`` and checkpoint ``stepN`` has been trained on it iff ``p < B·N``. Rows are read
through a :class:`~lmscope.suites.replay.ReplaySource`, so any suite whose data replay can read works;
document provenance (id, domain, offset) needs a source with a document table (mini suites).

Candidate sets:

- ``all``: every row of the data order (or, with ``before_step``, every row that checkpoint has seen);
- ``filtered``: the rows most similar to the query — the top rows by BM25 (``bm25s``, Lucene's
  variant; Grosse et al. used TF-IDF) over the query's tokens, joined with every row that holds a span
  of at least ``min_span`` tokens the query shares with the training data, found with the suffix-array
  index when one is given (each reason is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress

CANDIDATE_SETS: tuple[str, ...] = ("all", "filtered")


@dataclass
class Candidates:
    """Training-order positions to score (sorted, int64), and why each filtered one was chosen."""

    positions: np.ndarray
    method: str
    reasons: dict[int, list[str]] = field(default_factory=dict)
    pool: int = 0
    """Rows the candidates were chosen from."""

    def __len__(self) -> int:
        return int(self.positions.shape[0])


def pool_positions(source: Any, before_step: int | None = None) -> range:
    """Every training-order position of ``source`` (or those checkpoint ``step{before_step}`` has seen)."""
    if before_step is None:
        return range(0, source.batch_size * source.num_steps)
    return source.seen_before(before_step)


def all_candidates(source: Any, before_step: int | None = None, limit: int | None = None, seed: int = 0) -> Candidates:
    """Every row of the pool; with ``limit``, a seeded uniform sample of that many (sorted)."""
    pool = pool_positions(source, before_step)
    positions = np.arange(pool.start, pool.stop, dtype=np.int64)
    if len(positions) == 0:
        raise LmscopeError(f"checkpoint step{before_step} has seen no training rows; choose a later checkpoint or drop --before-step.")
    if limit is not None and limit < len(positions):
        positions = np.sort(np.random.default_rng(seed).choice(positions, size=limit, replace=False))
    return Candidates(positions, "all", pool=len(pool))


def read_rows(source: Any, positions: np.ndarray, progress: Progress = no_progress) -> np.ndarray:
    """Token ids ``[N, L]`` of the rows at ``positions`` (in that order), read step by step."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.zeros((len(positions), source.row_length), dtype=np.int64)
    if len(positions) == 0:
        return out
    steps = positions // source.batch_size
    order = np.argsort(positions, kind="stable")
    i = 0
    while i < len(order):
        step = int(steps[order[i]])
        j = i
        while j < len(order) and steps[order[j]] == step:
            j += 1
        first = int(positions[order[i]] - step * source.batch_size)
        last = int(positions[order[j - 1]] - step * source.batch_size)
        raw = source.step(step, rows=slice(first, last + 1)) if hasattr(source, "step") else None
        for k in order[i:j].tolist():
            out[k] = raw.tokens[int(positions[k] - step * source.batch_size) - first]
        progress("read rows", j - i, len(positions))
        i = j
    return out


def pool_rows(source: Any, pool: range, progress: Progress = no_progress) -> np.ndarray:
    """Token ids of every row in ``pool``, in order (for BM25 over the pool)."""
    return read_rows(source, np.arange(pool.start, pool.stop, dtype=np.int64), progress)


def filtered_candidates(
    source: Any,
    query_tokens: list[int],
    *,
    top: int = 256,
    index: Any = None,
    min_span: int = 8,
    max_span_rows: int = 256,
    before_step: int | None = None,
    pool_tokens: np.ndarray | None = None,
    progress: Progress = no_progress,
) -> Candidates:
    """The ``top`` rows by BM25 against ``query_tokens``, joined with rows holding a span shared with the query.

    Args:
        source: the suite's replay source (rows; a document table for the span filter).
        query_tokens: the prompt and completion, concatenated.
        top: rows kept by BM25.
        index: an :class:`lmscope.index.Index` of the suite's corpus; adds the rows holding each maximal
            span of at least ``min_span`` tokens that the query shares with the corpus (at most
            ``max_span_rows`` rows per span).
        before_step: only rows checkpoint ``step{before_step}`` has seen.
        pool_tokens: the pool's rows if already read (``[len(pool), L]``), else they are read here.
    """
    from lmscope.index.trace import bm25_scores, maximal_spans

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise LmscopeError(f"--candidates-top {top!r} must be a positive number of rows.")
    pool = pool_positions(source, before_step)
    if len(pool) == 0:
        raise LmscopeError(f"checkpoint step{before_step} has seen no training rows; choose a later checkpoint or drop --before-step.")
    tokens = pool_rows(source, pool, progress) if pool_tokens is None else pool_tokens
    scores = bm25_scores([row.tolist() for row in tokens], list(query_tokens))
    ranked = np.lexsort((np.arange(len(scores)), -scores))[: min(top, len(scores))]
    reasons: dict[int, list[str]] = {}
    for rank, k in enumerate(ranked.tolist(), start=1):
        if scores[k] > 0:
            reasons.setdefault(pool.start + k, []).append(f"BM25 rank {rank}")
    if index is not None:
        from lmscope.index.exposures import check_same_corpus

        check_same_corpus(index, source)
        query = index.check_tokens(query_tokens, "query").astype(np.int64)
        lengths, _ = index.longest_matches(query)
        for a, b in maximal_spans(lengths):
            if b - a < min_span:
                continue
            span = query[a:b]
            docs, offsets = index.occurrences(span)
            found = 0
            for doc, offset in zip(docs.tolist(), offsets.tolist()):
                for seg in source.document_segments(doc):
                    if seg.doc_offset <= offset and offset + len(span) <= seg.doc_offset + seg.length and seg.row in pool:
                        reasons.setdefault(int(seg.row), []).append(f"shares query tokens {a}–{b} ({b - a} tokens)")
                        found += 1
                if found >= max_span_rows:
                    break
    positions = np.array(sorted(reasons), dtype=np.int64)
    return Candidates(positions, "filtered", reasons, pool=len(pool))


def row_provenance(source: Any, position: int) -> dict[str, Any]:
    """Step, checkpoint convention and document pieces of the row at ``position``."""
    step = position // source.batch_size
    batch = source.step(step, rows=slice(position - step * source.batch_size, position - step * source.batch_size + 1))
    pieces = [piece.to_dict() for piece in batch.segments[0]] if batch.segments else []
    return {"position": int(position), "step": int(step), "row": int(batch.rows[0]), "segments": pieces}
