"""When a mini suite trained on a match: the steps whose batches held it, its first exposure, and how often before a checkpoint.

A match is ``(document, offset, length)`` in the suite's corpus. The suite's data order
(:class:`lmscope.suites.replay.MiniSuiteSource`) knows every piece of every document inside a
training row; :func:`lmscope.suites.replay.find_document` clips those pieces to the match's
tokens. A piece that holds the *whole* match is an exposure: the model saw the sequence
entire in one row at that step. Pieces that hold only part of it (the match straddles two
rows) are reported apart, as ``partial`` — the sequence was never seen whole there.

Steps follow :data:`lmscope.suites.replay.STEP_CONVENTION`: step N is the batch that turns
checkpoint ``stepN`` into ``step(N+1)``, so checkpoint ``stepN`` has seen exactly the
exposures at steps ``< N``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError
from lmscope.index.layout import corpus_identity


@dataclass
class MatchExposures:
    """Every training exposure of one match.

    Attributes:
        match: the match (:class:`lmscope.index.query.Match`).
        exposures: pieces of training rows that hold the whole match, in training order.
        partial: pieces that hold only part of it.
        before_step: the checkpoint asked about (``seen_before`` counts exposures at steps ``< before_step``), or ``None``.
        untrained_rows: pieces in rows past the last complete step (written, never trained).
    """

    match: Any
    exposures: list[Any] = field(default_factory=list)
    partial: list[Any] = field(default_factory=list)
    before_step: int | None = None
    untrained_rows: int = 0

    @property
    def steps(self) -> list[int]:
        """Distinct steps whose batch held the whole match, ascending (a step may hold it more than once)."""
        return sorted({e.step for e in self.exposures})

    @property
    def first_step(self) -> int | None:
        """The first step that held the whole match (its first exposure), or ``None``."""
        return min((e.step for e in self.exposures), default=None)

    @property
    def times_seen(self) -> int:
        """Exposures over the whole run."""
        return len(self.exposures)

    @property
    def seen_before(self) -> int | None:
        """Exposures at steps before ``before_step``: how many times checkpoint ``step{before_step}`` has seen the match."""
        if self.before_step is None:
            return None
        return sum(1 for e in self.exposures if e.step < self.before_step)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.match.to_dict(),
            "steps": self.steps,
            "first_step": self.first_step,
            "times_seen": self.times_seen,
            "before_step": self.before_step,
            "seen_before": self.seen_before,
            "partial_steps": sorted({e.step for e in self.partial}),
            "untrained_rows": self.untrained_rows,
            "exposures": [asdict(e) for e in self.exposures],
        }


def open_suite(source: Any) -> Any:
    """A :class:`~lmscope.suites.replay.MiniSuiteSource` from itself or a mini-suite directory (or a size directory in one)."""
    from lmscope.suites.replay.mini import MiniSuiteSource, mini_suite_root

    if isinstance(source, MiniSuiteSource):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise LmscopeError(f"{source!r} is not a mini suite; give a mini-suite directory (it holds suite.json, data/ and corpus/).")
    root = mini_suite_root(Path(source))
    if root is None:
        raise LmscopeError(
            f"--suite {str(source)!r} is not a mini suite (no suite.json saying lmscope-mini-suite); give the directory `lmscope suite train` wrote."
        )
    return MiniSuiteSource(root)


def check_same_corpus(index: Any, source: Any) -> None:
    """Refuse a suite whose corpus is not the one the index was built from (document indices would not agree)."""
    if corpus_identity(source.corpus) != index.corpus_identity:
        raise LmscopeError(
            f"the index {str(index.path)!r} was built from {index.manifest['corpus']['path']!r}, not from {str(source.corpus.path)!r}, "
            f"the corpus of {source.describe()}; build an index of the suite's corpus (`lmscope index build {source.root} --out DIR`)."
        )


def match_exposures(index: Any, match: Any, source: Any, before_step: int | None = None) -> MatchExposures:
    """Every exposure of ``match`` (from ``index``) in the training order of the mini suite ``source``.

    Args:
        index: the :class:`lmscope.index.Index` the match came from (built over the suite's corpus).
        match: a :class:`lmscope.index.Match`.
        source: a :class:`~lmscope.suites.replay.MiniSuiteSource` or a mini-suite directory.
        before_step: count the exposures checkpoint ``step{before_step}`` has seen (steps ``< before_step``).
    """
    from lmscope.suites.replay.find import find_document

    source = open_suite(source)
    check_same_corpus(index, source)
    if before_step is not None and (isinstance(before_step, bool) or not isinstance(before_step, int) or before_step < 0):
        raise LmscopeError(f"--before-step {before_step!r} is not a checkpoint step; give an integer ≥ 0.")
    found = find_document(source, doc_index=match.doc_index, token_range=(match.offset, match.offset + match.length))
    whole = [e for e in found.exposures if e.doc_offset == match.offset and e.length == match.length]
    part = [e for e in found.exposures if not (e.doc_offset == match.offset and e.length == match.length)]
    return MatchExposures(match, whole, part, before_step, found.untrained_rows)
