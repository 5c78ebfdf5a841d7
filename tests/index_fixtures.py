"""Shared builders for the index tests: tokenized corpora written by hand, brute-force scans, and a mini suite with a planted phrase.

Corpora are written in the tokenized-corpus format by plain code (random tokens over a small
vocabulary, so n-grams repeat). The planted suite writes a real data order with the mini-suite
data-order writer and derives the truth from its recipe and a scan of its rows, never from
lmscope's replay code.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

# --- a tokenized corpus, written by hand --------------------------------------------------


def write_corpus(directory: Path, docs: list[list[int]], vocab_size: int, dtype: str = "uint16", splits: list[str] | None = None) -> Path:
    """The tokenized-corpus layout (tokens.bin, documents.parquet, manifest.json) for ``docs``."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    data = tokens.astype("<u2" if dtype == "uint16" else "<u4").tobytes()
    (directory / "tokens.bin").write_bytes(data)
    lengths = [len(d) for d in docs]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64).tolist() if docs else []
    table = pa.table(
        {
            "doc_index": pa.array(range(len(docs)), pa.int64()),
            "id": pa.array([f"doc-{i}" for i in range(len(docs))], pa.string()),
            "domain": pa.array(["alpha" if i % 2 else "beta" for i in range(len(docs))], pa.string()),
            "split": pa.array(splits or ["train"] * len(docs), pa.string()),
            "token_offset": pa.array(offsets, pa.int64()),
            "n_tokens": pa.array(lengths, pa.int64()),
            "n_bytes": pa.array([4 * n for n in lengths], pa.int64()),
            "provenance": pa.array(["{}"] * len(docs), pa.string()),
        }
    )
    pq.write_table(table, directory / "documents.parquet")
    manifest = {
        "format": "lmscope-tokenized-corpus",
        "format_version": 1,
        "tokenizer": {"spec": "random", "vocab_size": vocab_size, "sha256": "0" * 64, "kind": "fast"},
        "dtype": dtype,
        "n_documents": len(docs),
        "n_tokens": int(len(tokens)),
        "files": {
            "tokens.bin": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
            "documents.parquet": {"sha256": hashlib.sha256((directory / "documents.parquet").read_bytes()).hexdigest()},
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def random_docs(seed: int, n_docs: int, vocab: int, max_len: int, low: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(low, vocab, size=int(rng.integers(1, max_len))).tolist() for _ in range(n_docs)]
    docs[3], docs[7], docs[8] = [], [int(rng.integers(low, vocab))], []  # an empty document, a one-token one, two empties around it
    return docs


# --- brute force --------------------------------------------------------------------------


def naive_locate(docs: list[list[int]], pattern: list[int]) -> list[tuple[int, int]]:
    m = len(pattern)
    return [(d, o) for d, doc in enumerate(docs) for o in range(len(doc) - m + 1) if doc[o : o + m] == pattern]


def naive_infgram(docs: list[list[int]], context: list[int]) -> tuple[int, Counter[int]]:
    for length in range(len(context), -1, -1):
        suffix = context[len(context) - length :]
        following: Counter[int] = Counter()
        for doc in docs:
            for o in range(len(doc) - length):
                if doc[o : o + length] == suffix:
                    following[doc[o + length]] += 1
        if following:
            return length, following
    return 0, Counter()


def queries(docs: list[list[int]], vocab: int, seed: int, n: int = 60) -> list[list[int]]:
    """Present n-grams (slices of documents), random ones (often absent) and whole short documents, lengths 1–6."""
    rng = np.random.default_rng(seed)
    out = []
    full = [d for d in docs if len(d) >= 6]
    for _ in range(n):
        doc = full[int(rng.integers(len(full)))]
        m = int(rng.integers(1, 7))
        at = int(rng.integers(0, len(doc) - m + 1))
        out.append(doc[at : at + m])
        out.append(rng.integers(0, vocab, size=int(rng.integers(1, 7))).tolist())
    return out


def boundary_ngrams(docs: list[list[int]]) -> list[list[int]]:
    """N-grams that occur in the concatenation of the documents only across a boundary (never inside one document)."""
    out = []
    for a, b in zip(docs, docs[1:]):
        for left in range(1, 4):
            for right in range(1, 4):
                if len(a) >= left and len(b) >= right:
                    gram = a[len(a) - left :] + b[:right]
                    if not naive_locate(docs, gram):
                        out.append(gram)
    return out


# --- a mini suite with a planted phrase ----------------------------------------------------

PHRASE = [50, 51, 52, 53, 54, 55]  # ids no other document holds


@dataclass
class PlantedSuite:
    suite: Path
    docs: list[list[int]]
    planted: dict[int, int]  # document → offset of the phrase
    truth: dict[int, list[int]]  # document → every step whose batch held its phrase whole (with repeats), in row order
    starts: dict[int, int]  # document → its start in the packed stream (trained documents only)
    seq_len: int
    batch: int
    steps: int


def build_planted_suite(root: Path) -> PlantedSuite:
    """A mini suite (corpus, data order, suite.json; no models) over 30 random documents, PHRASE planted in four of them."""
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.suites.data_order import build_training_data

    seq_len, batch, steps = 16, 4, 40
    rng = np.random.default_rng(13)
    docs = [rng.integers(1, 20, size=int(rng.integers(30, 80))).tolist() for _ in range(30)]
    planted = {3: 5, 11: 0, 20: 40, 25: 7}  # document → offset of the phrase; 25 is held out, never trained
    for doc, offset in planted.items():
        docs[doc][offset : offset + len(PHRASE)] = PHRASE
    splits = ["heldout" if i == 25 else "train" for i in range(len(docs))]
    suite = root / "suite"
    write_corpus(suite / "corpus", docs, 64, splits=splits)
    build_training_data(TokenizedCorpus.open(suite / "corpus"), suite / "data", seq_len=seq_len, batch_size=batch, steps=steps, data_seed=3, eos_token_id=0)
    (suite / "suite.json").write_text(json.dumps({"format": "lmscope-mini-suite", "batch_size": batch, "seq_len": seq_len}))

    # the truth, from the data order's recipe: documents packed in order.json's order with an EOS after each,
    # packed row k = stream[k·L : k·L + L + 1], training row r holds packed row permutation[r], step = r // batch
    order = json.loads((suite / "data" / "order.json").read_text())
    start, starts = 0, {}
    for doc in order["document_order"]:
        starts[doc] = start
        start += len(docs[doc]) + 1
    truth: dict[int, list[int]] = {}
    for doc, offset in planted.items():
        truth[doc] = []
        if doc not in starts:
            continue
        a = starts[doc] + offset
        for row, packed in enumerate(order["permutation"]):
            if packed * seq_len <= a and a + len(PHRASE) <= packed * seq_len + seq_len + 1:
                truth[doc].append(row // batch)
    # ... and checked against a plain scan of the rows written to train.bin
    rows = np.fromfile(suite / "data" / "train.bin", dtype="<u2").reshape(-1, seq_len + 1)
    in_rows = sum(1 for row in rows.tolist() for o in range(seq_len + 2 - len(PHRASE)) if row[o : o + len(PHRASE)] == PHRASE)
    assert in_rows == sum(map(len, truth.values())) > 0
    return PlantedSuite(suite, docs, planted, truth, starts, seq_len, batch, steps)


def sentence(err: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be one plain sentence."""
    text = str(err.value)
    assert "\n" not in text and text.endswith(".") and "Traceback" not in text
    return text


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``lmscope ARGS`` in-process: (exit code, stdout, stderr)."""
    from lmscope.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err
