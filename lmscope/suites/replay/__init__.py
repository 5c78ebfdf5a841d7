"""Data-order replay: which token rows were trained on at step N, and from which documents — and back.

**The step convention** (one for every source). A run's training rows form one sequence in
training order; with ``B`` rows per batch, *step N* is the batch of rows
``[B·N, B·N + B)`` — the batch consumed by the optimizer update that turns checkpoint
``stepN`` into checkpoint ``step(N+1)``. Checkpoint ``stepN`` has therefore been trained on
exactly rows ``[0, B·N)`` (:meth:`ReplaySource.seen_before`). This is Pythia's own indexing
(its ``utils/batch_viewer.py`` reads rows ``[1024·N, 1024·N + 1024)`` for iteration N); mini
suites, OLMo (``step{N}-tokens…`` revisions) and Amber follow it too:

==========  ===========================================  ======================================
source      step N                                       rows
==========  ===========================================  ======================================
mini suite  rows ``[B·N, B·N+B)`` of ``data/train``       ``seq_len + 1`` tokens, with documents
pythia      rows ``[1024·N, 1024·N+1024)``                2049 tokens, EOS-delimited segments
olmo        instances ``global_indices[B·N : B·N+B]``     ``seq_len`` tokens (one instance)
amber       every line of ``train_{N:03d}.jsonl``         2049 tokens, ``source`` as domain
==========  ===========================================  ======================================

For Amber a step is a data chunk: ``ckpt_{K}`` (catalog step ``K + 1``) was saved after
chunk ``K``, so step ``K`` is the chunk trained between ``ckpt_{K-1}`` and ``ckpt_K``.

Entry points:

- :func:`open_source` — a source from a mini-suite directory, a ``replay.json`` layout, or a
  suite name with layout fields (:mod:`lmscope.suites.replay.layout`);
- :func:`replay_step` / :meth:`ReplaySource.step` — a :class:`StepBatch`: rows, positions,
  token ids and per-row document :class:`Segment` s;
- :func:`find_document` — every step (row, offsets) at which a document, or a token range
  of it, was trained (sources with a document table: mini suites);
- :func:`find_tokens` — every step whose rows hold an exact token sequence (any source; a
  streaming scan).
"""

from __future__ import annotations

from lmscope.suites.replay.amber import AmberSource
from lmscope.suites.replay.base import STEP_CONVENTION, ReplaySource, Segment, StepBatch, parse_row_range
from lmscope.suites.replay.find import DocumentExposures, Exposure, TokenMatch, TokenSearch, find_document, find_tokens
from lmscope.suites.replay.layout import AmberLayout, OlmoLayout, PythiaLayout, open_source, read_layout_file
from lmscope.suites.replay.mini import MiniSuiteSource, is_mini_suite, mini_suite_root
from lmscope.suites.replay.olmo import OlmoSource, open_global_indices
from lmscope.suites.replay.pythia import PythiaSource

__all__ = [
    "STEP_CONVENTION",
    "AmberLayout",
    "AmberSource",
    "DocumentExposures",
    "Exposure",
    "MiniSuiteSource",
    "OlmoLayout",
    "OlmoSource",
    "PythiaLayout",
    "PythiaSource",
    "ReplaySource",
    "Segment",
    "StepBatch",
    "TokenMatch",
    "TokenSearch",
    "find_document",
    "find_tokens",
    "is_mini_suite",
    "mini_suite_root",
    "open_global_indices",
    "open_source",
    "parse_row_range",
    "read_layout_file",
    "replay_step",
]


def replay_step(source: ReplaySource | str, step: int, rows: slice | None = None) -> StepBatch:
    """The rows trained at ``step`` (see the convention above), with their document segments.

    Args:
        source: a :class:`ReplaySource`, or anything :func:`open_source` accepts without options
            (a mini-suite directory, a directory holding ``replay.json``).
        step: the step, ``0 … source.num_steps - 1``.
        rows: a part of the batch (``slice(A, B)``); by default all of it. Amber chunks are
            ~1.7M rows: select a part.
    """
    if not isinstance(source, ReplaySource):
        source = open_source(source)
    return source.step(step, rows)
