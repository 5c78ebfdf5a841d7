"""On-disk fixtures for the replay tests, each written in its real format by plain code that knows nothing of lmscope.suites.replay.

Every builder returns the truth it wrote (rows in training order, document pieces), so the
tests compare replay against an independent construction, never against itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_fixtures import build_bpe_tokenizer, corpus_records, write_jsonl
from lmscope.data.megatron import write_megatron_dataset

EOS = 0  # <|endoftext|> is the first special token of the test tokenizer, as in Pythia's


# --- mini suite --------------------------------------------------------------------------


@dataclass
class MiniSuite:
    root: Path
    tokenizer: Path
    batch_size: int
    seq_len: int
    n_steps: int
    rows: list[list[int]]
    pieces: list[tuple[int, int, int, int, int]]  # (row, row_offset, length, doc_index, doc_offset)
    doc_tokens: dict[int, list[int]]
    doc_ids: list[str]
    domains: list[str]
    planted: int  # a document placed twice, far apart
    never_trained: int  # a document in the corpus that no row holds

    def step_rows(self, step: int) -> list[list[int]]:
        return self.rows[self.batch_size * step : self.batch_size * (step + 1)]

    def expected_steps(self, doc: int, start: int = 0, stop: int | None = None) -> list[tuple[int, int, int, int, int]]:
        """(step, row, row_offset, doc_offset, length) of every trained piece of ``doc`` inside tokens [start, stop), by brute force."""
        stop = len(self.doc_tokens[doc]) if stop is None else stop
        out = []
        for row, row_offset, length, doc_index, doc_offset in self.pieces:
            if doc_index != doc:
                continue
            a, b = max(doc_offset, start), min(doc_offset + length, stop)
            if a < b and row // self.batch_size < self.n_steps:
                out.append((row // self.batch_size, row, row_offset + a - doc_offset, a, b - a))
        return sorted(out)


def build_mini_suite(root: Path, work: Path, batch_size: int = 4, seq_len: int = 31, n_steps: int = 6) -> MiniSuite:
    """Tokenize a small corpus, pack its documents (EOS after each) into rows of seq_len+1, write the mini-suite layout.

    Two rows past the last complete step are written too (never trained). One unique document is
    placed twice, early and late; one document is left out.
    """
    from lmscope.data.tokenize_job import tokenize_corpus
    from lmscope.data.tokenized import TokenizedCorpus

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_bpe_tokenizer(work / "tok")
    records = corpus_records(30)
    records.append({"id": "planted-zq", "domain": "planted", "text": "Zebra quokka xylophone jazz: a planted document, unique.", "meta": {}})
    records.append({"id": "unused", "domain": "alpha", "text": "This document is never placed in a row.", "meta": {}})
    source = write_jsonl(work / "docs.jsonl", records)
    tokenize_corpus(source, str(tokenizer), root / "corpus", heldout_fraction=0.0)
    corpus = TokenizedCorpus.open(root / "corpus")
    ids = corpus.documents.column("id").to_pylist()
    domains = corpus.documents.column("domain").to_pylist()
    doc_tokens = {i: corpus.document_tokens(i).tolist() for i in range(len(corpus))}
    planted, unused = ids.index("planted-zq"), ids.index("unused")

    width = seq_len + 1
    n_rows = n_steps * batch_size + 2
    rng = np.random.default_rng(7)
    others = [i for i in rng.permutation(len(corpus)).tolist() if i not in (planted, unused)]
    order = others[:2] + [planted] + others[2:]
    stream: list[int] = []
    spans: list[tuple[int, int, int]] = []  # (stream position, doc, length)
    late_done = False
    for doc in order:
        if not late_done and len(stream) > (n_steps - 2) * batch_size * width:
            spans.append((len(stream), planted, len(doc_tokens[planted])))
            stream += doc_tokens[planted] + [EOS]
            late_done = True
        spans.append((len(stream), doc, len(doc_tokens[doc])))
        stream += doc_tokens[doc] + [EOS]
        if len(stream) >= n_rows * width:
            break
    assert len(stream) >= n_rows * width and late_done, "the test corpus is too small for the suite asked for"
    rows = [stream[r * width : (r + 1) * width] for r in range(n_rows)]
    pieces = []
    for at, doc, length in spans:
        offset = 0
        while offset < length and at + offset < n_rows * width:
            row, row_offset = divmod(at + offset, width)
            take = min(length - offset, width - row_offset)
            pieces.append((row, row_offset, take, doc, offset))
            offset += take

    (root / "data").mkdir(parents=True, exist_ok=True)
    write_megatron_dataset(root / "data" / "train", [np.asarray(r) for r in rows], dtype=np.uint16)
    # independent check of the writer: the .bin is the rows back to back as little-endian uint16
    assert (root / "data" / "train.bin").read_bytes() == np.asarray(rows, dtype="<u2").tobytes()
    shuffled = rng.permutation(len(pieces))  # the reader must not rely on the file's order
    columns = list(zip(*[pieces[i] for i in shuffled]))
    table = pa.table(
        {
            "row": pa.array(columns[0], pa.int64()),
            "row_offset": pa.array(columns[1], pa.int32()),
            "length": pa.array(columns[2], pa.int32()),
            "doc_index": pa.array(columns[3], pa.int64()),
            "doc_offset": pa.array(columns[4], pa.int64()),
        }
    )
    pq.write_table(table, root / "data" / "segments.parquet")
    (root / "suite.json").write_text(
        json.dumps({"format": "lmscope-mini-suite", "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": batch_size * seq_len})
    )
    return MiniSuite(root, tokenizer, batch_size, seq_len, n_steps, rows, pieces, doc_tokens, ids, domains, planted, unused)


# --- Pythia ------------------------------------------------------------------------------

PLANTED = [61001, 61002, 61003, 61004]  # ids the random rows never hold


@dataclass
class PythiaData:
    prefix: Path
    rows: list[np.ndarray]
    planted_at: list[tuple[int, int]] = field(default_factory=list)  # (row, offset)


def build_pythia(directory: Path, n_rows: int, seq_len: int, seed: int = 0, plant: list[tuple[int, int]] | None = None) -> PythiaData:
    """``document.bin/.idx`` of random uint16 rows (ids 1…999, EOS=0 sprinkled in), PLANTED written at ``plant`` (row, offset)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        row = rng.integers(1, 1000, size=seq_len + 1).astype(np.uint16)
        row[rng.random(seq_len + 1) < 0.05] = EOS
        rows.append(row)
    for row, offset in plant or []:
        rows[row][offset : offset + len(PLANTED)] = PLANTED
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "document"
    write_megatron_dataset(prefix, rows, dtype=np.uint16)
    assert (directory / "document.bin").read_bytes() == np.concatenate(rows).astype("<u2").tobytes()
    return PythiaData(prefix, rows, list(plant or []))


def shard_pythia(prefix: Path, shard_bytes: int) -> list[Path]:
    """Cut ``PREFIX.bin`` into byte shards ``PREFIX-00000-of-LLLLL.bin`` as EleutherAI's shard_memmap.py does, and remove it."""
    data = prefix.with_name(prefix.name + ".bin").read_bytes()
    pieces = [data[i : i + shard_bytes] for i in range(0, len(data), shard_bytes)]
    last = len(pieces) - 1
    paths = []
    for i, piece in enumerate(pieces):
        path = prefix.with_name(f"{prefix.name}-{i:05d}-of-{last:05d}.bin")
        path.write_bytes(piece)
        paths.append(path)
    prefix.with_name(prefix.name + ".bin").unlink()
    return paths


# --- OLMo --------------------------------------------------------------------------------


@dataclass
class OlmoData:
    files: list[Path]
    indices_path: Path
    indices: np.ndarray
    instances: list[np.ndarray]  # instance i of the concatenation, built by a plain loop
    origins: list[str]  # "file:j" of instance i


def build_olmo(directory: Path, lengths: list[int], seq_len: int, dtype: str = "uint16", seed: int = 1, npy_header: bool = False) -> OlmoData:
    """Raw token files of ``lengths`` tokens (remainders not a multiple of seq_len) and a permuted global_indices."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files, instances, origins = [], [], []
    for k, length in enumerate(lengths):
        tokens = rng.integers(1, 1000, size=length).astype(dtype)
        path = directory / f"part-{k:03d}-00000.npy"
        tokens.tofile(path)  # headerless, as Dolma writes them
        files.append(path)
        for j in range(length // seq_len):
            instances.append(tokens[j * seq_len : (j + 1) * seq_len].copy())
            origins.append(f"{path}:{j}")
    indices = rng.permutation(len(instances)).astype(np.uint32)
    indices_path = directory / "global_indices.npy"
    if npy_header:
        np.save(indices_path, indices)
    else:
        memmap = np.memmap(indices_path, dtype=np.uint32, mode="w+", shape=(len(indices),))  # as OLMo's trainer writes it
        memmap[:] = indices
        memmap.flush()
        del memmap
    return OlmoData(files, indices_path, indices, instances, origins)


# --- Amber -------------------------------------------------------------------------------


@dataclass
class AmberData:
    directory: Path
    chunks: list[list[tuple[list[int], str]]]  # per chunk, its lines (token_ids, source)


def build_amber(directory: Path, n_chunks: int, rows_per_chunk: int, seq_len: int, seed: int = 2, unpadded: bool = False) -> AmberData:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    chunks = []
    for k in range(n_chunks):
        lines = [(rng.integers(1, 32000, size=seq_len + 1).tolist(), ["arxiv", "c4", "starcoder"][int(rng.integers(3))]) for _ in range(rows_per_chunk)]
        name = f"train_{k}.jsonl" if unpadded else f"train_{k:03d}.jsonl"
        with open(directory / name, "w") as handle:
            for ids, source in lines:
                handle.write(json.dumps({"token_ids": ids, "source": source}) + "\n")
        chunks.append(lines)
    return AmberData(directory, chunks)
