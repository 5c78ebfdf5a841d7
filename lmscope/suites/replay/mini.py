"""lmscope's own mini suites: training rows, their document segments and the corpus they came from.

The layout a mini-suite trainer writes (``SUITE_DIR``):

- ``suite.json`` — ``{"format": "lmscope-mini-suite", "batch_size": B, "seq_len": L, "tokens_per_step": …, …}``;
- ``data/train.bin`` + ``data/train.idx`` — a Megatron indexed dataset, one sequence of
  ``L + 1`` tokens per training row, in training order. Optimizer update ``n`` (1-based)
  consumes rows ``[B·(n-1), B·n)``, and checkpoint ``stepN`` holds the weights after updates
  ``1 … N``; so step ``N``'s batch, rows ``[B·N, B·N + B)``, is consumed by update ``N + 1``,
  which turns ``stepN`` into ``step(N+1)`` — Pythia's convention;
- ``data/segments.parquet`` — one record per contiguous piece of a document inside a row:
  ``row`` (int64), ``row_offset`` (int32), ``length`` (int32), ``doc_index`` (int64),
  ``doc_offset`` (int64). Tokens ``row_offset … +length`` of row ``row`` equal tokens
  ``doc_offset … +length`` of document ``doc_index``; positions no record covers (separators)
  belong to no document;
- ``corpus/`` — the :class:`lmscope.data.tokenized.TokenizedCorpus` the rows were cut from
  (``documents.parquet`` gives each ``doc_index`` its ``id`` and ``domain``);
- ``tokenizer/`` (optional) — the suite's tokenizer, used to decode rows and encode text.

``batch_size`` and ``seq_len`` are read from ``suite.json``, or else from ``data/order.json``
(the trainer's record of the data order). A size directory ``SUITE_DIR/SIZE`` names its suite:
every size trains on the same rows.

Both directions are answered from two sorted copies of the segment table built once per
source: by ``(row, row_offset)`` for "what is in this row", by
``(doc_index, row, row_offset)`` for "where was this document trained" — binary searches,
never a scan per query.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmscope.data.megatron import MegatronDataset
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.suites.replay.base import RawRows, ReplaySource, Segment

MINI_SUITE_FORMAT = "lmscope-mini-suite"
SUITE_FILE = "suite.json"
DATA_PREFIX = Path("data") / "train"
SEGMENTS_FILE = Path("data") / "segments.parquet"
CORPUS_DIR = "corpus"
ORDER_FILE = Path("data") / "order.json"
TOKENIZER_DIR = "tokenizer"
SEGMENT_COLUMNS = ("row", "row_offset", "length", "doc_index", "doc_offset")


def mini_suite_root(path: str | os.PathLike[str]) -> Path | None:
    """The mini suite that ``path`` names: itself, or its parent for a size directory ``SUITE_DIR/SIZE``; else ``None``."""
    path = Path(path).expanduser()
    for candidate in (path, path.resolve().parent):
        if candidate.is_dir() and is_mini_suite(candidate):
            return candidate
    return None


def is_mini_suite(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory whose ``suite.json`` says ``"format": "lmscope-mini-suite"``."""
    suite_file = Path(path).expanduser() / SUITE_FILE
    if not suite_file.is_file():
        return False
    try:
        return json.loads(suite_file.read_text(encoding="utf-8")).get("format") == MINI_SUITE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class _Segments:
    """The segment table as int64 columns, in one order."""

    row: np.ndarray
    row_offset: np.ndarray
    length: np.ndarray
    doc_index: np.ndarray
    doc_offset: np.ndarray

    def take(self, order: np.ndarray) -> _Segments:
        return _Segments(*(column[order] for column in (self.row, self.row_offset, self.length, self.doc_index, self.doc_offset)))


class MiniSuiteSource(ReplaySource):
    """A mini suite's training rows, with every row's document segments (see the module docstring).

    Args:
        suite_dir: the suite directory (holding ``suite.json``, ``data/`` and ``corpus/``).
    """

    kind = "mini"

    def __init__(self, suite_dir: str | os.PathLike[str]) -> None:
        self.root = Path(suite_dir).expanduser()
        meta = _read_suite_json(self.root / SUITE_FILE, self.root / ORDER_FILE)
        self.meta = meta
        self.batch_size = meta["batch_size"]
        self.seq_len = meta["seq_len"]
        self.row_length = self.seq_len + 1
        self.dataset = MegatronDataset(self.root / DATA_PREFIX)
        if self.dataset.dtype.kind not in "iu":
            raise LmscopeError(f"{self.dataset.bin_path} holds {self.dataset.dtype} values, not token ids; the suite's data is corrupt.")
        wrong = np.flatnonzero(self.dataset.sizes != self.row_length)
        if len(wrong):
            raise LmscopeError(
                f"{self.dataset.bin_path} row {int(wrong[0])} holds {int(self.dataset.sizes[wrong[0]])} tokens, but suite.json's "
                f"seq_len {self.seq_len} means rows of {self.row_length}; the suite's files do not belong together."
            )
        self.corpus = TokenizedCorpus.open(self.root / CORPUS_DIR)
        self._doc_lengths = self.corpus.documents.column("n_tokens").to_numpy()
        self._ids: np.ndarray | None = None
        self._domains = self.corpus.documents.column("domain").to_numpy(zero_copy_only=False)
        self.by_row = self._load_segments(self.root / SEGMENTS_FILE)
        self._row_keys = self.by_row.row
        self._by_doc: _Segments | None = None

    @property
    def tokenizer_path(self) -> Path | None:
        """The suite's own tokenizer directory, when it has one."""
        path = self.root / TOKENIZER_DIR
        return path if path.is_dir() and any(path.iterdir()) else None

    # --- ReplaySource -------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    @property
    def num_steps(self) -> int:
        return self.num_rows // self.batch_size

    def describe(self) -> str:
        return f"the mini suite {str(self.root)!r}"

    def _read(self, step: int, start: int, stop: int) -> RawRows:
        rows = np.arange(self.batch_size * step + start, self.batch_size * step + stop, dtype=np.int64)
        tokens = np.empty((len(rows), self.row_length), dtype=self.dataset.dtype)
        for i, row in enumerate(rows.tolist()):
            tokens[i] = self.dataset.get(row)
        return RawRows(positions=rows.copy(), rows=rows, tokens=tokens)

    def _segments(self, raw: RawRows) -> list[list[Segment]]:
        lo = np.searchsorted(self._row_keys, raw.rows, side="left")
        hi = np.searchsorted(self._row_keys, raw.rows, side="right")
        return [[self._segment(self.by_row, k) for k in range(a, b)] for a, b in zip(lo.tolist(), hi.tolist())]

    def segment_at(self, row: int, offset: int) -> Segment | None:
        lo = int(np.searchsorted(self._row_keys, row, side="left"))
        hi = int(np.searchsorted(self._row_keys, row, side="right"))
        starts = self.by_row.row_offset[lo:hi]
        k = lo + int(np.searchsorted(starts, offset, side="right")) - 1
        if k < lo or offset >= self.by_row.row_offset[k] + self.by_row.length[k]:
            return None
        return self._segment(self.by_row, k)

    # --- documents ----------------------------------------------------------------------------

    @property
    def num_documents(self) -> int:
        return len(self.corpus)

    def doc_id(self, doc_index: int) -> str:
        return str(self._id_column()[doc_index])

    def document(self, doc_index: int) -> dict[str, Any]:
        """``{doc_index, doc_id, domain, split, n_tokens}`` of a corpus document."""
        self._check_doc_index(doc_index)
        row = self.corpus.documents.slice(doc_index, 1).to_pylist()[0]
        return {"doc_index": doc_index, "doc_id": row["id"], "domain": row["domain"], "split": row["split"], "n_tokens": row["n_tokens"]}

    def doc_index_of(self, doc_id: str) -> int:
        """The ``doc_index`` of the document with id ``doc_id``; :class:`LmscopeError` naming the nearest ids if none."""
        ids = self.corpus.documents.column("id")
        found = pc.index(ids, pa.scalar(doc_id, pa.string())).as_py()
        if found is not None and found >= 0:
            return int(found)
        nearest = _nearest_ids(doc_id, self._id_column())
        hint = f"; the nearest ids are {', '.join(repr(n) for n in nearest)}" if nearest else ""
        raise LmscopeError(f"document id {doc_id!r} is not in {self.corpus.path} ({len(self.corpus)} documents){hint}.")

    def document_segments(self, doc_index: int) -> list[Segment]:
        """Every piece of document ``doc_index`` inside a training row, in training order (row, then offset)."""
        self._check_doc_index(doc_index)
        by_doc = self._doc_sorted()
        lo = int(np.searchsorted(by_doc.doc_index, doc_index, side="left"))
        hi = int(np.searchsorted(by_doc.doc_index, doc_index, side="right"))
        return [self._segment(by_doc, k) for k in range(lo, hi)]

    def _check_doc_index(self, doc_index: int) -> None:
        if isinstance(doc_index, bool) or not isinstance(doc_index, (int, np.integer)) or not 0 <= doc_index < len(self.corpus):
            raise LmscopeError(f"document index {doc_index!r} is out of range; {self.corpus.path} holds documents 0 … {len(self.corpus) - 1}.")

    def _id_column(self) -> np.ndarray:
        if self._ids is None:
            self._ids = self.corpus.documents.column("id").to_numpy(zero_copy_only=False)
        return self._ids

    def _doc_sorted(self) -> _Segments:
        if self._by_doc is None:
            order = np.lexsort((self.by_row.row_offset, self.by_row.row, self.by_row.doc_index))
            self._by_doc = self.by_row.take(order)
        return self._by_doc

    def _segment(self, table: _Segments, k: int) -> Segment:
        doc = int(table.doc_index[k])
        doc_offset = int(table.doc_offset[k])
        length = int(table.length[k])
        return Segment(
            row=int(table.row[k]),
            row_offset=int(table.row_offset[k]),
            length=length,
            doc_index=doc,
            doc_offset=doc_offset,
            doc_id=self.doc_id(doc),
            domain=str(self._domains[doc]),
            ends_document=doc_offset + length == int(self._doc_lengths[doc]),
        )

    def _load_segments(self, path: Path) -> _Segments:
        if not path.is_file():
            raise LmscopeError(f"{path} is missing, so the documents of {self.root}'s rows are unknown; rerun the trainer's data step.")
        try:
            table = pq.read_table(path, columns=list(SEGMENT_COLUMNS))
        except (pa.ArrowException, OSError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LmscopeError(f"{path} could not be read with columns {', '.join(SEGMENT_COLUMNS)} ({first}); rerun the trainer's data step.") from None
        columns = []
        for name in SEGMENT_COLUMNS:
            column = table.column(name)
            if not pa.types.is_integer(column.type) or column.null_count:
                raise LmscopeError(f"{path} column {name} is {column.type}{' with nulls' if column.null_count else ''}; it must hold integers.")
            columns.append(column.to_numpy().astype(np.int64, copy=False))
        segments = _Segments(*columns)
        n_docs = len(self.corpus)
        doc_ok = (segments.doc_index >= 0) & (segments.doc_index < n_docs)
        doc_len = np.where(doc_ok, self._doc_lengths[np.clip(segments.doc_index, 0, max(n_docs - 1, 0))] if n_docs else 0, 0)
        ok = (
            (segments.row >= 0)
            & (segments.row < self.num_rows)
            & (segments.row_offset >= 0)
            & (segments.length > 0)
            & (segments.row_offset + segments.length <= self.row_length)
            & doc_ok
            & (segments.doc_offset >= 0)
            & (segments.doc_offset + segments.length <= doc_len)
        )
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            raise LmscopeError(
                f"{path} record {k} (row {segments.row[k]}, row_offset {segments.row_offset[k]}, length {segments.length[k]}, "
                f"doc_index {segments.doc_index[k]}, doc_offset {segments.doc_offset[k]}) lies outside the {self.num_rows} rows "
                f"of {self.row_length} tokens or its document in {self.corpus.path}; the suite's files do not belong together."
            )
        order = np.lexsort((segments.row_offset, segments.row))
        if np.any(np.diff(order) != 1):
            segments = segments.take(order)
        return segments


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LmscopeError(f"{path} is not valid JSON ({err}); fix or re-create the suite.") from None


def _read_suite_json(path: Path, order_path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LmscopeError(f"{path} is missing; a mini suite directory holds suite.json, data/ and corpus/.")
    meta = _read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != MINI_SUITE_FORMAT:
        raise LmscopeError(f"{path} does not say \"format\": \"{MINI_SUITE_FORMAT}\"; it is not a mini suite.")
    where = path
    if any(key not in meta for key in ("batch_size", "seq_len")) and order_path.is_file():
        order = _read_json(order_path)
        if isinstance(order, dict):
            meta = {key: order.get(key) for key in ("batch_size", "seq_len")} | meta
            where = order_path
    for key in ("batch_size", "seq_len"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LmscopeError(f"{where}: {key} must be a positive integer, not {value!r}.")
    return meta


def _nearest_ids(wanted: str, ids: np.ndarray, n: int = 3) -> list[str]:
    """Ids spelled most like ``wanted`` (over at most the 20,000 ids around it in sorted order)."""
    if len(ids) == 0:
        return []
    ordered = np.sort(ids.astype(str))
    at = int(np.searchsorted(ordered, wanted))
    window = ordered[max(0, at - 10_000) : at + 10_000].tolist()
    close = difflib.get_close_matches(wanted, window, n=n, cutoff=0.5)
    if close:
        return close
    return ordered[max(0, at - 1) : at + 2].tolist()[:n]
