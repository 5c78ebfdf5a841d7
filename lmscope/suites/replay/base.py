"""What every replay source shares: the step convention, a batch of rows, document segments.

A source is a training run's data in training order, cut into *steps*. See the package
docstring (:mod:`lmscope.suites.replay`) for the one step convention all sources follow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lmscope.errors import LmscopeError

STEP_CONVENTION = (
    "step N is the batch consumed by the optimizer update that turns checkpoint stepN into "
    "step(N+1) (Pythia's convention: rows [B·N, B·N+B) of the training order); "
    "checkpoint stepN has seen rows [0, B·N)"
)
"""The step convention in one line, for help texts and JSON output."""


@dataclass(frozen=True)
class Segment:
    """A contiguous piece of one document inside one row.

    Attributes:
        row: the row's index in the source's data (see :attr:`StepBatch.rows`).
        row_offset: where the piece starts in the row (token position).
        length: number of tokens.
        doc_index: the document's index in the source's corpus, when the source knows it
            (mini suites); ``None`` otherwise.
        doc_offset: where the piece starts inside its document, when known: always for mini
            suites; 0 for an EOS-delimited piece that starts right after an EOS in the same
            row (a document start); ``None`` when the piece may continue a document begun
            elsewhere.
        doc_id: the document's id (mini suites), else ``None``.
        domain: the document's domain (mini suites), the row's ``source`` (Amber), else ``None``.
        ends_document: the piece ends with the EOS token (EOS-delimited sources), or ends
            at its document's last token (mini suites); ``False`` when not known to end one.
    """

    row: int
    row_offset: int
    length: int
    doc_index: int | None = None
    doc_offset: int | None = None
    doc_id: str | None = None
    domain: str | None = None
    ends_document: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "row_offset": self.row_offset,
            "length": self.length,
            "doc_index": self.doc_index,
            "doc_offset": self.doc_offset,
            "doc_id": self.doc_id,
            "domain": self.domain,
            "ends_document": self.ends_document,
        }


@dataclass
class StepBatch:
    """Rows of one training step, in the order the batch holds them.

    Attributes:
        source: the source's kind (``mini``, ``pythia``, ``olmo``, ``amber``).
        step: the step (see :data:`STEP_CONVENTION`).
        rows_in_step: rows in the whole batch of this step (for Amber the nominal rows per chunk).
        start: index, within the step's batch, of the first row here (``rows=`` selects a part).
        positions: int64 ``[n]``, each row's position in the training order (``step · B + i``;
            for Amber ``chunk · rows_per_chunk + line``).
        rows: int64 ``[n]``, each row's index in the source's data: the Megatron sequence index
            (mini suite, Pythia), the instance index into the concatenated token files (OLMo:
            ``global_indices[position]``), the line number inside the chunk file (Amber).
        tokens: ``[n, row_length]`` token ids (the data's dtype): ``seq_len + 1`` tokens for
            the mini suite, Pythia and Amber, ``seq_len`` for OLMo (its instances are
            ``seq_len`` long and train on ``seq_len - 1`` next-token targets).
        segments: per row, the document pieces it holds, in row order (empty where unknown).
        origins: per row, where it was read (``file:index``), or ``None``.
    """

    source: str
    step: int
    rows_in_step: int
    start: int
    positions: np.ndarray
    rows: np.ndarray
    tokens: np.ndarray
    segments: list[list[Segment]] = field(default_factory=list)
    origins: list[str] | None = None

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def row_length(self) -> int:
        return int(self.tokens.shape[1]) if self.tokens.ndim == 2 else 0

    def documents(self) -> list[dict[str, Any]]:
        """Documents with a known index or id in this batch: index, id, domain, tokens, pieces, first position.

        Sorted by first appearance in the batch.
        """
        found: dict[Any, dict[str, Any]] = {}
        for position, pieces in zip(self.positions.tolist(), self.segments):
            for piece in pieces:
                key = piece.doc_index if piece.doc_index is not None else piece.doc_id
                if key is None:
                    continue
                entry = found.setdefault(
                    key,
                    {"doc_index": piece.doc_index, "doc_id": piece.doc_id, "domain": piece.domain, "tokens": 0, "pieces": 0, "first_position": position},
                )
                entry["tokens"] += piece.length
                entry["pieces"] += 1
        return list(found.values())

    def domains(self) -> dict[str, int]:
        """Tokens per domain over the segments that name one, largest first."""
        counts: dict[str, int] = {}
        for pieces in self.segments:
            for piece in pieces:
                if piece.domain is not None:
                    counts[piece.domain] = counts.get(piece.domain, 0) + piece.length
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def to_dict(self, include_tokens: bool = False) -> dict[str, Any]:
        """JSON-ready: step, counts, and per row its position, data row, origin, segments (and token ids)."""
        rows = []
        for i in range(len(self)):
            row: dict[str, Any] = {"position": int(self.positions[i]), "row": int(self.rows[i])}
            if self.origins is not None:
                row["origin"] = self.origins[i]
            row["segments"] = [piece.to_dict() for piece in (self.segments[i] if self.segments else [])]
            if include_tokens:
                row["tokens"] = self.tokens[i].tolist()
            rows.append(row)
        return {
            "source": self.source,
            "step": self.step,
            "convention": STEP_CONVENTION,
            "rows_in_step": self.rows_in_step,
            "row_range": [self.start, self.start + len(self)],
            "row_length": self.row_length,
            "rows": rows,
            "documents": self.documents(),
            "domains": self.domains(),
        }


@dataclass
class RawRows:
    """Rows as a source reads them, before segments are attached (internal to the sources)."""

    positions: np.ndarray
    rows: np.ndarray
    tokens: np.ndarray
    origins: list[str] | None = None
    row_domains: list[str] | None = None


def parse_row_range(text: str, what: str = "--rows") -> slice:
    """``"A:B"``, ``"A:"``, ``":B"`` or ``"A"`` (just row A) as a slice of non-negative integers."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            start = int(parts[0])
            return slice(start, start + 1) if start >= 0 else _bad_range(text, what)
        if len(parts) == 2:
            start = int(parts[0]) if parts[0].strip() else 0
            stop = int(parts[1]) if parts[1].strip() else None
            if start < 0 or (stop is not None and stop < start):
                return _bad_range(text, what)
            return slice(start, stop)
    except ValueError:
        pass
    return _bad_range(text, what)


def _bad_range(text: str, what: str) -> slice:
    raise LmscopeError(f"{what} {text!r} is not a range; write A:B (from A up to, not including, B), A:, :B or A, with 0 ≤ A ≤ B.")


def eos_segments(row: int, tokens: np.ndarray, eos_token_id: int | None, domain: str | None = None) -> list[Segment]:
    """Cut one row at its EOS tokens: each piece ends with an EOS (kept in the piece) or at the row's end.

    A piece that follows an EOS in the same row starts a document (``doc_offset=0``); the
    row's first piece may continue a document from elsewhere (``doc_offset=None``). With no
    ``eos_token_id`` the whole row is one piece.
    """
    length = int(tokens.shape[0])
    if length == 0:
        return []
    if eos_token_id is None:
        return [Segment(row, 0, length, domain=domain)]
    ends = np.flatnonzero(tokens == eos_token_id).tolist()
    pieces: list[Segment] = []
    start = 0
    for end in ends:
        pieces.append(Segment(row, start, end + 1 - start, doc_offset=0 if start > 0 else None, domain=domain, ends_document=True))
        start = end + 1
    if start < length:
        pieces.append(Segment(row, start, length - start, doc_offset=0 if start > 0 else None, domain=domain))
    return pieces


class ReplaySource(ABC):
    """A training run's data in training order, cut into steps.

    Subclasses read their own format; this class turns step numbers into row ranges,
    validates them, and attaches document segments. Every subclass has
    :attr:`batch_size` rows per step, rows of :attr:`row_length` tokens, and
    :attr:`num_steps` steps numbered ``0 … num_steps - 1`` (see :data:`STEP_CONVENTION`).

    Attributes:
        kind: ``mini``, ``pythia``, ``olmo`` or ``amber``.
        batch_size: rows per step (for Amber, the nominal rows per data chunk).
        row_length: tokens per row.
        eos_token_id: the token that ends documents, used to cut rows into segments when
            the source has no document table; ``None`` leaves each row whole.
    """

    kind: ClassVar[str]
    batch_size: int
    row_length: int
    eos_token_id: int | None = None

    @property
    @abstractmethod
    def num_steps(self) -> int:
        """Number of steps the data holds (steps are ``0 … num_steps - 1``)."""

    @abstractmethod
    def describe(self) -> str:
        """A few words naming the source and its location, for messages."""

    @abstractmethod
    def _read(self, step: int, start: int, stop: int) -> RawRows:
        """Rows ``start … stop-1`` of step ``step``'s batch (already validated)."""

    def checkpoints_around(self, step: int) -> tuple[str, str]:
        """The checkpoints before and after ``step``'s batch: ``("step{N}", "step{N+1}")`` for every source but Amber."""
        return f"step{step}", f"step{step + 1}"

    def rows_in_step(self, step: int) -> int:
        """Rows in the batch of ``step`` (the same for every step here)."""
        return self.batch_size

    def positions(self, step: int) -> range:
        """Training-order positions of the rows of ``step``'s batch: ``[B·step, B·step + B)``."""
        self.check_step(step)
        return range(self.batch_size * step, self.batch_size * (step + 1))

    def seen_before(self, step: int) -> range:
        """Training-order positions of every row that checkpoint ``step{step}`` has been trained on: ``[0, B·step)``.

        ``step`` may equal :attr:`num_steps` (everything in the data).
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= self.num_steps:
            raise LmscopeError(f"checkpoint step {step!r} is outside {self.describe()}, whose checkpoints are step0 … step{self.num_steps}.")
        return range(0, self.batch_size * int(step))

    def check_step(self, step: int) -> int:
        """``step`` as an int, or :class:`LmscopeError` saying how many steps exist."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise LmscopeError(f"step {step!r} is not an integer; give a step from 0 to {self.num_steps - 1}.")
        step = int(step)
        if self.num_steps == 0:
            raise LmscopeError(f"{self.describe()} holds no complete step of {self.batch_size} rows; check the data and the batch size.")
        if not 0 <= step < self.num_steps:
            raise LmscopeError(
                f"step {step} is beyond {self.describe()}, which holds {self.num_steps} steps (0 … {self.num_steps - 1}) "
                f"of {self.batch_size} rows; give a step in that range."
            )
        return step

    def step(self, step: int, rows: slice | None = None) -> StepBatch:
        """The rows of ``step``'s batch (all of them, or the part ``rows`` selects) with their segments.

        Args:
            step: the step, ``0 … num_steps - 1``.
            rows: a slice of the batch (``slice(A, B)``: rows A … B-1 of the batch; no step).
        """
        step = self.check_step(step)
        start, stop = self._select(step, rows)
        raw = self._read(step, start, stop)
        return StepBatch(
            source=self.kind,
            step=step,
            rows_in_step=self.rows_in_step(step),
            start=start,
            positions=raw.positions,
            rows=raw.rows,
            tokens=raw.tokens,
            segments=self._segments(raw),
            origins=raw.origins,
        )

    def iter_tokens(self, step: int, block_rows: int = 4096) -> Iterator[RawRows]:
        """The rows of ``step``'s batch in blocks of at most ``block_rows``, without segments (for scans)."""
        step = self.check_step(step)
        total = self.rows_in_step(step)
        for start in range(0, total, block_rows):
            raw = self._read(step, start, min(start + block_rows, total))
            if len(raw.rows) == 0:
                return
            yield raw

    def segment_at(self, row: int, offset: int) -> Segment | None:
        """The document segment covering token ``offset`` of data row ``row``, when the source has a document table."""
        return None

    def _select(self, step: int, rows: slice | None) -> tuple[int, int]:
        total = self.rows_in_step(step)
        if rows is None:
            return 0, total
        if rows.step not in (None, 1):
            raise LmscopeError(f"row selection {rows} has a stride; select a contiguous range A:B.")
        start = 0 if rows.start is None else int(rows.start)
        stop = total if rows.stop is None else int(rows.stop)
        if start < 0 or stop < start:
            raise LmscopeError(f"row selection {start}:{stop} is not a range; give 0 ≤ A ≤ B.")
        if start >= total:
            raise LmscopeError(f"row selection {start}:{stop} starts beyond step {step}'s batch of {total} rows; give A below {total}.")
        return start, min(stop, total)

    def _segments(self, raw: RawRows) -> list[list[Segment]]:
        domains = raw.row_domains or [None] * len(raw.rows)
        return [eos_segments(int(row), tokens, self.eos_token_id, domain) for row, tokens, domain in zip(raw.rows, raw.tokens, domains)]
