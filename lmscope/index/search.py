r"""Searches over one shard's suffix array: the block of suffixes that start with a pattern, longest matches, next-token counts.

**Blocks.** The suffixes that start with a pattern :math:`q_0 … q_{m-1}` are one contiguous
*block* ``[lo, hi)`` of the suffix array. Inside a block whose suffixes share a prefix of
:math:`k` tokens, the suffixes are sorted by their token at offset :math:`k` (one that ends the
stream there sorts first), so the block of :math:`q_0 … q_k` is found by two binary searches on
that one token (:meth:`ShardSearch.narrow`): a search compares one token per step instead of a
whole prefix. The block of each first token is cached (:meth:`ShardSearch.first_block`), so a
count starts from a block ~1/V of the shard.

**Continued blocks.** The occurrences of a sequence *followed by a token of the same document*
(what the ∞-gram counts) are the part of its block whose token at offset :math:`m` is neither
past the stream's end (sorts first) nor the separator (the largest id, sorts last):
``[first ≥ 0, first ≥ separator)`` at offset :math:`m`. Inside it, suffixes are sorted by that
next token, so one token's count is one more :meth:`~ShardSearch.narrow`, and the whole
distribution is read in one gather (≤ :data:`_GATHER_LIMIT` occurrences) or by galloping over the
run of each next token.

**Longest matches.** :meth:`ShardSearch.longest` narrows token by token while the block holds
more than :data:`_SCAN_LIMIT` suffixes, then compares the remaining suffixes with the rest of the
query in one vectorized step, which gives the longest match and how many suffixes reach it.

**Plain arrays, and why.** The stream and suffix array are memory-mapped files (only the pages
read are loaded, so a shard of any size costs no memory up front). They are read here through
plain ``np.ndarray`` views of the ``np.memmap`` objects, and scalar reads — the whole cost of a
binary search — through ``memoryview`` s of the same memory, which answer Python ``int`` s.
``np.memmap.__getitem__`` is a Python-level override that wraps every result (about 1.3 µs a
scalar read and 5 µs a slice, against 0.5 µs for a plain ndarray and a few tens of ns for a
memoryview, measured on the benchmark machine); a count makes ~100 such reads, so reading through
the memmap made ``Index.count`` 3× slower than infini-gram's C++ and reading through memoryviews
makes it faster (``BENCHMARKS.md``). On a big-endian machine (the files are little-endian)
scalar reads go through the ndarray, and 5-byte suffix-array entries through ``int.from_bytes``
(slower, same answers).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from lmscope.index.suffix_array import StoredSuffixArray

_SCAN_LIMIT = 256
"""Blocks of at most this many suffixes are extended by vectorized comparison in :meth:`ShardSearch.longest`; larger ones are narrowed by binary search."""

_GATHER_LIMIT = 1 << 16
"""Up to this many occurrences, next tokens are read in one vectorized gather; beyond, by galloping over the sorted run of each."""


class _Items:
    """``array[j]`` as a Python ``int`` (the general path: any dtype, any byte order)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __getitem__(self, j: int) -> int:
        return int(self.array[j])


class _FiveByteItems:
    """Entry ``j`` of a 5-byte suffix array (``[n, 5]`` little-endian bytes) as a Python ``int``."""

    def __init__(self, entries: np.ndarray) -> None:
        self.raw = memoryview(np.ascontiguousarray(entries)).cast("B")

    def __getitem__(self, j: int) -> int:
        return int.from_bytes(self.raw[5 * j : 5 * j + 5], "little")


def scalar_reader(array: np.ndarray) -> Sequence[int] | _Items:
    """Something indexed like the 1-D unsigned ``array`` that answers Python ints: a native-order ``memoryview`` when the bytes allow it."""
    native = {2: "H", 4: "I"}.get(array.dtype.itemsize)
    if native and array.dtype.kind == "u" and array.dtype.isnative and array.ndim == 1 and array.flags.c_contiguous:
        view = memoryview(array).cast("B").cast(native)
        if view.itemsize == array.dtype.itemsize:
            return view
    return _Items(array)


class ShardSearch:
    """The suffix-array searches of one shard (see the module docstring).

    Args:
        stream: the shard's token stream, 1-D ``uint16``/``uint32`` (a plain view of its memmap),
            each document preceded by ``separator``.
        sa: the shard's suffix array.
        separator: the separator id (the stream dtype's largest value).

    Positions, blocks and counts are Python ints; patterns are sequences of token ids.
    """

    def __init__(self, stream: np.ndarray, sa: StoredSuffixArray, separator: int) -> None:
        self.stream = stream
        self.sa = sa
        self.n = len(stream)
        self.separator = separator
        self._tokens = scalar_reader(stream)
        self._starts = scalar_reader(sa.entries) if sa.width == 4 else _FiveByteItems(sa.entries)
        self._first: dict[int, tuple[int, int]] = {}

    # --- reading ---------------------------------------------------------------------------

    def positions(self, lo: int, hi: int) -> np.ndarray:
        """``SA[lo:hi]`` as ``int64``."""
        return self.sa.slice(lo, hi)

    # --- blocks ----------------------------------------------------------------------------

    def lower(self, lo: int, hi: int, depth: int, token: int) -> int:
        """The first ``j`` in ``[lo, hi)`` whose suffix's token at offset ``depth`` is ≥ ``token`` (past the stream's end counts as −1).

        The suffixes of ``[lo, hi)`` must share a prefix of ``depth`` tokens (so they are sorted by that token).
        """
        starts, tokens, n = self._starts, self._tokens, self.n
        while lo < hi:
            mid = (lo + hi) >> 1
            p = starts[mid] + depth
            if p >= n or tokens[p] < token:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def narrow(self, lo: int, hi: int, depth: int, token: int) -> tuple[int, int]:
        """Inside ``[lo, hi)`` (suffixes sharing ``depth`` tokens), the block whose token at offset ``depth`` is ``token``."""
        first = self.lower(lo, hi, depth, token)
        return first, self.lower(first, hi, depth, token + 1)

    def first_block(self, token: int) -> tuple[int, int]:
        """The block of suffixes that start with ``token`` (cached)."""
        block = self._first.get(token)
        if block is None:
            block = self._first[token] = self.narrow(0, self.n, 0, token)
        return block

    def block(self, pattern: Sequence[int]) -> tuple[int, int]:
        """``[lo, hi)``: the suffixes that start with ``pattern`` (non-empty), narrowed token by token."""
        lo, hi = self.first_block(pattern[0])
        for depth in range(1, len(pattern)):
            if hi <= lo:
                break
            lo, hi = self.narrow(lo, hi, depth, pattern[depth])
        return lo, hi

    def continued_block(self, suffix: Sequence[int]) -> tuple[int, int]:
        """``[lo, hi)``: the occurrences of ``suffix`` (possibly empty) followed by a token of the same document, sorted by that token."""
        lo, hi = self.block(suffix) if len(suffix) else (0, self.n)
        first = self.lower(lo, hi, len(suffix), 0)
        return first, self.lower(first, hi, len(suffix), self.separator)

    # --- next tokens -----------------------------------------------------------------------

    def next_token_count(self, lo: int, hi: int, shift: int, token: int) -> int:
        """How many suffixes of the continued block ``[lo, hi)`` of a ``shift``-token sequence have ``token`` next."""
        a, b = self.narrow(lo, hi, shift, token)
        return b - a

    def next_token_counts(self, lo: int, hi: int, shift: int, counts: Counter[int]) -> None:
        """Add to ``counts`` the token at offset ``shift`` of every suffix ``SA[lo:hi]`` (the continued block of a ``shift``-token sequence)."""
        if hi <= lo:
            return
        if shift == 0:  # the continued block of the empty sequence: every token of the shard
            self._unigram_counts(counts)
            return
        if hi - lo <= _GATHER_LIMIT:
            values, occurrences = np.unique(self.stream[self.sa.slice(lo, hi) + shift], return_counts=True)
            counts.update(dict(zip(values.tolist(), occurrences.tolist())))
            return
        starts, tokens = self._starts, self._tokens
        i = lo
        while i < hi:  # next tokens are sorted inside the block: gallop to the end of each run
            value, last, step = tokens[starts[i] + shift], i, 1
            while i + step < hi and tokens[starts[i + step] + shift] == value:
                last, step = i + step, step * 2
            end = self.lower(last + 1, min(i + step, hi), shift, value + 1)
            counts[value] += end - i
            i = end

    def _unigram_counts(self, counts: Counter[int]) -> None:
        histogram = np.zeros(1 << 16, dtype=np.int64) if self.stream.dtype.itemsize == 2 else None
        for start in range(0, self.n, 1 << 24):
            chunk = self.stream[start : start + (1 << 24)]
            if histogram is not None:
                histogram += np.bincount(chunk, minlength=1 << 16)
                continue
            values, occurrences = np.unique(chunk[chunk != self.separator], return_counts=True)
            counts.update(dict(zip(values.tolist(), occurrences.tolist())))
        if histogram is not None:
            histogram[self.separator] = 0
            values = np.flatnonzero(histogram)
            counts.update(dict(zip(values.tolist(), histogram[values].tolist())))

    # --- longest matches, many counts ------------------------------------------------------

    def longest(self, query: np.ndarray, start: int, stop: int) -> tuple[int, int]:
        """``(ℓ, count)``: the longest prefix of ``query[start:stop]`` (``int64``) that occurs in this shard, and its occurrences.

        Blocks of more than :data:`_SCAN_LIMIT` suffixes are narrowed token by token by binary
        search; a smaller block is extended in one vectorized comparison of its suffixes with the
        rest of the query (a few rounds of growing width), which finds the longest match and how
        many suffixes reach it.
        """
        if self.n == 0:
            return 0, 0
        lo, hi = self.first_block(int(query[start]))
        if hi <= lo:
            return 0, 0
        depth = 1
        while hi - lo > _SCAN_LIMIT and start + depth < stop:
            a, b = self.narrow(lo, hi, depth, int(query[start + depth]))
            if b <= a:
                return depth, hi - lo
            lo, hi, depth = a, b, depth + 1
        if start + depth >= stop:
            return depth, hi - lo
        suffixes = self.positions(lo, hi) + depth
        width = 8
        while True:
            width = min(width, stop - start - depth)
            if width <= 0:
                return depth, len(suffixes)
            at = suffixes[:, None] + np.arange(width)
            equal = (self.stream[np.minimum(at, self.n - 1)] == query[start + depth : start + depth + width]) & (at < self.n)
            whole = equal.all(axis=1)
            if whole.any():  # some suffixes match all ``width`` tokens: only they can be longest
                suffixes, depth, width = suffixes[whole] + width, depth + width, width * 2
                continue
            matched = equal.argmin(axis=1)  # tokens matched before the first difference
            best = int(matched.max())
            return depth + best, int((matched == best).sum())

    def bounds(self, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row of ``grams`` (``[M, n]`` ``int64``), ``[lo, hi)``: the suffixes that start with it — all rows bisected at once."""
        size, width = grams.shape
        reach = np.arange(width)
        found = []
        for after in (False, True):
            lo = np.zeros(size, dtype=np.int64)
            hi = np.full(size, self.n, dtype=np.int64)
            active = np.arange(size)
            while len(active):
                mid = (lo[active] + hi[active]) // 2
                at = self.sa.take(mid)[:, None] + reach
                window = np.where(at < self.n, self.stream[np.minimum(at, self.n - 1)].astype(np.int64), -1)  # past the end sorts first
                wanted = grams[active]
                differ = window != wanted
                first = differ.argmax(axis=1)
                rows = np.arange(len(active))
                below = differ[rows, first] & (window[rows, first] < wanted[rows, first])
                right = (below | ~differ.any(axis=1)) if after else below  # after: also pass suffixes that start with the row
                lo[active[right]] = mid[right] + 1
                hi[active[~right]] = mid[~right]
                active = active[lo[active] < hi[active]]
            found.append(lo)
        return found[0], found[1]
