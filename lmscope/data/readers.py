"""Streaming document readers: JSONL (plain, ``.gz``, ``.zst``), Parquet, directories of text files.

Every reader is a generator in constant memory (one line, one Parquet row batch
or one file at a time) that updates a :class:`~lmscope.data.documents.ReadStats`.
A malformed record is skipped, counted and noted as ``file:line: what``; with
``strict=True`` it raises :class:`~lmscope.errors.LmscopeError` instead.
Invalid UTF-8 is replaced by U+FFFD and counted (also under ``strict``).

Record fields (JSONL objects, Parquet columns):

- ``text`` (required, string; another name with ``text_field``);
- ``id`` (string or integer; default ``<file name>:<line>``);
- ``domain`` (string; default the reader's ``domain`` argument, else the file name without extensions);
- ``meta`` (object); any other field is kept in ``meta`` too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmscope.data.documents import Document, ReadStats
from lmscope.data.streams import iter_lines
from lmscope.errors import LmscopeError

SourceFormat = Literal["jsonl", "parquet", "textdir"]

SUPPORTED_FORMATS = ".jsonl, .jsonl.gz, .jsonl.zst, .parquet or a directory of text files"

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst", ".jsonl.zstd")
_PARQUET_BATCH_ROWS = 1024
_SURROGATE = re.compile("[\ud800-\udfff]")


class MalformedRecord(Exception):
    """A record that cannot become a document; ``str(err)`` says why."""


def source_format(path: Path) -> SourceFormat:
    """The format of a document source, from its suffix (or ``textdir`` for a directory)."""
    if path.is_dir():
        return "textdir"
    if not path.exists():
        raise LmscopeError(f"document source {str(path)!r} does not exist; check the path.")
    name = path.name.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise LmscopeError(f"document source {str(path)!r} has an unknown format; give {SUPPORTED_FORMATS}.")


def base_name(path: Path) -> str:
    """A file name without its extensions: ``wiki.jsonl.zst`` → ``wiki``."""
    return path.name.split(".", 1)[0] or path.name


def decode_utf8(data: bytes) -> tuple[str, bool]:
    """Decode UTF-8, replacing invalid bytes with U+FFFD; also say whether any were replaced."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def clean_surrogates(text: str) -> tuple[str, bool]:
    """Replace unpaired surrogates (from JSON escapes like ``"\\ud800"``), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text), True


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def record_to_document(
    record: Any,
    *,
    default_id: str,
    default_domain: str,
    text_field: str = "text",
    id_field: str = "id",
) -> tuple[Document, bool]:
    """Turn one parsed record into a :class:`Document`; raise :class:`MalformedRecord` if it cannot be one.

    Returns the document and whether unpaired surrogates had to be replaced in its text.
    """
    if not isinstance(record, dict):
        raise MalformedRecord(f"the record is {_type_name(record)}, not an object")
    if text_field not in record or record[text_field] is None:
        raise MalformedRecord(f"the field {text_field!r} is missing")
    text = record[text_field]
    if not isinstance(text, str):
        raise MalformedRecord(f"the field {text_field!r} is {_type_name(text)}, not a string")
    doc_id = record.get(id_field)
    if doc_id is None:
        doc_id = default_id
    elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise MalformedRecord(f"the field {id_field!r} is {_type_name(doc_id)}, not a string or integer")
    doc_id = str(doc_id)
    if not doc_id:
        raise MalformedRecord(f"the field {id_field!r} is empty")
    domain = record.get("domain")
    if domain is None:
        domain = default_domain
    elif not isinstance(domain, str) or not domain:
        raise MalformedRecord(f"the field 'domain' is {_type_name(domain) if domain != '' else 'empty'}, not a non-empty string")
    meta = record.get("meta")
    if meta is None:
        meta = {}
    elif isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            raise MalformedRecord("the field 'meta' is a string that is not JSON") from None
    if not isinstance(meta, dict):
        raise MalformedRecord(f"the field 'meta' is {_type_name(meta)}, not an object")
    extra = {key: value for key, value in record.items() if key not in {text_field, id_field, "domain", "meta"}}
    if extra:
        meta = {**extra, **meta}
    text, replaced = clean_surrogates(text)
    return Document(id=doc_id, domain=domain, text=text, meta=meta), replaced


def _skip_or_fail(stats: ReadStats, where: str, problem: str, strict: bool) -> None:
    if strict:
        raise LmscopeError(f"{where}: {problem}; fix the record, or leave out --strict to skip and count it.")
    stats.skipped_malformed += 1
    stats.note(f"{where}: {problem}")


def _accept(
    record: Any, replaced: bool, stats: ReadStats, where: str, strict: bool, default_id: str,
    default_domain: str, text_field: str, id_field: str,
) -> Document | None:
    """The record as a counted :class:`Document`, or ``None`` when it is malformed (reported and counted, or raised if strict)."""
    try:
        document, surrogates = record_to_document(
            record, default_id=default_id, default_domain=default_domain, text_field=text_field, id_field=id_field
        )
    except MalformedRecord as err:
        _skip_or_fail(stats, where, str(err), strict)
        return None
    if replaced or surrogates:
        stats.utf8_replaced += 1
        stats.note(f"{where}: invalid UTF-8 replaced by U+FFFD")
    stats.count_document(document)
    return document


def read_jsonl(
    path: Path,
    stats: ReadStats,
    *,
    strict: bool = False,
    domain: str | None = None,
    text_field: str = "text",
    id_field: str = "id",
) -> Iterator[Document]:
    """Yield the documents of a ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` file, one line at a time."""
    stats.files += 1
    default_domain = domain or base_name(path)
    for line_number, raw in enumerate(iter_lines(path), start=1):
        if not raw.strip():
            stats.blank_lines += 1
            continue
        stats.records += 1
        where = f"{path}:{line_number}"
        line, replaced = decode_utf8(raw.rstrip(b"\r\n"))
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            _skip_or_fail(stats, where, f"bad JSON ({err.msg} at column {err.colno})", strict)
            continue
        document = _accept(record, replaced, stats, where, strict, f"{path.name}:{line_number}", default_domain, text_field, id_field)
        if document is not None:
            yield document


def read_parquet(
    path: Path,
    stats: ReadStats,
    *,
    strict: bool = False,
    domain: str | None = None,
    text_field: str = "text",
    id_field: str = "id",
) -> Iterator[Document]:
    """Yield the documents of a Parquet file, reading :data:`_PARQUET_BATCH_ROWS` rows at a time.

    The text column (string or binary) is decoded here, so invalid UTF-8 is replaced and counted
    rather than failing the whole batch. Issues name the row as ``file:row N`` (1-based).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats.files += 1
    default_domain = domain or base_name(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise LmscopeError(f"{path} is not a readable Parquet file ({_first_line(err)}); it may be truncated; re-create it.") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise LmscopeError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); pass --text-field NAME.")
    text_type = schema.field(text_field).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_binary(text_type) or pa.types.is_large_binary(text_type)):
        raise LmscopeError(f"{path}: column {text_field!r} holds {text_type}, not text; pass the text column with --text-field NAME.")
    row_number = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            texts = batch.column(text_field)
            if pa.types.is_string(texts.type):
                texts = texts.view(pa.binary())
            elif pa.types.is_large_string(texts.type):
                texts = texts.view(pa.large_binary())
            raw_texts = texts.to_pylist()
            others = {name: batch.column(name).to_pylist() for name in batch.schema.names if name != text_field}
            for i, raw in enumerate(raw_texts):
                row_number += 1
                stats.records += 1
                where = f"{path}:row {row_number}"
                record = {name: values[i] for name, values in others.items()}
                replaced = False
                if raw is not None:
                    record[text_field], replaced = decode_utf8(raw)
                document = _accept(record, replaced, stats, where, strict, f"{path.name}:{row_number}", default_domain, text_field, id_field)
                if document is not None:
                    yield document
    except (pa.ArrowException, OSError) as err:
        raise LmscopeError(f"{path} is corrupt after row {row_number} ({_first_line(err)}); re-create it.") from None


def iter_text_files(root: Path) -> Iterator[Path]:
    """Regular, non-hidden files under ``root``, depth first, the entries of each directory sorted by name."""
    with os.scandir(root) as scan:
        entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir():
            yield from iter_text_files(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def read_text_dir(
    root: Path,
    stats: ReadStats,
    *,
    strict: bool = False,
    domain: str | None = None,
) -> Iterator[Document]:
    """Yield one document per text file under ``root`` (sorted), with ``id`` the relative POSIX path.

    The domain is ``domain`` if given, else the first directory of the relative path, else the
    name of ``root`` itself (for files directly in it). Files containing NUL bytes are binary and
    are skipped as malformed.
    """
    for path in iter_text_files(root):
        relative = path.relative_to(root).as_posix()
        stats.files += 1
        stats.records += 1
        where = f"{path}:1"
        try:
            data = path.read_bytes()
        except OSError as err:
            _skip_or_fail(stats, where, f"it could not be read ({err.strerror or err})", strict)
            continue
        if b"\0" in data:
            _skip_or_fail(stats, where, "it is a binary file (it holds NUL bytes)", strict)
            continue
        text, replaced = decode_utf8(data)
        parts = relative.split("/")
        file_domain = domain or (parts[0] if len(parts) > 1 else root.resolve().name)
        document = Document(id=relative, domain=file_domain, text=text, meta={})
        if replaced:
            stats.utf8_replaced += 1
            stats.note(f"{where}: invalid UTF-8 replaced by U+FFFD")
        stats.count_document(document)
        yield document


@dataclass
class DocumentReader:
    """Iterate the documents of one or more sources, in order, keeping :class:`ReadStats`.

    Each source is a JSONL file (plain, ``.gz``, ``.zst``), a Parquet file or a directory of
    text files. Sources are checked when the reader is made; iterate it once.

    Attributes:
        paths: the sources, in reading order.
        strict: raise on the first malformed record instead of skipping and counting it.
        domain: the domain of documents whose record names none (default: per source, see the readers).
        text_field: name of the text field or column.
        id_field: name of the id field or column.
        stats: counts for everything read so far.
    """

    paths: list[Path]
    strict: bool = False
    domain: str | None = None
    text_field: str = "text"
    id_field: str = "id"

    def __post_init__(self) -> None:
        self.paths = [Path(path) for path in self.paths]
        if not self.paths:
            raise LmscopeError(f"no document source was given; give one or more of {SUPPORTED_FORMATS}.")
        self.formats = [source_format(path) for path in self.paths]
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[Document]:
        for path, kind in zip(self.paths, self.formats):
            if kind == "jsonl":
                yield from read_jsonl(path, self.stats, strict=self.strict, domain=self.domain, text_field=self.text_field, id_field=self.id_field)
            elif kind == "parquet":
                yield from read_parquet(path, self.stats, strict=self.strict, domain=self.domain, text_field=self.text_field, id_field=self.id_field)
            else:
                yield from read_text_dir(path, self.stats, strict=self.strict, domain=self.domain)


def read_documents(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], **options: Any) -> DocumentReader:
    """A :class:`DocumentReader` over one source or several (options as for :class:`DocumentReader`)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return DocumentReader([Path(path) for path in paths], **options)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
