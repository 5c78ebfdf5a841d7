"""Tokenize documents into a tokenized corpus, resumably.

The documents are read once, in order, and cut into chunks of ``chunk_docs``
documents. Each chunk's token ids and document rows go to part files under
``OUT/.work/`` — the tokens first, then the rows, each written atomically, so a
chunk is complete exactly when its rows file exists. A killed job rerun with the
same inputs reads the documents again (cheap, and it recounts the reader
statistics exactly) but tokenizes only the chunks without a rows file. The
finish concatenates the parts into ``tokens.bin`` and ``documents.parquet`` and
writes ``manifest.json`` last; the parts are then removed.

Because chunk boundaries, split assignment and encoding depend on nothing but
the inputs, a killed-and-resumed job gives byte-identical ``tokens.bin`` and
``documents.parquet``, and a manifest that differs only under ``run`` (timings).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import lmscope
from lmscope.data.documents import Document
from lmscope.data.readers import DocumentReader
from lmscope.data.split import SPLIT_METHOD, SPLIT_VERSION, SPLITS, assign_split, check_fraction
from lmscope.data.tokenized import (
    DOCUMENT_SCHEMA,
    DOCUMENTS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENS_FILE,
    TokenizedCorpus,
    dtype_name,
    token_dtype,
)
from lmscope.data.tokenizer_info import CorpusTokenizer, corpus_tokenizer
from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path, atomic_write_json, sha256_file
from lmscope.progress import Progress, no_progress

WORK_DIR = ".work"
JOB_FILE = "job.json"
_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}


def tokenize_corpus(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: str | Any,
    out_dir: str | os.PathLike[str],
    *,
    heldout_fraction: float = 0.05,
    batch_docs: int = 512,
    chunk_docs: int = 8192,
    strict: bool = False,
    domain: str | None = None,
    text_field: str = "text",
    id_field: str = "id",
    progress: Progress = no_progress,
) -> TokenizedCorpus:
    """Tokenize document sources into a tokenized corpus directory (see :mod:`lmscope.data.tokenized`).

    Resumable: rerunning after a kill, with the same arguments, finishes the job; rerunning
    after it finished returns the corpus. Output directories of a different job are refused.

    Args:
        source: one or more JSONL (plain, ``.gz``, ``.zst``) or Parquet files or text directories.
        tokenizer: a model spec (``default``, ``EleutherAI/pythia-70m``, a directory) or a loaded
            ``transformers`` / ``tokenizers`` tokenizer. Encoded in batches, no special tokens.
        out_dir: the corpus directory to make.
        heldout_fraction: fraction of each domain held out, by hash of the document id (:mod:`lmscope.data.split`).
        batch_docs: documents per encoding call (memory; does not change the output).
        chunk_docs: documents per resumable chunk (part of the job's identity).
        strict: fail on the first malformed record instead of skipping and counting it.
        domain: domain of records that name none (default: per source file, see :mod:`lmscope.data.readers`).
        text_field, id_field: field names of the text and the id in the records.
        progress: receives ``("tokenize", documents_done)`` reports with ``tokens=`` and ``skipped=``.

    Returns:
        the finished corpus, opened.
    """
    started = time.perf_counter()
    heldout_fraction = check_fraction(heldout_fraction)
    if batch_docs < 1 or chunk_docs < 1:
        raise LmscopeError(f"batch_docs ({batch_docs}) and chunk_docs ({chunk_docs}) must be at least 1.")
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    reader = DocumentReader([Path(path).resolve() for path in paths], strict=strict, domain=domain, text_field=text_field, id_field=id_field)
    encoder = corpus_tokenizer(tokenizer)
    dtype = token_dtype(encoder.vocab_size)
    job = _job_description(reader, encoder, dtype, heldout_fraction, chunk_docs)
    out = Path(out_dir)
    finished = _finished_corpus(out, job)
    if finished is not None:
        return finished
    _check_output_dir(out)
    work = out / WORK_DIR
    with _locked(work):
        finished = _finished_corpus(out, job)  # another process may have finished while we waited
        if finished is not None:
            shutil.rmtree(work, ignore_errors=True)
            return finished
        _claim_work_dir(work, job)
        chunk_count, resumed = _tokenize_chunks(reader, encoder, dtype, work, heldout_fraction, chunk_docs, batch_docs, progress)
        tokenized = time.perf_counter()
        manifest = _finish(out, work, job, reader, encoder, dtype, chunk_count, progress)
        manifest["run"] = {
            "chunks": chunk_count,
            "chunks_resumed": resumed,
            "seconds_tokenize": round(tokenized - started, 3),
            "seconds_finish": round(time.perf_counter() - tokenized, 3),
            "seconds_total": round(time.perf_counter() - started, 3),
        }
        atomic_write_json(out / MANIFEST_FILE, manifest)
        shutil.rmtree(work, ignore_errors=True)
    return TokenizedCorpus.open(out)


def _job_description(reader: DocumentReader, encoder: CorpusTokenizer, dtype: np.dtype, heldout_fraction: float, chunk_docs: int) -> dict[str, Any]:
    """Everything that determines the output; a resumed job must match it exactly."""
    sources = []
    for path in reader.paths:
        stat = path.stat()
        sources.append({"path": str(path), "bytes": stat.st_size if path.is_file() else None, "mtime_ns": stat.st_mtime_ns})
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sources": sources,
        "reader": {"strict": reader.strict, "domain": reader.domain, "text_field": reader.text_field, "id_field": reader.id_field},
        "tokenizer": encoder.describe(),
        "dtype": dtype_name(dtype),
        "heldout_fraction": heldout_fraction,
        "split_version": SPLIT_VERSION,
        "chunk_docs": chunk_docs,
    }


def _job_key(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode("utf-8")).hexdigest()


def _finished_corpus(out: Path, job: dict[str, Any]) -> TokenizedCorpus | None:
    manifest_path = out / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("job_key") != _job_key(job):
        raise LmscopeError(f"{out} already holds a tokenized corpus made from other inputs or settings; choose another output directory or remove it.")
    return TokenizedCorpus.open(out)


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LmscopeError(f"output {out} exists and is not a directory; choose another output directory.")
    if out.is_dir():
        ours = {WORK_DIR, TOKENS_FILE, DOCUMENTS_FILE, MANIFEST_FILE}
        foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in ours and not _is_temporary(entry.name))
        if foreign:
            raise LmscopeError(f"output directory {out} holds other files ({', '.join(foreign[:3])}); choose a new or empty directory.")


def _is_temporary(name: str) -> bool:
    """Names of the temporary files :func:`lmscope.fsio.atomic_path` leaves behind when killed."""
    return name.startswith(".") and name.endswith(".tmp")


@contextmanager
def _locked(work: Path) -> Iterator[None]:
    """Create ``work`` and hold an exclusive lock on it, so that two processes never write the same parts.

    A process that waited may find ``work`` removed by the one that finished; it then
    re-creates it (and removes it again once it sees the finished corpus).
    """
    for attempt in range(3):
        work.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(work / "lock", "a")
            break
        except FileNotFoundError:  # removed between mkdir and open by a process that just finished
            if attempt == 2:
                raise
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _claim_work_dir(work: Path, job: dict[str, Any]) -> None:
    job_path = work / JOB_FILE
    if job_path.is_file():
        try:
            previous = json.loads(job_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != job:
            differing = sorted(key for key in set(job) | set(previous or {}) if (previous or {}).get(key) != job.get(key))
            raise LmscopeError(
                f"{work.parent} holds an unfinished tokenization with different {', '.join(differing) or 'settings'}; "
                "rerun with the same inputs and settings to resume it, or remove the directory to start over."
            )
        return
    atomic_write_json(job_path, job)


def _chunk_paths(work: Path, chunk: int) -> tuple[Path, Path]:
    stem = f"chunk-{chunk:06d}"
    return work / f"{stem}.tokens", work / f"{stem}.parquet"


def _chunks(documents: Iterator[Document], size: int) -> Iterator[list[Document]]:
    while batch := list(itertools.islice(documents, size)):
        yield batch


def _tokenize_chunks(
    reader: DocumentReader,
    encoder: CorpusTokenizer,
    dtype: np.dtype,
    work: Path,
    heldout_fraction: float,
    chunk_docs: int,
    batch_docs: int,
    progress: Progress,
) -> tuple[int, int]:
    """Read every document; tokenize and write each chunk that is not complete yet. Returns (chunks, chunks resumed)."""
    chunk_count = resumed = 0
    for chunk, documents in enumerate(_chunks(iter(reader), chunk_docs)):
        chunk_count += 1
        tokens_path, rows_path = _chunk_paths(work, chunk)
        if rows_path.is_file():
            resumed += 1
            progress("tokenize", advance=len(documents), resumed=resumed, skipped=reader.stats.skipped_malformed)
            continue
        first_index = chunk * chunk_docs
        rows: dict[str, list[Any]] = {name: [] for name in DOCUMENT_SCHEMA.names}
        offset = 0
        with atomic_path(tokens_path) as tmp_tokens, open(tmp_tokens, "wb") as sink:
            for start in range(0, len(documents), batch_docs):
                batch = documents[start : start + batch_docs]
                ids = encoder.encode_batch([document.text for document in batch])
                lengths = [len(doc_ids) for doc_ids in ids]
                flat = _as_token_array(ids, sum(lengths), dtype, encoder)
                sink.write(flat.tobytes())
                for position, (document, length) in enumerate(zip(batch, lengths)):
                    rows["doc_index"].append(first_index + start + position)
                    rows["id"].append(document.id)
                    rows["domain"].append(document.domain)
                    rows["split"].append(assign_split(document.id, heldout_fraction))
                    rows["token_offset"].append(offset)
                    rows["n_tokens"].append(length)
                    rows["n_bytes"].append(len(document.text.encode("utf-8")))
                    rows["provenance"].append(json.dumps(document.meta, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str))
                    offset += length
                progress("tokenize", advance=len(batch), tokens=offset, skipped=reader.stats.skipped_malformed)
            sink.flush()
        with atomic_path(rows_path) as tmp_rows:
            pq.write_table(pa.table(rows, schema=DOCUMENT_SCHEMA), tmp_rows, **_PARQUET_OPTIONS)
    return chunk_count, resumed


def _as_token_array(ids: list[list[int]], total: int, dtype: np.dtype, encoder: CorpusTokenizer) -> np.ndarray:
    """Flatten one batch's ids into ``dtype``, refusing ids that the dtype or vocabulary cannot hold."""
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
    if total and (int(flat.min()) < 0 or int(flat.max()) >= encoder.vocab_size):
        bad = int(flat.max()) if int(flat.max()) >= encoder.vocab_size else int(flat.min())
        raise LmscopeError(f"tokenizer {encoder.spec!r} produced id {bad}, outside its vocabulary of {encoder.vocab_size}; the tokenizer is inconsistent.")
    return flat.astype(dtype)


def _finish(
    out: Path,
    work: Path,
    job: dict[str, Any],
    reader: DocumentReader,
    encoder: CorpusTokenizer,
    dtype: np.dtype,
    chunk_count: int,
    progress: Progress,
) -> dict[str, Any]:
    """Concatenate the chunk parts into ``tokens.bin`` and ``documents.parquet``; return the manifest (without ``run``)."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    token_hash = hashlib.sha256()
    n_tokens = n_documents = n_bytes = 0
    with atomic_path(out / TOKENS_FILE) as tmp_tokens, atomic_path(out / DOCUMENTS_FILE) as tmp_documents:
        with open(tmp_tokens, "wb") as sink, pq.ParquetWriter(tmp_documents, DOCUMENT_SCHEMA, **_PARQUET_OPTIONS) as writer:
            for chunk in range(chunk_count):
                tokens_path, rows_path = _chunk_paths(work, chunk)
                rows = pq.read_table(rows_path, schema=DOCUMENT_SCHEMA)
                chunk_tokens = int(pc.sum(rows.column("n_tokens")).as_py() or 0)
                if not tokens_path.is_file() or tokens_path.stat().st_size != chunk_tokens * dtype.itemsize:
                    raise LmscopeError(f"{tokens_path} does not hold the {chunk_tokens} tokens its rows promise; remove {out} and tokenize again.")
                with open(tokens_path, "rb") as part:
                    while block := part.read(1 << 22):
                        token_hash.update(block)
                        sink.write(block)
                offsets = pc.add(rows.column("token_offset"), pa.scalar(n_tokens, pa.int64()))
                rows = rows.set_column(DOCUMENT_SCHEMA.get_field_index("token_offset"), DOCUMENT_SCHEMA.field("token_offset"), offsets)
                writer.write_table(rows)
                _add_counts(counts, rows)
                n_tokens += chunk_tokens
                n_documents += rows.num_rows
                n_bytes += int(pc.sum(rows.column("n_bytes")).as_py() or 0)
                progress("finish", advance=1, total=chunk_count)
            sink.flush()
    domains = sorted(counts)
    by_domain = {name: {split: counts[name].get(split, _zero()) for split in SPLITS} for name in domains}
    by_split = {split: {key: sum(by_domain[name][split][key] for name in domains) for key in ("documents", "tokens", "bytes")} for split in SPLITS}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lmscope_version": lmscope.__version__,
        "job_key": _job_key(job),
        "tokenizer": encoder.describe(),
        "dtype": dtype_name(dtype),
        "byte_order": "little",
        "n_documents": n_documents,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "split": {"method": SPLIT_METHOD, "version": SPLIT_VERSION, "heldout_fraction": job["heldout_fraction"]},
        "counts": {"by_domain": by_domain, "by_split": by_split},
        "reader": reader.stats.to_dict(),
        "sources": [{"path": source["path"], "bytes": source["bytes"]} for source in job["sources"]],
        "options": {**job["reader"], "chunk_docs": job["chunk_docs"]},
        "files": {
            TOKENS_FILE: {"bytes": n_tokens * dtype.itemsize, "sha256": token_hash.hexdigest()},
            DOCUMENTS_FILE: {"bytes": (out / DOCUMENTS_FILE).stat().st_size, "sha256": sha256_file(out / DOCUMENTS_FILE)},
        },
    }


def _zero() -> dict[str, int]:
    return {"documents": 0, "tokens": 0, "bytes": 0}


def _add_counts(counts: dict[str, dict[str, dict[str, int]]], rows: pa.Table) -> None:
    grouped = rows.group_by(["domain", "split"]).aggregate([("doc_index", "count"), ("n_tokens", "sum"), ("n_bytes", "sum")])
    for row in grouped.to_pylist():
        cell = counts.setdefault(row["domain"], {}).setdefault(row["split"], _zero())
        cell["documents"] += int(row["doc_index_count"])
        cell["tokens"] += int(row["n_tokens_sum"] or 0)
        cell["bytes"] += int(row["n_bytes_sum"] or 0)
