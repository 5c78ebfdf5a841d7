"""Queries over a built index: count, locate, ∞-gram next-token distributions, document windows.

Every query runs shard by shard and combines the answers: counts add up, matches are listed
in corpus order (shards hold consecutive documents), next-token counts add up.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmscope.errors import LmscopeError
from lmscope.index.layout import (
    DOC_STARTS_FILE,
    DOCUMENTS_FILE,
    MANIFEST_FILE,
    SUFFIX_ARRAY_FILE,
    TOKENS_FILE,
    ShardInfo,
    read_manifest,
    stream_dtype_of,
)
from lmscope.index.suffix_array import StoredSuffixArray

_GATHER_LIMIT = 1 << 16
"""Up to this many occurrences, next tokens are read in one vectorized gather; beyond, by galloping over the sorted run of each."""


@dataclass(frozen=True)
class Match:
    """One occurrence of a token sequence inside a corpus document.

    Attributes:
        doc_index: the document's index in the corpus.
        offset: where the sequence starts in the document (token position).
        length: tokens in the sequence.
        doc_id, domain, split: the document's id, domain and split.
    """

    doc_index: int
    offset: int
    length: int
    doc_id: str = ""
    domain: str = ""
    split: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "doc_index": self.doc_index,
            "doc_id": self.doc_id,
            "domain": self.domain,
            "split": self.split,
            "offset": self.offset,
            "length": self.length,
        }


@dataclass
class Locations:
    """The result of :meth:`Index.locate`.

    Attributes:
        tokens: the sequence searched for.
        count: every occurrence in the corpus.
        matches: the first ``limit`` of them in corpus order (document, then offset).
    """

    tokens: list[int]
    count: int
    matches: list[Match]

    @property
    def truncated(self) -> bool:
        return len(self.matches) < self.count

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "count": self.count, "truncated": self.truncated, "matches": [m.to_dict() for m in self.matches]}


@dataclass
class NextTokens:
    """The ∞-gram answer for a context: the longest suffix of the context that occurs in the corpus followed by a token, and what follows it.

    Attributes:
        context: the context given.
        suffix_length: tokens of the longest such suffix (0: none occurs, and ``counts`` are the unigram counts).
        context_count: occurrences of that suffix followed by a token of the same document.
        counts: next token → occurrences, most frequent first (ties by id).
        next_token: the token asked about, if any.
        next_count: its count after the suffix.
        probability: ``next_count / context_count`` (the ∞-gram probability), or ``None``.
    """

    context: list[int]
    suffix_length: int
    context_count: int
    counts: dict[int, int]
    next_token: int | None = None

    @property
    def suffix(self) -> list[int]:
        return self.context[len(self.context) - self.suffix_length :]

    @property
    def next_count(self) -> int | None:
        return None if self.next_token is None else self.counts.get(self.next_token, 0)

    @property
    def probability(self) -> float | None:
        if self.next_token is None or self.context_count == 0:
            return None
        return self.counts.get(self.next_token, 0) / self.context_count

    def distribution(self, top: int | None = None) -> list[tuple[int, int, float]]:
        """``(token, count, probability)`` of the ``top`` most frequent next tokens (all by default)."""
        items = list(self.counts.items())[:top]
        return [(token, count, count / self.context_count) for token, count in items]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        return {
            "context": self.context,
            "suffix_length": self.suffix_length,
            "suffix": self.suffix,
            "context_count": self.context_count,
            "distinct_next_tokens": len(self.counts),
            "next_token": self.next_token,
            "next_count": self.next_count,
            "probability": self.probability,
            "distribution": [{"token": t, "count": c, "probability": p} for t, c, p in self.distribution(top)],
        }


@dataclass
class Window:
    """Tokens of a document around a match.

    Attributes:
        doc_index, doc_id: the document.
        start, stop: the window's token range in the document (stop excluded).
        match_start, match_stop: the match's token range in the document.
        tokens: the window's token ids.
        text: the window decoded, when a tokenizer was available; with ``before``/``match``/``after`` parts in ``parts``.
    """

    doc_index: int
    doc_id: str
    start: int
    stop: int
    match_start: int
    match_stop: int
    tokens: list[int]
    text: str | None = None
    parts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "doc_index": self.doc_index,
            "doc_id": self.doc_id,
            "start": self.start,
            "stop": self.stop,
            "match_start": self.match_start,
            "match_stop": self.match_stop,
            "tokens": self.tokens,
        }
        if self.text is not None:
            out["text"] = self.text
            out["parts"] = self.parts
        return out


class _Shard:
    """One shard opened for reading: its stream, suffix array and document starts (memmaps)."""

    def __init__(self, root: Path, info: ShardInfo, dtype: np.dtype) -> None:
        self.info = info
        directory = root / info.name
        for name in (TOKENS_FILE, SUFFIX_ARRAY_FILE, DOC_STARTS_FILE):
            if not (directory / name).is_file():
                raise LmscopeError(f"{directory / name} is missing; the index is damaged: build it again into a new directory.")
        n = info.n_positions
        size = (directory / TOKENS_FILE).stat().st_size
        if size != n * dtype.itemsize:
            raise LmscopeError(f"{directory / TOKENS_FILE} holds {size} bytes, not the {n * dtype.itemsize} its manifest says; build the index again.")
        self.stream = np.memmap(directory / TOKENS_FILE, dtype=dtype, mode="r", shape=(n,))
        self.sa = StoredSuffixArray(directory / SUFFIX_ARRAY_FILE, n, info.sa_width)
        n_docs = info.doc_stop - info.doc_start
        size = (directory / DOC_STARTS_FILE).stat().st_size
        if size != n_docs * 8:
            raise LmscopeError(f"{directory / DOC_STARTS_FILE} holds {size} bytes, not the {n_docs * 8} its manifest says; build the index again.")
        self.starts = np.memmap(directory / DOC_STARTS_FILE, dtype="<u8", mode="r", shape=(n_docs,))
        self.n = n

    # --- binary searches over the suffix array ---------------------------------------------

    def _compare(self, i: int, pattern: np.ndarray) -> int:
        """-1, 0 or 1 as suffix ``SA[i]`` sorts before the pattern, starts with it, or sorts after it."""
        pos = self.sa[i]
        segment = self.stream[pos : pos + len(pattern)]
        k = len(segment)
        differ = np.flatnonzero(segment != pattern[:k])
        if len(differ):
            j = differ[0]
            return -1 if segment[j] < pattern[j] else 1
        return 0 if k == len(pattern) else -1

    def bound(self, pattern: np.ndarray, after: bool, lo: int = 0, hi: int | None = None) -> int:
        """The first suffix-array index in ``[lo, hi)`` whose suffix is ≥ the pattern (``after``: > every suffix starting with it)."""
        hi = self.n if hi is None else hi
        limit = 0 if after else -1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._compare(mid, pattern) <= limit:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def range(self, pattern: np.ndarray) -> tuple[int, int]:
        """``[lo, hi)``: the suffix-array indices of the suffixes that start with ``pattern``."""
        lo = self.bound(pattern, after=False)
        return lo, self.bound(pattern, after=True, lo=lo)

    def continued_range(self, suffix: np.ndarray, separator: int) -> tuple[int, int]:
        """``[lo, hi)``: occurrences of ``suffix`` followed by a token of the same document.

        Inside the range of ``suffix``, suffixes are sorted by the token that follows: the one
        that ends the stream (nothing follows) comes first, those followed by the separator last.
        """
        lo = self.bound(suffix, after=False)
        hi = self.bound(np.append(suffix, np.asarray(separator, dtype=suffix.dtype)), after=False, lo=lo)
        if lo < hi and len(suffix) and self.sa[lo] + len(suffix) == self.n:
            lo += 1
        return lo, hi

    # --- next tokens -----------------------------------------------------------------------

    def next_token_counts(self, lo: int, hi: int, shift: int, separator: int, counts: Counter[int]) -> None:
        """Add to ``counts`` the token at offset ``shift`` of every suffix ``SA[lo:hi]`` (a continued range)."""
        if hi <= lo:
            return
        if shift == 0 and hi - lo == self.n - len(self.starts):  # every token of the shard: a plain histogram
            histogram = np.zeros(1 << 16, dtype=np.int64) if self.stream.dtype.itemsize == 2 else None
            for start in range(0, self.n, 1 << 24):
                chunk = np.asarray(self.stream[start : start + (1 << 24)])
                if histogram is not None:
                    histogram += np.bincount(chunk, minlength=1 << 16)
                    continue
                values, occurrences = np.unique(chunk[chunk != separator], return_counts=True)
                counts.update(dict(zip(values.tolist(), occurrences.tolist())))
            if histogram is not None:
                histogram[separator] = 0
                values = np.flatnonzero(histogram)
                counts.update(dict(zip(values.tolist(), histogram[values].tolist())))
            return
        if hi - lo <= _GATHER_LIMIT:
            values, occurrences = np.unique(np.asarray(self.stream[self.sa.slice(lo, hi) + shift]), return_counts=True)
            counts.update(dict(zip(values.tolist(), occurrences.tolist())))
            return

        def token(i: int) -> int:
            return int(self.stream[self.sa[i] + shift])

        i = lo
        while i < hi:  # next tokens are sorted inside the range: gallop to the end of each run
            value, last, step = token(i), i, 1
            while i + step < hi and token(i + step) == value:
                last, step = i + step, step * 2
            a, b = last + 1, min(i + step, hi)
            while a < b:
                mid = (a + b) // 2
                if token(mid) == value:
                    a = mid + 1
                else:
                    b = mid
            counts[value] += a - i
            i = a

    def locate(self, position: int) -> tuple[int, int]:
        """(document index within the shard, offset in it) of a stream position."""
        local = int(np.searchsorted(self.starts, position, side="right")) - 1
        return local, position - int(self.starts[local])

    def document_span(self, local: int) -> tuple[int, int]:
        """Stream positions ``[start, stop)`` of the shard's ``local``-th document."""
        start = int(self.starts[local])
        stop = int(self.starts[local + 1]) - 1 if local + 1 < len(self.starts) else self.n
        return start, stop


class Index:
    """A suffix-array index opened for queries (see :mod:`lmscope.index`).

    Args:
        path: the index directory (built by :func:`lmscope.index.build_index`).
        tokenizer: for text queries and decoding: a model spec or tokenizer directory; by default
            the tokenizer the corpus was tokenized with (as its manifest names it).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[_Shard], documents: pa.Table, tokenizer: str | None) -> None:
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.documents = documents
        self.separator = int(manifest["separator"])
        self.vocab_size = int(manifest["vocab_size"])
        self.dtype = shards[0].stream.dtype if shards else np.dtype("<u2")
        self._tokenizer_spec = tokenizer
        self._doc_starts = [shard.info.doc_start for shard in shards]
        self._encoder: Any = None
        self._decoder: Any = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], tokenizer: str | None = None) -> Index:
        """Open the index in ``path``; :class:`LmscopeError` when it is missing, unfinished or damaged."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise LmscopeError(f"index {str(path)!r} does not exist; build it with `lmscope index build CORPUS --out {path}`.")
        manifest = read_manifest(path)
        if manifest is None:
            raise LmscopeError(f"{path} holds no {MANIFEST_FILE}, so it is not an index; build one with `lmscope index build CORPUS --out {path}`.")
        infos = [ShardInfo.from_dict(record, path / MANIFEST_FILE) for record in manifest.get("shards", [])]
        if not manifest.get("complete"):
            raise LmscopeError(
                f"index {str(path)!r} is unfinished ({len(manifest.get('finished', []))} of {len(infos)} shards built); "
                f"rerun `lmscope index build` with the same corpus and --out to finish it."
            )
        dtype = stream_dtype_of(manifest, path / MANIFEST_FILE)
        try:
            documents = pq.read_table(path / DOCUMENTS_FILE)
        except (pa.ArrowException, OSError) as err:
            raise LmscopeError(f"{path / DOCUMENTS_FILE} could not be read ({str(err).splitlines()[0]}); build the index again.") from None
        shards = [_Shard(path, info, dtype) for info in infos]
        return cls(path, manifest, shards, documents, tokenizer)

    # --- corpus facts ----------------------------------------------------------------------

    @property
    def n_documents(self) -> int:
        return int(self.manifest["corpus"]["n_documents"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["corpus"]["n_tokens"])

    @property
    def corpus_identity(self) -> str:
        return str(self.manifest["corpus"]["identity"])

    def size_bytes(self) -> int:
        """Bytes of every file of the index."""
        return sum(path.stat().st_size for path in self.path.rglob("*") if path.is_file() and path.name != ".lock")

    def info(self) -> dict[str, Any]:
        """Sizes and layout, for ``lmscope index info``."""
        size = self.size_bytes()
        return {
            "path": str(self.path),
            "corpus": self.manifest["corpus"]["path"],
            "n_documents": self.n_documents,
            "n_tokens": self.n_tokens,
            "vocab_size": self.vocab_size,
            "stream_dtype": self.manifest["stream_dtype"],
            "separator": self.separator,
            "shards": [shard.info.to_dict() for shard in self.shards],
            "bytes": size,
            "bytes_per_token": round(size / max(self.n_tokens, 1), 4),
        }

    # --- queries ---------------------------------------------------------------------------

    def count(self, tokens: Any) -> int:
        """Occurrences of the token sequence in the corpus (never across two documents)."""
        pattern = self._query(tokens, "token sequence to count")
        return sum(hi - lo for lo, hi in (shard.range(pattern) for shard in self.shards))

    def locate(self, tokens: Any, limit: int | None = 100) -> Locations:
        """Every occurrence's count, and the first ``limit`` (``None``: all) in corpus order as :class:`Match` es.

        Reading the matches of one shard costs memory for all its occurrences (8 bytes each).
        """
        pattern = self._query(tokens, "token sequence to locate")
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise LmscopeError(f"--limit {limit!r} is negative; give a number of matches ≥ 0.")
        count, found = 0, []
        for shard in self.shards:
            lo, hi = shard.range(pattern)
            count += hi - lo
            wanted = (hi - lo) if limit is None else min(hi - lo, limit - len(found))
            if wanted <= 0:
                continue
            positions = np.sort(shard.sa.slice(lo, hi))[:wanted]
            local = np.searchsorted(shard.starts, positions.astype(np.uint64), side="right").astype(np.int64) - 1
            offsets = positions - shard.starts[local].astype(np.int64)
            found += [(shard.info.doc_start + d, o) for d, o in zip(local.tolist(), offsets.tolist())]
        return Locations(pattern.tolist(), count, self._matches(found, len(pattern)))

    def infgram(self, context: Any, next_token: int | None = None) -> NextTokens:
        """The ∞-gram: the next-token distribution after the longest suffix of ``context`` that occurs followed by a token.

        The suffix is searched by bisection over its length (a suffix that occurs implies every
        shorter one does); an empty context, or one whose last token never occurs, gives the
        unigram distribution (``suffix_length`` 0). Ends of documents are never followed.
        """
        ctx = self._query(context, "context", allow_empty=True)
        if next_token is not None:
            next_token = int(self._query([next_token], "next token")[0])

        def continued(length: int) -> int:
            suffix = ctx[len(ctx) - length :]
            return sum(hi - lo for lo, hi in (shard.continued_range(suffix, self.separator) for shard in self.shards))

        lo, hi = 0, len(ctx)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if continued(mid) > 0:
                lo = mid
            else:
                hi = mid - 1
        suffix = ctx[len(ctx) - lo :]
        counts: Counter[int] = Counter()
        total = 0
        for shard in self.shards:
            a, b = shard.continued_range(suffix, self.separator)
            total += b - a
            shard.next_token_counts(a, b, lo, self.separator, counts)
        ordered = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        return NextTokens(ctx.tolist(), lo, total, ordered, next_token)

    def document_tokens(self, doc_index: int) -> np.ndarray:
        """The tokens of document ``doc_index`` (a view of the index's stream)."""
        shard, local = self._shard_of(doc_index)
        start, stop = shard.document_span(local)
        return shard.stream[start:stop]

    def window(self, match: Match, before: int = 16, after: int = 16, decode: bool = False) -> Window:
        """The tokens of ``match``'s document from ``before`` tokens ahead of it to ``after`` past it (clipped to the document).

        ``decode``: add the text (needs the tokenizer, see :class:`Index`).
        """
        if before < 0 or after < 0:
            raise LmscopeError(f"a window of {before} tokens before and {after} after is negative; give sizes ≥ 0.")
        tokens = self.document_tokens(match.doc_index)
        if not 0 <= match.offset <= match.offset + match.length <= len(tokens):
            raise LmscopeError(
                f"match at offset {match.offset} of {match.length} tokens lies outside document {match.doc_index} ({len(tokens)} tokens); "
                "take matches from Index.locate."
            )
        start, stop = max(0, match.offset - before), min(len(tokens), match.offset + match.length + after)
        ids = np.asarray(tokens[start:stop]).tolist()
        doc_id = str(self.documents.column("id")[match.doc_index].as_py())
        window = Window(match.doc_index, doc_id, start, stop, match.offset, match.offset + match.length, ids)
        if decode:
            a, b = match.offset - start, match.offset - start + match.length
            window.parts = {"before": self.decode(ids[:a]), "match": self.decode(ids[a:b]), "after": self.decode(ids[b:])}
            window.text = self.decode(ids)
        return window

    def exposures(self, match: Match, source: Any, before_step: int | None = None) -> Any:
        """When a mini suite trained on ``match``: see :func:`lmscope.index.exposures.match_exposures`."""
        from lmscope.index.exposures import match_exposures

        return match_exposures(self, match, source, before_step=before_step)

    # --- text ------------------------------------------------------------------------------

    @property
    def tokenizer_spec(self) -> str | None:
        """The tokenizer used for text: the one given to :meth:`open`, else the corpus's."""
        if self._tokenizer_spec is not None:
            return self._tokenizer_spec
        return (self.manifest["corpus"].get("tokenizer") or {}).get("spec")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the corpus's tokenizer (no special tokens); :class:`LmscopeError` when it encodes to nothing."""
        if self._encoder is None:
            from lmscope.data.tokenizer_info import corpus_tokenizer

            encoder = corpus_tokenizer(self._load_tokenizer())
            recorded = (self.manifest["corpus"].get("tokenizer") or {}).get("sha256")
            if recorded and encoder.sha256 != recorded:
                raise LmscopeError(
                    f"tokenizer {self.tokenizer_spec!r} is not the one corpus {self.manifest['corpus']['path']!r} was tokenized with "
                    f"({(self.manifest['corpus'].get('tokenizer') or {}).get('spec')!r}); give that one with --tokenizer."
                )
            self._encoder = encoder
        ids = self._encoder.encode_batch([text])[0]
        if not ids:
            raise LmscopeError(f"text {text!r} encodes to no tokens; give some text.")
        return [int(i) for i in ids]

    def decode(self, tokens: Any) -> str:
        """Text of token ids, with the corpus's tokenizer."""
        if self._decoder is None:
            self._decoder = self._load_tokenizer()
        return str(self._decoder.decode([int(t) for t in tokens]))

    def _load_tokenizer(self) -> Any:
        spec = self.tokenizer_spec
        if spec is None:
            raise LmscopeError(f"the corpus of index {str(self.path)!r} names no tokenizer; give one with --tokenizer to use text.")
        from lmscope.data.tokenizer_info import load_any_tokenizer

        return load_any_tokenizer(spec)

    # --- helpers ---------------------------------------------------------------------------

    def _query(self, tokens: Any, what: str, allow_empty: bool = False) -> np.ndarray:
        if isinstance(tokens, str):
            raise LmscopeError(f"the {what} is text ({tokens!r}); encode it first (Index.encode, or --text on the command line).")
        try:
            values = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens)
        except TypeError:
            raise LmscopeError(f"the {what} {tokens!r} is not a sequence of token ids; give a list of integers.") from None
        if values.size == 0:
            if allow_empty:
                return np.zeros(0, dtype=self.dtype)
            raise LmscopeError(f"the {what} is empty; give at least one token id.")
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise LmscopeError(f"the {what} {values.tolist()!r} is not a flat sequence of integer token ids; give a list of integers.")
        bad = values[(values < 0) | (values >= self.vocab_size)]
        if len(bad):
            raise LmscopeError(
                f"token id {int(bad[0])} in the {what} is outside the vocabulary of the index's corpus (ids 0 … {self.vocab_size - 1}); "
                "check the ids, or give text instead."
            )
        return values.astype(self.dtype)

    def _shard_of(self, doc_index: int) -> tuple[_Shard, int]:
        if isinstance(doc_index, bool) or not isinstance(doc_index, (int, np.integer)) or not 0 <= doc_index < self.n_documents:
            raise LmscopeError(f"document index {doc_index!r} is out of range; the index holds documents 0 … {self.n_documents - 1}.")
        k = bisect.bisect_right(self._doc_starts, int(doc_index)) - 1
        return self.shards[k], int(doc_index) - self.shards[k].info.doc_start

    def _matches(self, found: list[tuple[int, int]], length: int) -> list[Match]:
        if not found:
            return []
        rows = self.documents.take(pa.array([d for d, _ in found], pa.int64()))
        ids, domains, splits = (rows.column(name).to_pylist() for name in ("id", "domain", "split"))
        return [Match(d, o, length, i, dom, s) for (d, o), i, dom, s in zip(found, ids, domains, splits)]
