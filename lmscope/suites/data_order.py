"""The data order of a mini suite: training rows, in the order they are trained, and where every token came from.

How rows are built (all of it a pure function of the corpus, ``seq_len``, the number of
rows and ``data_seed``):

1. **Documents.** The train-split documents of the tokenized corpus (empty ones skipped)
   are put in a shuffled order (:func:`permutation` with purpose ``documents``).
2. **Packing.** In that order they are concatenated into one token stream, each document
   followed by one ``<|endoftext|>`` token (so every document, the first one included, is
   trained from the same EOS context an evaluation gives it, except the very first, which
   starts the stream).
3. **Rows.** The stream is cut into *packed rows* of ``seq_len + 1`` tokens that overlap by
   one token, as Megatron/GPT-NeoX samples do: packed row ``k`` is
   ``stream[k·seq_len : k·seq_len + seq_len + 1]``. A row's last token is the next row's
   first, so within an epoch every stream token after the first is a prediction target
   exactly once. The tail that does not fill a row is dropped.
4. **Order.** Epoch ``e`` trains the packed rows in the order :func:`permutation` gives
   for purpose ``rows`` and epoch ``e``; epochs follow each other until the run has the rows
   it needs (``steps × batch_size``); usually that is part of the first epoch.

Files (in ``SUITE_DIR/data/``):

- ``train.bin`` / ``train.idx`` — a Megatron indexed dataset (uint16 ids when the vocabulary
  fits), one sequence of ``seq_len + 1`` tokens per training row, **in training order**:
  rows ``[batch_size·(n−1), batch_size·n)`` are consumed by optimizer update ``n``.
- ``segments.parquet`` — one row per contiguous piece of a document inside a training row:
  ``row`` (int64), ``row_offset`` (int32), ``length`` (int32), ``doc_index`` (int64, into
  ``corpus/documents.parquet``), ``doc_offset`` (int64, token offset in the document);
  sorted by ``(row, row_offset)``. Row positions covered by no segment hold ``<|endoftext|>``.
- ``order.json`` — the recipe above as data: seeds, sizes, the document order and the
  permutation (``permutation[r]`` is the packed row that training row ``r`` holds).

Permutations are computed from sha256, not from a random generator, so they are the same
on every machine and every NumPy version.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmscope.data.megatron import MegatronDataset, write_megatron_dataset
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_directory
from lmscope.progress import Progress, no_progress

ORDER_FORMAT = "lmscope-data-order"
ORDER_VERSION = 1
TRAIN_PREFIX = "train"
SEGMENTS_FILE = "segments.parquet"
ORDER_FILE = "order.json"

SEGMENT_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("row_offset", pa.int32(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("doc_index", pa.int64(), nullable=False),
        pa.field("doc_offset", pa.int64(), nullable=False),
    ]
)

ROW_OF_STEP = (
    "rows [batch_size*(n-1), batch_size*n) are consumed by optimizer update n; "
    "checkpoint stepN holds weights after updates 1..n"
)
PACKING = (
    "train-split documents (empty ones skipped) in a shuffled order, each followed by one EOS token, "
    "concatenated; cut into packed rows of seq_len+1 tokens overlapping by one token "
    "(packed row k = stream[k*seq_len : k*seq_len+seq_len+1]); the tail shorter than a row is dropped"
)
SHUFFLE_METHOD = (
    "items sorted by sha256(f'lmscope-data-order-v1:{purpose}:{data_seed}:{epoch}:{i}') (first 8 bytes, big-endian), "
    "ties by i; purpose 'documents' (epoch 0) orders documents, purpose 'rows' orders packed rows in each epoch"
)


def permutation(n: int, seed: int, purpose: str, epoch: int = 0) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on its arguments (see :data:`SHUFFLE_METHOD`)."""
    prefix = f"lmscope-data-order-v1:{purpose}:{seed}:{epoch}:".encode()
    keys = np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + str(i).encode()).digest()[:8], "big") for i in range(n)),
        dtype=np.uint64,
        count=n,
    )
    return np.argsort(keys, kind="stable").astype(np.int64)


@dataclass(frozen=True)
class Packing:
    """The train documents packed into one stream and cut into overlapping rows.

    Attributes:
        documents: doc indices in stream order.
        starts: stream offset of each document's first token (same order).
        lengths: tokens of each document (without its EOS).
        stream: the packed token stream (documents with an EOS after each).
        seq_len: tokens predicted per row (a row holds ``seq_len + 1``).
    """

    documents: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    stream: np.ndarray
    seq_len: int

    @property
    def n_rows(self) -> int:
        """Number of packed rows."""
        return max((len(self.stream) - 1) // self.seq_len, 0)

    def row(self, k: int) -> np.ndarray:
        """Packed row ``k``: ``seq_len + 1`` tokens."""
        start = k * self.seq_len
        return self.stream[start : start + self.seq_len + 1]

    def segments(self) -> dict[str, np.ndarray]:
        """Every piece of a document in a packed row: arrays ``row, row_offset, length, doc_index, doc_offset``."""
        L, rows = self.seq_len, self.n_rows
        out: dict[str, list[int]] = {name: [] for name in SEGMENT_SCHEMA.names}
        for doc, start, length in zip(self.documents.tolist(), self.starts.tolist(), self.lengths.tolist()):
            end = start + length
            # packed row k holds stream positions [k*L, k*L + L]
            for k in range(max(0, -(-start // L) - 1), min(rows - 1, (end - 1) // L) + 1):
                lo, hi = max(start, k * L), min(end, k * L + L + 1)
                if hi > lo:
                    out["row"].append(k)
                    out["row_offset"].append(lo - k * L)
                    out["length"].append(hi - lo)
                    out["doc_index"].append(doc)
                    out["doc_offset"].append(lo - start)
        return {name: np.asarray(values, dtype=SEGMENT_SCHEMA.field(name).type.to_pandas_dtype()) for name, values in out.items()}


def pack_documents(corpus: TokenizedCorpus, seq_len: int, eos_token_id: int, data_seed: int) -> Packing:
    """Steps 1–3 of the module docstring."""
    train = corpus.select(split="train")
    offsets = corpus.documents.column("token_offset").to_numpy()
    lengths_all = corpus.documents.column("n_tokens").to_numpy()
    train = train[lengths_all[train] > 0]
    if len(train) == 0:
        raise LmscopeError(f"{corpus.path} has no non-empty train-split document; give a corpus with more documents.")
    order = train[permutation(len(train), data_seed, "documents")]
    lengths = lengths_all[order].astype(np.int64)
    starts = np.zeros(len(order), dtype=np.int64)
    np.cumsum(lengths[:-1] + 1, out=starts[1:])
    stream = np.empty(int(lengths.sum()) + len(order), dtype=corpus.dtype)
    for doc, start, length in zip(order.tolist(), starts.tolist(), lengths.tolist()):
        begin = int(offsets[doc])
        stream[start : start + length] = corpus.tokens[begin : begin + length]
        stream[start + length] = eos_token_id
    return Packing(documents=order, starts=starts, lengths=lengths, stream=stream, seq_len=seq_len)


def training_permutation(n_packed: int, n_rows: int, data_seed: int) -> np.ndarray:
    """Step 4: for each of the ``n_rows`` training rows, the packed row it holds."""
    if n_packed < 1:
        raise LmscopeError("the corpus's train split is shorter than one training row; lower seq_len or give more text.")
    epochs = -(-n_rows // n_packed)
    return np.concatenate([permutation(n_packed, data_seed, "rows", epoch) for epoch in range(epochs)])[:n_rows]


def build_training_data(
    corpus: TokenizedCorpus,
    out_dir: str | os.PathLike[str],
    *,
    seq_len: int,
    batch_size: int,
    steps: int,
    data_seed: int,
    eos_token_id: int,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Write ``train.bin``/``train.idx``, ``segments.parquet`` and ``order.json`` into ``out_dir`` (atomically, as one directory).

    ``out_dir`` must not exist. Returns the summary recorded in ``suite.json``.
    """
    progress("data order", 0, 3)
    packing = pack_documents(corpus, seq_len, eos_token_id, data_seed)
    n_rows = steps * batch_size
    order = training_permutation(packing.n_rows, n_rows, data_seed)
    progress("data order", 1, 3)
    packed = packing.segments()
    # index the packed segments by packed row (they come sorted by document, not by row)
    by_row = np.lexsort((packed["row_offset"], packed["row"]))
    packed = {name: values[by_row] for name, values in packed.items()}
    first = np.searchsorted(packed["row"], np.arange(packing.n_rows + 1))
    counts = first[order + 1] - first[order]
    take = np.concatenate([np.arange(first[k], first[k + 1]) for k in order.tolist()]) if n_rows else np.zeros(0, np.int64)
    segments = {name: packed[name][take] for name in SEGMENT_SCHEMA.names}
    segments["row"] = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    with atomic_directory(out_dir) as tmp:
        write_megatron_dataset(tmp / TRAIN_PREFIX, (packing.row(k) for k in order.tolist()), dtype=corpus.dtype)
        progress("data order", 1, 3)
        pq.write_table(pa.table(segments, schema=SEGMENT_SCHEMA), tmp / SEGMENTS_FILE, compression="zstd")
        epochs = -(-n_rows // packing.n_rows)
        summary = {
            "format": ORDER_FORMAT,
            "format_version": ORDER_VERSION,
            "data_seed": data_seed,
            "seq_len": seq_len,
            "row_tokens": seq_len + 1,
            "batch_size": batch_size,
            "steps": steps,
            "rows": n_rows,
            "row_of_step": ROW_OF_STEP,
            "eos_token_id": eos_token_id,
            "packing": PACKING,
            "rows_overlap_tokens": 1,
            "shuffle_method": SHUFFLE_METHOD,
            "train_documents": len(packing.documents),
            "stream_tokens": len(packing.stream),
            "packed_rows": packing.n_rows,
            "dropped_tail_tokens": len(packing.stream) - packing.n_rows * seq_len - 1 if packing.n_rows else len(packing.stream),
            "epochs": epochs,
            "fraction_of_epoch": n_rows / packing.n_rows,
            "document_order": packing.documents.tolist(),
            "permutation": order.tolist(),
        }
        (tmp / ORDER_FILE).write_text(json.dumps(summary) + "\n", encoding="utf-8")
    progress("data order", 1, 3)
    return {key: value for key, value in summary.items() if key not in ("document_order", "permutation")}


class TrainingRows:
    """The training rows of a suite (``SUITE_DIR/data``), read by optimizer update.

    Args:
        data_dir: the suite's ``data`` directory.
        batch_size: rows per update.
    """

    def __init__(self, data_dir: str | os.PathLike[str], batch_size: int) -> None:
        self.dataset = MegatronDataset(Path(data_dir) / TRAIN_PREFIX)
        self.batch_size = batch_size

    def rows_of_update(self, update: int) -> range:
        """The training rows consumed by update ``update`` (1-based): ``[B·(n−1), B·n)``."""
        return range(self.batch_size * (update - 1), self.batch_size * update)

    def batch(self, update: int) -> np.ndarray:
        """The tokens of update ``update``: shape ``(batch_size, seq_len + 1)``, the dataset's dtype."""
        rows = self.rows_of_update(update)
        if rows.stop > len(self.dataset):
            raise LmscopeError(f"update {update} needs rows up to {rows.stop}, but {self.dataset.bin_path} holds {len(self.dataset)}.")
        return np.stack([self.dataset[r] for r in rows])


def batch_sha256(tokens: np.ndarray) -> str:
    """sha256 of a batch's token ids as little-endian uint16 (uint32 when an id needs it), row after row."""
    array = np.ascontiguousarray(tokens)
    dtype = "<u2" if array.size == 0 or int(array.max()) < 2**16 else "<u4"
    return hashlib.sha256(array.astype(dtype).tobytes()).hexdigest()
