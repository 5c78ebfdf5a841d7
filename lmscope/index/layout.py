"""The on-disk layout of a suffix-array index, and reading its manifest (see :mod:`lmscope.index` for the design).

``OUT_DIR/``

- ``manifest.json`` — written first with the plan (``complete: false``) and rewritten after every
  finished shard; ``complete: true`` once all are done. Holds the corpus identity, the
  separator, the stream dtype and, per shard, its document range, sizes and suffix-array width.
  It holds no timings, so two builds of the same corpus are byte-identical;
- ``documents.parquet`` — ``doc_index``, ``id``, ``domain``, ``split`` of every corpus document,
  so that matches are named without the corpus;
- ``shard-NNNNN/`` — one directory per shard, renamed into place whole:
  ``tokens.bin`` (the shard's stream: each document preceded by the separator),
  ``suffix_array.bin`` (4- or 5-byte little-endian positions into the stream) and
  ``doc_starts.bin`` (``uint64``: the stream position of each document's first token).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError

FORMAT_NAME = "lmscope-suffix-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DOCUMENTS_FILE = "documents.parquet"
TOKENS_FILE = "tokens.bin"
SUFFIX_ARRAY_FILE = "suffix_array.bin"
DOC_STARTS_FILE = "doc_starts.bin"

DEFAULT_SHARD_TOKENS = 250_000_000
"""Corpus tokens per shard by default: building one takes about 16 bytes of memory per token (uint16) or 24 (uint32)."""

_STREAM_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def corpus_identity(corpus: TokenizedCorpus) -> str:
    """A hex sha256 naming the corpus by content: the hashes of its files recorded in its manifest, with its dtype.

    A corpus whose manifest records no file hashes is named by its whole manifest, less ``run``.
    """
    files = corpus.manifest.get("files")
    if isinstance(files, dict) and files:
        named: Any = {"dtype": corpus.manifest.get("dtype"), "files": files}
    else:
        named = {key: value for key, value in corpus.manifest.items() if key != "run"}
    return hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def corpus_vocab_size(corpus: TokenizedCorpus) -> int:
    """The vocabulary size the corpus's tokenizer declares; without one, one more than the largest id present."""
    declared = (corpus.manifest.get("tokenizer") or {}).get("vocab_size")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    return int(corpus.tokens.max()) + 1 if corpus.n_tokens else 1


def stream_dtype(corpus: TokenizedCorpus, vocab_size: int) -> tuple[np.dtype, int]:
    """The stream's dtype and separator id: the corpus dtype and its largest value, widened to uint32 when a real id could equal it."""
    for name in ("uint16", "uint32"):
        dtype = _STREAM_DTYPES[name]
        if dtype.itemsize < corpus.dtype.itemsize:
            continue
        separator = int(np.iinfo(dtype).max)
        if vocab_size <= separator:
            return dtype, separator
    raise LmscopeError(
        f"corpus {str(corpus.path)!r} has a vocabulary of {vocab_size} ids, so no uint32 value is free to separate documents; "
        "re-tokenize it with a vocabulary below 4,294,967,295 ids."
    )


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it.

    Attributes:
        name: its directory name.
        doc_start, doc_stop: the corpus documents it holds, ``[doc_start, doc_stop)``.
        n_tokens: corpus tokens in it.
        n_positions: stream length, ``n_tokens + (doc_stop - doc_start)`` (one separator per document).
        sa_width: bytes per suffix-array entry.
    """

    name: str
    doc_start: int
    doc_stop: int
    n_tokens: int
    n_positions: int
    sa_width: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc_start": self.doc_start,
            "doc_stop": self.doc_stop,
            "n_tokens": self.n_tokens,
            "n_positions": self.n_positions,
            "sa_width": self.sa_width,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: Path) -> ShardInfo:
        try:
            return cls(
                name=str(record["name"]),
                doc_start=int(record["doc_start"]),
                doc_stop=int(record["doc_stop"]),
                n_tokens=int(record["n_tokens"]),
                n_positions=int(record["n_positions"]),
                sa_width=int(record["sa_width"]),
            )
        except (KeyError, TypeError, ValueError):
            raise LmscopeError(f"{where} has a malformed shard record {record!r}; rebuild the index into a new directory.") from None


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The index manifest in ``directory``, or ``None`` when there is none; :class:`LmscopeError` when it is not an index manifest."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LmscopeError(f"{path} is not valid JSON ({err}); remove {directory} and build the index again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise LmscopeError(f"{path} does not describe an lmscope index (format {FORMAT_NAME!r}); give an index directory built by `lmscope index build`.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LmscopeError(
            f"{path} has index format version {manifest.get('format_version')!r} but this lmscope reads version {FORMAT_VERSION}; rebuild the index."
        )
    return manifest


def stream_dtype_of(manifest: dict[str, Any], where: Path) -> np.dtype:
    name = manifest.get("stream_dtype")
    if name not in _STREAM_DTYPES:
        raise LmscopeError(f"{where} names stream dtype {name!r}; expected uint16 or uint32; rebuild the index.")
    return _STREAM_DTYPES[name]
