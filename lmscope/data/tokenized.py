"""The tokenized corpus: the one on-disk format every later stage reads.

A tokenized corpus is a directory holding

- ``tokens.bin`` — every document's token ids back to back, no separators, as a flat
  little-endian array: ``uint16`` when the vocabulary has at most 65,536 ids (every id ≤ 65535),
  else ``uint32``. Document ``i`` is ``tokens[token_offset[i] : token_offset[i] + n_tokens[i]]``;
- ``documents.parquet`` — one row per document, in token order, with the columns of
  :data:`DOCUMENT_SCHEMA`: ``doc_index`` (int64, the row number), ``id``, ``domain``,
  ``split`` (``train``/``heldout``), ``token_offset``, ``n_tokens``, ``n_bytes`` (UTF-8 bytes of
  the text, all int64) and ``provenance`` (the document's ``meta`` as JSON);
- ``manifest.json`` — written last, so a directory with a manifest is complete: format version,
  tokenizer (spec, vocabulary size, hash), dtype, counts per domain and split, reader statistics,
  sources, lmscope version, file hashes and (under ``run``) timings. Everything outside ``run``
  is a pure function of the inputs.

:class:`TokenizedCorpus` opens and validates one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmscope.errors import LmscopeError

FORMAT_NAME = "lmscope-tokenized-corpus"
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
DOCUMENTS_FILE = "documents.parquet"
MANIFEST_FILE = "manifest.json"

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_index", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("token_offset", pa.int64(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),
        pa.field("n_bytes", pa.int64(), nullable=False),
        pa.field("provenance", pa.string(), nullable=False),
    ]
)

_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits (≤ 65,536 ids), else ``uint32`` (little-endian)."""
    if vocab_size <= 0:
        raise LmscopeError(f"vocabulary size {vocab_size} is not positive; the tokenizer looks broken.")
    if vocab_size > 2**32:
        raise LmscopeError(f"vocabulary size {vocab_size} does not fit uint32 token ids; use a smaller tokenizer.")
    return _DTYPES["uint16"] if vocab_size <= 2**16 else _DTYPES["uint32"]


def dtype_name(dtype: np.dtype) -> str:
    """``"uint16"`` or ``"uint32"``."""
    return "uint16" if np.dtype(dtype).itemsize == 2 else "uint32"


def is_tokenized_corpus(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose manifest says it is a tokenized corpus."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class TokenizedCorpus:
    """A tokenized corpus opened for reading (see the module docstring for the format).

    Attributes:
        path: the corpus directory.
        tokens: all token ids, shape ``(n_tokens,)``, dtype ``uint16`` or ``uint32``, memory-mapped read-only.
        documents: the document table (columns of :data:`DOCUMENT_SCHEMA`), one row per document.
        manifest: the parsed ``manifest.json``.
    """

    path: Path
    tokens: np.ndarray
    documents: pa.Table
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> TokenizedCorpus:
        """Open and validate a tokenized corpus directory.

        Raises :class:`LmscopeError` naming the file when one is missing or unreadable, when
        ``tokens.bin`` is shorter or longer than the manifest and document table say, or when
        the document table's offsets do not tile ``tokens.bin``.
        """
        path = Path(path)
        if not path.is_dir():
            raise LmscopeError(f"tokenized corpus {str(path)!r} does not exist; run `lmscope corpus tokenize` to make it.")
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise LmscopeError(
                f"{manifest_path} is missing, so {path} is not a finished tokenized corpus; "
                "rerun `lmscope corpus tokenize` with the same inputs to finish (it resumes)."
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise LmscopeError(f"{manifest_path} is not valid JSON ({err}); re-create the corpus.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise LmscopeError(f"{manifest_path} does not describe a tokenized corpus (format {FORMAT_NAME!r}); check the path.")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise LmscopeError(
                f"{manifest_path} has format version {manifest.get('format_version')!r} but this lmscope reads version {FORMAT_VERSION}; re-tokenize the corpus."
            )
        if manifest.get("dtype") not in _DTYPES:
            raise LmscopeError(f"{manifest_path} names dtype {manifest.get('dtype')!r}; expected uint16 or uint32; re-create the corpus.")
        dtype = _DTYPES[manifest["dtype"]]
        tokens_path, documents_path = path / TOKENS_FILE, path / DOCUMENTS_FILE
        for required in (tokens_path, documents_path):
            if not required.is_file():
                raise LmscopeError(f"{required} is missing from the tokenized corpus; re-create the corpus.")
        try:
            documents = pq.read_table(documents_path)
        except (pa.ArrowException, OSError) as err:
            raise LmscopeError(f"{documents_path} is not a readable Parquet file ({str(err).splitlines()[0]}); re-create the corpus.") from None
        missing = [name for name in DOCUMENT_SCHEMA.names if name not in documents.column_names]
        if missing:
            raise LmscopeError(f"{documents_path} lacks the columns {', '.join(missing)}; re-create the corpus.")
        n_tokens = int(manifest.get("n_tokens", -1))
        n_documents = int(manifest.get("n_documents", -1))
        if documents.num_rows != n_documents:
            raise LmscopeError(f"{documents_path} has {documents.num_rows} rows but the manifest says {n_documents} documents; re-create the corpus.")
        size = tokens_path.stat().st_size
        expected = n_tokens * dtype.itemsize
        if size != expected:
            what = "truncated" if size < expected else "longer than expected"
            raise LmscopeError(
                f"{tokens_path} is {what}: {size} bytes, but the manifest says {n_tokens} {manifest['dtype']} tokens "
                f"({expected} bytes); re-create the corpus."
            )
        offsets = documents.column("token_offset").to_numpy()
        lengths = documents.column("n_tokens").to_numpy()
        if n_documents and (offsets[0] != 0 or np.any(offsets[1:] != offsets[:-1] + lengths[:-1]) or offsets[-1] + lengths[-1] != n_tokens):
            raise LmscopeError(f"{documents_path} has token offsets that do not tile {tokens_path} ({n_tokens} tokens); re-create the corpus.")
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype=dtype)
        return cls(path=path, tokens=tokens, documents=documents, manifest=manifest)

    def __len__(self) -> int:
        """Number of documents."""
        return self.documents.num_rows

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    @property
    def domains(self) -> list[str]:
        """The domains present, sorted."""
        return sorted(pc.unique(self.documents.column("domain")).to_pylist())

    def _offsets(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_offset_cache"):
            self._offset_cache = (self.documents.column("token_offset").to_numpy(), self.documents.column("n_tokens").to_numpy())
        return self._offset_cache

    def document_tokens(self, doc_index: int) -> np.ndarray:
        """The token ids of document ``doc_index``: shape ``(n_tokens,)``, the corpus dtype (a view, not a copy)."""
        if not 0 <= doc_index < len(self):
            raise LmscopeError(f"document index {doc_index} is out of range; {self.path} holds documents 0..{len(self) - 1}.")
        offsets, lengths = self._offsets()
        start = int(offsets[doc_index])
        return self.tokens[start : start + int(lengths[doc_index])]

    def select(self, split: str | None = None, domain: str | None = None) -> np.ndarray:
        """Indices (int64, ascending) of the documents in ``split`` and ``domain`` (``None``: any)."""
        mask = None
        for column, value in (("split", split), ("domain", domain)):
            if value is None:
                continue
            present = pc.unique(self.documents.column(column)).to_pylist()
            if value not in present:
                raise LmscopeError(f"{column} {value!r} is not in {self.path}; it holds {', '.join(sorted(present)) or 'no documents'}.")
            condition = pc.equal(self.documents.column(column), value)
            mask = condition if mask is None else pc.and_(mask, condition)
        if mask is None:
            return np.arange(len(self), dtype=np.int64)
        return np.flatnonzero(mask.to_numpy(zero_copy_only=False)).astype(np.int64)

    def iter_documents(self, split: str | None = None, domain: str | None = None) -> Iterator[tuple[int, str, str, np.ndarray]]:
        """Yield ``(doc_index, id, domain, tokens)`` for the documents in ``split`` and ``domain`` (``None``: any), in order."""
        indices = self.select(split=split, domain=domain)
        offsets, lengths = self._offsets()
        chosen = self.documents.take(pa.array(indices)) if len(indices) != len(self) else self.documents
        ids = chosen.column("id").to_pylist()
        domains = chosen.column("domain").to_pylist()
        for index, doc_id, doc_domain in zip(indices.tolist(), ids, domains):
            start = int(offsets[index])
            yield index, doc_id, doc_domain, self.tokens[start : start + int(lengths[index])]
