"""Exact-match index over a tokenized corpus: counts, locations, ∞-gram next-token distributions, and when a suite saw a match.

**Design.**

- *Stream.* Each shard holds consecutive documents of the corpus as one token stream in which
  every document is preceded by a **separator**: the largest value of the stream dtype
  (``0xFFFF`` for ``uint16``, ``0xFFFFFFFF`` for ``uint32``). Queries never contain it (token ids
  are checked against the corpus's vocabulary), so no match can cross from one document into
  the next. A ``uint16`` corpus whose vocabulary has all 65,536 ids (so ``0xFFFF`` is a real
  token) gets a ``uint32`` stream instead; only a ``uint32`` vocabulary of 2³² ids is refused.
  ``doc_starts.bin`` (``uint64``) gives each document's first stream position, so a position
  maps to (document, offset) by binary search.
- *Suffix array.* Built by libdivsufsort (``pydivsufsort``) on the stream viewed as big-endian
  bytes, keeping the token-aligned suffixes (:mod:`lmscope.index.suffix_array`) — a maintained
  construction library, not a hand-written sort. Stored with 4 bytes per position when the
  shard has at most 2³² positions, else 5. A ``uint16`` corpus therefore takes 2 (tokens) + 4
  (suffix array) bytes per token, plus one separator per document and 8 bytes of document
  start: about 6.1 bytes per token for documents of a few hundred tokens (infini-gram's bound
  is 7). Every file is read through ``np.memmap``.
- *Queries.* (:mod:`lmscope.index.search`.) ``count``: the block of suffixes that start with the
  query, found from the cached block of its first token by narrowing one token at a time (two
  binary searches on one token each), summed over shards. ``locate``: the positions in those
  blocks, mapped to (document, offset) and listed in corpus order. ``infgram``: the longest
  suffix of the context that occurs followed by a token of the same document (found by
  bisection over the suffix length, since a suffix that occurs implies all shorter ones do),
  then the counts of the tokens that follow it: inside the suffix's block the suffixes are
  sorted by that next token, so ``infgram_prob`` counts one continuation with one more binary
  search, and ``infgram`` reads the whole distribution in one gather for small blocks, by
  galloping over each run otherwise. ``longest_matches``: for each start of a sequence, its
  longest prefix that occurs (what ``lmscope trace`` builds on). The searches read the
  memory-mapped files through plain arrays and ``memoryview`` s, not ``np.memmap``, whose
  per-call overhead would dominate. ``window``: a document's tokens around a match (decoded
  when the tokenizer is at hand).
- *Sharding.* ``shard_tokens`` corpus tokens per shard at most (cut at document boundaries; a
  longer document gets its own shard). Each shard is built alone, so a corpus larger than
  memory builds shard by shard; building one needs about 16 bytes of memory per token
  (``uint16``). Queries open every shard and combine their answers.
- *Resume and atomicity.* The manifest is written first with the plan and rewritten after
  every shard, whose directory is renamed into place whole (:func:`lmscope.fsio.atomic_directory`).
  Rerunning the build resumes with the shards not yet recorded; it refuses an index of another
  corpus (compared by the content hashes of the corpus's files) or of another ``shard_tokens``.
  The manifest holds no timings, so a resumed build ends byte-identical to an uninterrupted one.
- *Training time.* For a mini suite, :func:`match_exposures` joins a match with the suite's data
  order (:func:`lmscope.suites.replay.find_document`): the steps whose batch held the whole
  match, its first exposure and how many times checkpoint ``stepN`` had seen it (steps < N).

Entry points: :func:`build_index`, :meth:`Index.open` with :meth:`~Index.count`,
:meth:`~Index.locate`, :meth:`~Index.infgram`, :meth:`~Index.infgram_prob`,
:meth:`~Index.longest_matches`, :meth:`~Index.window`, :meth:`~Index.exposures`; the
``lmscope index`` command.
"""

from lmscope.index.build import BuildReport, build_index, open_corpus, plan_shards
from lmscope.index.exposures import MatchExposures, match_exposures
from lmscope.index.layout import DEFAULT_SHARD_TOKENS
from lmscope.index.query import Index, Locations, Match, NextTokenProbability, NextTokens, Shard, Window

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "BuildReport",
    "Index",
    "Locations",
    "Match",
    "MatchExposures",
    "NextTokenProbability",
    "NextTokens",
    "Shard",
    "Window",
    "build_index",
    "match_exposures",
    "open_corpus",
    "plan_shards",
]
