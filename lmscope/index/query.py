"""Queries over a built index: count, locate, ∞-gram next-token distributions and probabilities, longest matches, document windows.

Every query runs shard by shard (the searches are :class:`lmscope.index.search.ShardSearch`) and
combines the answers: counts add up, matches are listed in corpus order (shards hold consecutive
documents), next-token counts add up, a longest match is the longest of the shards' with the
counts of the shards that reach it.
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
import pyarrow.compute as pc
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
from lmscope.index.search import ShardSearch
from lmscope.index.suffix_array import StoredSuffixArray


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
class NextTokenProbability:
    """The ∞-gram probability of one next token (:meth:`Index.infgram_prob`): :class:`NextTokens` without the distribution.

    Attributes:
        context: the context given.
        suffix_length: tokens of the longest suffix of the context that occurs followed by a token (0: none does, unigram counts).
        context_count: occurrences of that suffix followed by a token of the same document.
        next_token: the token asked about.
        next_count: its occurrences after the suffix.
    """

    context: list[int]
    suffix_length: int
    context_count: int
    next_token: int
    next_count: int

    @property
    def suffix(self) -> list[int]:
        return self.context[len(self.context) - self.suffix_length :]

    @property
    def probability(self) -> float | None:
        """``next_count / context_count``, or ``None`` when nothing follows (an empty corpus)."""
        return self.next_count / self.context_count if self.context_count else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "suffix_length": self.suffix_length,
            "suffix": self.suffix,
            "context_count": self.context_count,
            "next_token": self.next_token,
            "next_count": self.next_count,
            "probability": self.probability,
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


class Shard:
    """One shard of an index opened for reading.

    Attributes:
        info: its record in the manifest (document range, positions, suffix-array width).
        stream: its token stream, ``n`` positions of the index's stream dtype, each document
            preceded by the separator — a plain ``np.ndarray`` view of the file's ``np.memmap``
            (no copy: only the pages read are loaded; see :mod:`lmscope.index.search` for why not the memmap itself).
        sa: its suffix array (:class:`~lmscope.index.suffix_array.StoredSuffixArray`).
        starts: ``uint64`` stream position of each of its documents' first token, likewise a view.
        n: positions in ``stream``.
        search: the suffix-array searches over it (:class:`~lmscope.index.search.ShardSearch`).
    """

    def __init__(self, root: Path, info: ShardInfo, dtype: np.dtype, separator: int) -> None:
        self.info = info
        directory = root / info.name
        for name in (TOKENS_FILE, SUFFIX_ARRAY_FILE, DOC_STARTS_FILE):
            if not (directory / name).is_file():
                raise LmscopeError(f"{directory / name} is missing; the index is damaged: build it again into a new directory.")
        n = info.n_positions
        size = (directory / TOKENS_FILE).stat().st_size
        if size != n * dtype.itemsize:
            raise LmscopeError(f"{directory / TOKENS_FILE} holds {size} bytes, not the {n * dtype.itemsize} its manifest says; build the index again.")
        self.stream = _mapped(directory / TOKENS_FILE, dtype, n)
        self.sa = StoredSuffixArray(directory / SUFFIX_ARRAY_FILE, n, info.sa_width)
        n_docs = info.doc_stop - info.doc_start
        size = (directory / DOC_STARTS_FILE).stat().st_size
        if size != n_docs * 8:
            raise LmscopeError(f"{directory / DOC_STARTS_FILE} holds {size} bytes, not the {n_docs * 8} its manifest says; build the index again.")
        self.starts = _mapped(directory / DOC_STARTS_FILE, np.dtype("<u8"), n_docs)
        self.n = n
        self.search = ShardSearch(self.stream, self.sa, separator)

    def documents_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(corpus document index, offset in it)`` of stream positions (``int64``, each inside a document)."""
        local = np.searchsorted(self.starts, positions.astype(np.uint64), side="right").astype(np.int64) - 1
        return self.info.doc_start + local, positions - self.starts[local].astype(np.int64)

    def document_span(self, local: int) -> tuple[int, int]:
        """Stream positions ``[start, stop)`` of the shard's ``local``-th document."""
        start = int(self.starts[local])
        stop = int(self.starts[local + 1]) - 1 if local + 1 < len(self.starts) else self.n
        return start, stop


def _mapped(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    """``n`` values of ``dtype`` in ``path``: a plain ndarray over the file's memory map (empty files are not mapped)."""
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))


class Index:
    """A suffix-array index opened for queries (see :mod:`lmscope.index`).

    Args:
        path: the index directory (built by :func:`lmscope.index.build_index`).
        tokenizer: for text queries and decoding: a model spec or tokenizer directory; by default
            the tokenizer the corpus was tokenized with (as its manifest names it).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[Shard], documents: pa.Table, tokenizer: str | None) -> None:
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
        self._fields: tuple[pa.Array, list[tuple[np.ndarray, list[str]]]] | None = None

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
        shards = [Shard(path, info, dtype, int(manifest["separator"])) for info in infos]
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

    def check_tokens(self, tokens: Any, what: str = "token sequence", allow_empty: bool = False) -> np.ndarray:
        """``tokens`` as a 1-D array of the stream dtype, once checked to be token ids of the corpus's vocabulary.

        Args:
            tokens: a sequence (or array) of integer token ids.
            what: how the error names them (e.g. ``"output to trace"``).
            allow_empty: accept an empty sequence.

        Raises :class:`LmscopeError` (one sentence) for text, non-integers, nesting, an empty
        sequence (unless allowed) or an id outside the vocabulary.
        """
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

    def count(self, tokens: Any) -> int:
        """Occurrences of the token sequence in the corpus (never across two documents)."""
        pattern = self.check_tokens(tokens, "token sequence to count").tolist()
        return sum(hi - lo for lo, hi in (shard.search.block(pattern) for shard in self.shards))

    def locate(self, tokens: Any, limit: int | None = 100) -> Locations:
        """Every occurrence's count, and the first ``limit`` (``None``: all) in corpus order as :class:`Match` es.

        Reading the matches of one shard costs memory for all its occurrences (8 bytes each).
        """
        pattern = self.check_tokens(tokens, "token sequence to locate").tolist()
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise LmscopeError(f"--limit {limit!r} is negative; give a number of matches ≥ 0.")
        count, docs, offsets = 0, [], []
        for shard in self.shards:
            lo, hi = shard.search.block(pattern)
            count += hi - lo
            wanted = (hi - lo) if limit is None else min(hi - lo, limit - sum(map(len, docs)))
            if wanted <= 0:
                continue
            positions = shard.search.positions(lo, hi)
            if wanted < len(positions):  # the first ``wanted`` in stream order, without sorting them all
                positions = np.partition(positions, wanted - 1)[:wanted]
            d, o = shard.documents_at(np.sort(positions))
            docs.append(d)
            offsets.append(o)
        return Locations(pattern, count, self.matches_at(_joined(docs), _joined(offsets), len(pattern)))

    def occurrences(self, tokens: Any, ranks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(doc_index, offset)``: two ``int64`` arrays of the occurrences of ``tokens``, in corpus order.

        Args:
            tokens: the token sequence.
            ranks: only these occurrences (distinct 0-based ranks in suffix-array order, shard by
                shard, each below :meth:`count`); all of them by default.
        """
        pattern = self.check_tokens(tokens).tolist()
        picked = None if ranks is None else np.asarray(ranks, dtype=np.int64).reshape(-1)
        docs, offsets, seen = [], [], 0
        for shard in self.shards:
            lo, hi = shard.search.block(pattern)
            if picked is None:
                positions = shard.search.positions(lo, hi)
            else:
                mine = picked[(picked >= seen) & (picked < seen + hi - lo)] - seen
                positions = shard.sa.take(lo + mine)
            seen += hi - lo
            if len(positions):
                d, o = shard.documents_at(np.sort(positions))
                docs.append(d)
                offsets.append(o)
        if picked is not None and len(picked) and not (0 <= int(picked.min()) and int(picked.max()) < seen):
            raise LmscopeError(f"occurrence ranks {int(picked.min())} … {int(picked.max())} are not all below the {seen} occurrences; give ranks 0 … {seen - 1}.")
        return _joined(docs), _joined(offsets)

    def matches_at(self, docs: Any, offsets: Any, length: int) -> list[Match]:
        """:class:`Match` es of ``length`` tokens at ``(docs[k], offsets[k])`` (corpus document index, token offset), with their documents' id, domain and split."""
        rows = np.asarray(docs, dtype=np.int64).reshape(-1)
        if not len(rows):
            return []
        ids, coded = self._document_fields()
        names = [ids.take(pa.array(rows)).to_pylist()] + [[labels[c] for c in codes[rows].tolist()] for codes, labels in coded]
        return [Match(d, o, length, i, dom, sp) for d, o, i, dom, sp in zip(rows.tolist(), np.asarray(offsets).tolist(), *names)]

    def _document_fields(self) -> tuple[pa.Array, list[tuple[np.ndarray, list[str]]]]:
        """The ``id`` column as one Arrow array, and ``domain`` and ``split`` as (``int32`` code per document, labels), built on first use.

        A :class:`Match` reads three fields of one document; through the table that costs an Arrow
        ``take`` of every column per call, which made listing 10 matches slower than finding them.
        """
        if self._fields is None:
            ids = self.documents.column("id").combine_chunks()
            coded = []
            for name in ("domain", "split"):
                encoded = pc.dictionary_encode(self.documents.column(name)).combine_chunks()
                coded.append((encoded.indices.to_numpy(zero_copy_only=False), [str(v) for v in encoded.dictionary.to_pylist()]))
            self._fields = (ids, coded)
        return self._fields

    def count_many(self, grams: Any, *, rows_per_batch: int = 1 << 15) -> np.ndarray:
        """Corpus counts of many token sequences of one length (``[M, n]``): ``M`` ``int64`` counts.

        The same answers as :meth:`count` for each row, by binary searches run side by side on
        whole arrays (:meth:`~lmscope.index.search.ShardSearch.bounds`), at a fraction of the cost
        per row when ``M`` is large (contamination checks count every n-gram of a document).
        """
        table = np.asarray(grams)
        if table.ndim != 2 or table.shape[1] == 0:
            raise LmscopeError(f"n-grams of shape {table.shape} are not [M, n] with n ≥ 1; stack sequences of one length.")
        counts = np.zeros(len(table), dtype=np.int64)
        if not len(table):
            return counts
        checked = self.check_tokens(table.reshape(-1), "n-grams").astype(np.int64).reshape(table.shape)
        for start in range(0, len(checked), rows_per_batch):
            part = checked[start : start + rows_per_batch]
            for shard in self.shards:
                lo, hi = shard.search.bounds(part)
                counts[start : start + len(part)] += hi - lo
        return counts

    def longest_matches(self, tokens: Any, *, cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        r"""For every start ``i``: :math:`\ell_i`, the length of the longest prefix of ``tokens[i:]`` that occurs in the corpus, and its count.

        Args:
            tokens: the token ids.
            cap: stop extending at this length (lengths are then ``min(ℓ_i, cap)``, counts those of the capped prefix).

        Returns:
            ``(lengths, counts)``, two ``int64`` arrays of ``len(tokens)``; a token that never
            occurs gives length 0 and count 0.
        """
        query = self.check_tokens(tokens).astype(np.int64)
        size = len(query)
        lengths = np.zeros(size, dtype=np.int64)
        counts = np.zeros(size, dtype=np.int64)
        if cap is not None and cap <= 0:
            return lengths, counts
        for i in range(size):
            stop = size if cap is None else min(size, i + int(cap))
            best, total = 0, 0
            for shard in self.shards:
                length, count = shard.search.longest(query, i, stop)
                if length > best:
                    best, total = length, count
                elif length == best and length:
                    total += count
            lengths[i], counts[i] = best, total
        return lengths, counts

    def infgram(self, context: Any, next_token: int | None = None) -> NextTokens:
        """The ∞-gram: the next-token distribution after the longest suffix of ``context`` that occurs followed by a token.

        The suffix is searched by bisection over its length (a suffix that occurs implies every
        shorter one does); an empty context, or one whose last token never occurs, gives the
        unigram distribution (``suffix_length`` 0). Ends of documents are never followed.
        """
        ctx = self.check_tokens(context, "context", allow_empty=True)
        if next_token is not None:
            next_token = int(self.check_tokens([next_token], "next token")[0])
        length, blocks = self._longest_continued(ctx.tolist())
        counts: Counter[int] = Counter()
        for shard, (a, b) in zip(self.shards, blocks):
            shard.search.next_token_counts(a, b, length, counts)
        ordered = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        return NextTokens(ctx.tolist(), length, sum(b - a for a, b in blocks), ordered, next_token)

    def infgram_prob(self, context: Any, next_token: int) -> NextTokenProbability:
        """The ∞-gram probability of ``next_token`` after ``context``: :meth:`infgram`'s answer for one token, without building the distribution.

        The same suffix and counts as :meth:`infgram`; the count of ``next_token`` is one more
        binary search per shard (inside the suffix's occurrences, they are sorted by the next token).
        """
        ctx = self.check_tokens(context, "context", allow_empty=True)
        token = int(self.check_tokens([next_token], "next token")[0])
        length, blocks = self._longest_continued(ctx.tolist())
        found = sum(shard.search.next_token_count(a, b, length, token) for shard, (a, b) in zip(self.shards, blocks))
        return NextTokenProbability(ctx.tolist(), length, sum(b - a for a, b in blocks), token, found)

    def _longest_continued(self, ctx: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """The length of the longest suffix of ``ctx`` that occurs followed by a token, and its continued block in each shard."""
        tried: dict[int, list[tuple[int, int]]] = {}

        def blocks(length: int) -> list[tuple[int, int]]:
            if length not in tried:
                suffix = ctx[len(ctx) - length :]
                tried[length] = [shard.search.continued_block(suffix) for shard in self.shards]
            return tried[length]

        lo, hi = 0, len(ctx)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if any(b > a for a, b in blocks(mid)):
                lo = mid
            else:
                hi = mid - 1
        return lo, blocks(lo)

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
        doc_id = str(self._document_fields()[0][match.doc_index].as_py())
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

    def _shard_of(self, doc_index: int) -> tuple[Shard, int]:
        if isinstance(doc_index, bool) or not isinstance(doc_index, (int, np.integer)) or not 0 <= doc_index < self.n_documents:
            raise LmscopeError(f"document index {doc_index!r} is out of range; the index holds documents 0 … {self.n_documents - 1}.")
        k = bisect.bisect_right(self._doc_starts, int(doc_index)) - 1
        return self.shards[k], int(doc_index) - self.shards[k].info.doc_start


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The ``int64`` arrays ``parts`` end to end."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
