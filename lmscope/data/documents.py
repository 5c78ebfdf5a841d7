"""The document record every reader yields, and the counts every reader keeps.

A :class:`Document` is one training document: ``{id, domain, text, meta}``.
A :class:`ReadStats` counts what happened while reading, so that nothing is
dropped silently: malformed records are skipped *and counted*, invalid UTF-8 is
replaced *and counted*, and the first few problems are kept as ``file:line``
messages. The counts end up in the tokenized corpus manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: How many ``file:line: problem`` messages a :class:`ReadStats` keeps; later ones are only counted.
MAX_ISSUES = 50


@dataclass(frozen=True, slots=True)
class Document:
    """One document.

    Attributes:
        id: identifier, unique within a corpus (a record's ``id`` field, a relative path, or ``file:line``).
        domain: the domain it belongs to (``python-docs``, ``manpages``, …); held-out splits are per domain.
        text: the text, always valid Unicode (invalid UTF-8 in the source was replaced with U+FFFD).
        meta: provenance and any other fields of the source record (JSON-serialisable).
    """

    id: str
    domain: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadStats:
    """Counts kept while reading documents; every record read is accounted for.

    ``records == documents + skipped_malformed`` (blank JSONL lines are not records).

    Attributes:
        files: source files opened.
        records: records seen (JSONL lines that are not blank, Parquet rows, files of a text directory).
        documents: documents yielded.
        skipped_malformed: records skipped because they were malformed (bad JSON, missing or
            mistyped field, binary file).
        utf8_replaced: documents in which invalid UTF-8 (or an unpaired surrogate) was replaced by U+FFFD.
        blank_lines: blank JSONL lines ignored.
        empty_documents: documents yielded whose text is empty.
        text_bytes: UTF-8 bytes of the text of the documents yielded.
        issues: the first :data:`MAX_ISSUES` problems as ``file:line: what`` messages.
        issues_not_shown: problems counted beyond those kept in ``issues``.
    """

    files: int = 0
    records: int = 0
    documents: int = 0
    skipped_malformed: int = 0
    utf8_replaced: int = 0
    blank_lines: int = 0
    empty_documents: int = 0
    text_bytes: int = 0
    issues: list[str] = field(default_factory=list)
    issues_not_shown: int = 0

    def note(self, message: str) -> None:
        """Keep a ``file:line: what`` message (only the first :data:`MAX_ISSUES` are kept)."""
        if len(self.issues) < MAX_ISSUES:
            self.issues.append(message)
        else:
            self.issues_not_shown += 1

    def count_document(self, document: Document) -> None:
        self.documents += 1
        size = len(document.text.encode("utf-8"))
        self.text_bytes += size
        if size == 0:
            self.empty_documents += 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)
