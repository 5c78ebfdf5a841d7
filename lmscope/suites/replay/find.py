"""The reverse question: at which steps were this document, these tokens of it, or this token sequence trained?

- :func:`find_document` answers from a source's document table (mini suites): binary
  searches in the segment table sorted by document, no scan.
- :func:`find_tokens` scans rows for an exact token sequence, for any source (Pythia, OLMo and
  Amber carry no document ids). It streams the steps asked for and is brute force: a full
  Pythia pass reads ~600 GB. The suffix-array index of a later issue (``lmscope.index``)
  will answer the same question without a scan. A sequence is found only within one row:
  rows are separate training examples, so a match across two rows was never seen whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress
from lmscope.suites.replay.base import ReplaySource, Segment
from lmscope.suites.replay.mini import MiniSuiteSource


@dataclass(frozen=True)
class Exposure:
    """One training exposure of (part of) a document: a piece of it inside one row.

    Attributes:
        step: the step whose batch holds the row (see :data:`lmscope.suites.replay.STEP_CONVENTION`).
        position: the row's position in the training order.
        row: the row's index in the data.
        row_offset: where the piece starts in the row.
        doc_offset: where the piece starts in the document.
        length: tokens in the piece.
    """

    step: int
    position: int
    row: int
    row_offset: int
    doc_offset: int
    length: int


@dataclass
class DocumentExposures:
    """Every exposure of a document (or of tokens ``[start, stop)`` of it) during training.

    Attributes:
        doc_index, doc_id, domain, split, n_tokens: the document.
        token_range: the tokens asked about, ``(start, stop)``; the whole document by default.
        exposures: the pieces trained on, clipped to ``token_range``, in training order.
        untrained_rows: pieces in rows past the last complete step (written, never trained).
    """

    doc_index: int
    doc_id: str
    domain: str
    split: str
    n_tokens: int
    token_range: tuple[int, int]
    exposures: list[Exposure] = field(default_factory=list)
    untrained_rows: int = 0

    @property
    def steps(self) -> list[int]:
        """The distinct steps, ascending."""
        return sorted({exposure.step for exposure in self.exposures})

    @property
    def first_step(self) -> int | None:
        """The first step whose batch holds any of the tokens; ``None`` if never trained."""
        return self.exposures[0].step if self.exposures else None

    @property
    def tokens_covered(self) -> int:
        """How many tokens of ``token_range`` were trained at least once."""
        spans = sorted((e.doc_offset, e.doc_offset + e.length) for e in self.exposures)
        covered, end = 0, -1
        for a, b in spans:
            if b > end:
                covered += b - max(a, end)
                end = b
        return covered

    @property
    def first_full_step(self) -> int | None:
        """The step by whose end every token of ``token_range`` had been trained at least once, or ``None``."""
        start, stop = self.token_range
        seen = np.zeros(stop - start, dtype=bool)
        for exposure in self.exposures:
            seen[exposure.doc_offset - start : exposure.doc_offset - start + exposure.length] = True
            if seen.all():
                return exposure.step
        return None if len(seen) else self.first_step

    def to_dict(self) -> dict[str, Any]:
        return {
            "doc_index": self.doc_index,
            "doc_id": self.doc_id,
            "domain": self.domain,
            "split": self.split,
            "n_tokens": self.n_tokens,
            "token_range": list(self.token_range),
            "first_step": self.first_step,
            "first_full_step": self.first_full_step,
            "steps": self.steps,
            "tokens_covered": self.tokens_covered,
            "untrained_rows": self.untrained_rows,
            "exposures": [asdict(exposure) for exposure in self.exposures],
        }


def find_document(
    source: ReplaySource,
    doc_id: str | None = None,
    *,
    doc_index: int | None = None,
    token_range: tuple[int, int] | slice | None = None,
) -> DocumentExposures:
    """Every step at which a document's tokens (all, or ``token_range`` of them) were trained.

    Args:
        source: a source with a document table (a mini suite).
        doc_id: the document's id in the suite's corpus; or give ``doc_index``.
        doc_index: the document's index in the corpus.
        token_range: ``(start, stop)`` token positions inside the document (stop excluded; a
            ``slice`` works too); by default the whole document.
    """
    if not isinstance(source, MiniSuiteSource):
        raise LmscopeError(
            f"{source.describe()} carries no document ids, so documents cannot be looked up; search for their tokens "
            "instead (find_tokens, or `lmscope replay find --token-ids …` / `--text …`)."
        )
    if (doc_id is None) == (doc_index is None):
        raise LmscopeError("name the document by exactly one of its id (DOC_ID) or its index (--doc-index).")
    index = source.doc_index_of(doc_id) if doc_id is not None else int(doc_index)  # type: ignore[arg-type]
    info = source.document(index)
    start, stop = _token_range(token_range, info["n_tokens"], info["doc_id"])
    exposures, untrained = [], 0
    for piece in source.document_segments(index):
        a = max(piece.doc_offset, start)  # type: ignore[type-var]
        b = min(piece.doc_offset + piece.length, stop)  # type: ignore[operator]
        if a >= b:
            continue
        step = piece.row // source.batch_size
        if step >= source.num_steps:
            untrained += 1
            continue
        shift = a - piece.doc_offset  # type: ignore[operator]
        exposures.append(Exposure(step, piece.row, piece.row, piece.row_offset + shift, a, b - a))
    return DocumentExposures(
        doc_index=index,
        doc_id=info["doc_id"],
        domain=info["domain"],
        split=info["split"],
        n_tokens=info["n_tokens"],
        token_range=(start, stop),
        exposures=exposures,
        untrained_rows=untrained,
    )


def _token_range(token_range: tuple[int, int] | slice | None, n_tokens: int, doc_id: str) -> tuple[int, int]:
    if token_range is None:
        return 0, n_tokens
    if isinstance(token_range, slice):
        start = 0 if token_range.start is None else token_range.start
        stop = n_tokens if token_range.stop is None else token_range.stop
    else:
        start, stop = token_range
    if not 0 <= start < stop <= n_tokens:
        raise LmscopeError(
            f"token range {start}:{stop} is not inside document {doc_id!r} of {n_tokens} tokens; give 0 ≤ A < B ≤ {n_tokens}."
        )
    return int(start), int(stop)


@dataclass(frozen=True)
class TokenMatch:
    """One occurrence of the searched sequence inside a training row.

    Attributes:
        step, position, row: the row (as in :class:`Exposure`).
        row_offset: where the sequence starts in the row.
        origin: where the row was read (OLMo, Amber), else ``None``.
        segment: the document piece holding the sequence's first token, when the source knows documents.
    """

    step: int
    position: int
    row: int
    row_offset: int
    origin: str | None = None
    segment: Segment | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "position": self.position, "row": self.row, "row_offset": self.row_offset}
        if self.origin is not None:
            out["origin"] = self.origin
        if self.segment is not None:
            doc_offset = None if self.segment.doc_offset is None else self.segment.doc_offset + self.row_offset - self.segment.row_offset
            out.update(doc_index=self.segment.doc_index, doc_id=self.segment.doc_id, domain=self.segment.domain, doc_offset=doc_offset)
        return out


@dataclass
class TokenSearch:
    """The result of :func:`find_tokens`.

    Attributes:
        token_ids: the sequence searched for.
        steps: the steps scanned (a range).
        rows_scanned: rows read.
        matches: every occurrence, in training order (up to ``limit``).
        truncated: the scan stopped at ``limit`` matches.
    """

    token_ids: list[int]
    steps: range
    rows_scanned: int
    matches: list[TokenMatch]
    truncated: bool = False

    @property
    def first_step(self) -> int | None:
        return self.matches[0].step if self.matches else None

    @property
    def match_steps(self) -> list[int]:
        return sorted({match.step for match in self.matches})

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "steps_scanned": [self.steps.start, self.steps.stop],
            "rows_scanned": self.rows_scanned,
            "first_step": self.first_step,
            "steps": self.match_steps,
            "truncated": self.truncated,
            "matches": [match.to_dict() for match in self.matches],
        }


def match_offsets(tokens: np.ndarray, pattern: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(row, offset)`` where ``pattern`` occurs inside a row of the 2-D ``tokens``, in row-major order."""
    n, width = tokens.shape
    m = len(pattern)
    if m > width or n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    last = width - m + 1
    hits = tokens[:, :last] == pattern[0]
    for k in range(1, m):
        if not hits.any():
            break
        hits &= tokens[:, k : k + last] == pattern[k]
    rows, offsets = np.nonzero(hits)
    return rows.astype(np.int64), offsets.astype(np.int64)


def find_tokens(
    source: ReplaySource,
    token_ids: list[int] | np.ndarray,
    steps: range | None = None,
    *,
    limit: int | None = None,
    progress: Progress = no_progress,
) -> TokenSearch:
    """Every step (row, offset) whose rows contain ``token_ids`` exactly, by streaming the rows of ``steps``.

    Args:
        source: any replay source.
        token_ids: the sequence (at least one id, at most a row long).
        steps: the steps to scan (default: all of them).
        limit: stop after this many matches (``None``: all).
        progress: receives ``("scan", rows)`` reports, with ``matches=``.
    """
    pattern = np.asarray(list(token_ids), dtype=np.int64)
    if pattern.ndim != 1 or len(pattern) == 0:
        raise LmscopeError("the token sequence to find is empty; give at least one token id.")
    if len(pattern) > source.row_length:
        raise LmscopeError(f"the token sequence has {len(pattern)} ids, longer than a row ({source.row_length}); search for a part of it.")
    if pattern.min() < 0:
        raise LmscopeError("token ids are non-negative integers; check the sequence to find.")
    if steps is None:
        steps = range(source.num_steps)
    if steps.step != 1:
        raise LmscopeError(f"the steps to scan {steps} have a stride; give a contiguous range A:B.")
    if len(steps):
        source.check_step(steps.start)
        source.check_step(steps.stop - 1)
    matches: list[TokenMatch] = []
    scanned = 0
    total_rows = len(steps) * source.batch_size
    for step in steps:
        for block in source.iter_tokens(step):
            scanned += len(block.rows)
            found_rows, offsets = match_offsets(block.tokens, pattern.astype(block.tokens.dtype) if _fits(pattern, block.tokens.dtype) else pattern)
            for i, offset in zip(found_rows.tolist(), offsets.tolist()):
                row = int(block.rows[i])
                matches.append(
                    TokenMatch(
                        step=step,
                        position=int(block.positions[i]),
                        row=row,
                        row_offset=offset,
                        origin=None if block.origins is None else block.origins[i],
                        segment=source.segment_at(row, offset),
                    )
                )
                if limit is not None and len(matches) >= limit:
                    progress("scan", advance=len(block.rows), total=total_rows, matches=len(matches))
                    return TokenSearch(pattern.tolist(), steps, scanned, matches, truncated=True)
            progress("scan", advance=len(block.rows), total=total_rows, matches=len(matches))
    return TokenSearch(pattern.tolist(), steps, scanned, matches)


def _fits(pattern: np.ndarray, dtype: np.dtype) -> bool:
    if np.dtype(dtype).kind not in "iu":
        return False
    info = np.iinfo(dtype)
    return bool(pattern.min() >= info.min and pattern.max() <= info.max)
