r"""Tracing a model output into the training corpus, after OLMoTrace (Liu et al., 2025).

**Longest matches.** For every start position :math:`i` of an output :math:`x_1 … x_L`,
:meth:`lmscope.index.Index.longest_matches` finds :math:`\ell_i`, the length of the longest prefix
of :math:`x_i …` that occurs in the corpus (inside one document: the index's separator sees to
that), and its count, by one suffix-array search per position and shard
(:meth:`lmscope.index.search.ShardSearch.longest`).

**Maximal spans.** The span :math:`[i, i + \ell_i)` is *maximal* when no other matching span
contains it. Ends :math:`i + \ell_i` never decrease along the output, so span :math:`i` is maximal
exactly when :math:`\ell_i > 0` and (:math:`i = 0` or :math:`i + \ell_i > i - 1 + \ell_{i-1}`).
Maximal spans may overlap.

**Selection.** Maximal spans of at least ``min_length`` tokens whose corpus count is at most
``max_frequency`` are candidates. Of those, the ``⌈top_fraction · L⌉`` best are kept: the longest
(``rank_by="length"``), or the rarest by unigram log-probability
(``rank_by="unigram"``: :math:`\sum_{t \in \text{span}} \log(c(t)/N)`, with :math:`c(t)` the
token's corpus count and :math:`N` the corpus's tokens; lower is rarer). Ties go to the earlier
span.

**Documents.** Each kept span gets up to ``docs_per_span`` of its occurrences, drawn uniformly
without replacement by a generator seeded with ``(seed, span start)`` (all of them when it has no
more), each with ``window`` tokens of context on either side. Occurrences are grouped by
document; a document found by several spans appears once.

**Ranking.** The documents are ranked by BM25 (the ``bm25s`` library, Lucene's variant,
``k1 = 1.5``, ``b = 0.75``): the collection is the retrieved documents, each represented by the
tokens of its context windows (overlapping windows counted once), and the query is the distinct
token ids of the prompt and the output. Terms are the corpus tokenizer's ids, so ranking needs no
text and no second tokenizer.

**Training time.** With a mini suite (``suite``), each occurrence carries the steps whose
batches held it whole, its first exposure and, with ``before_step``, how many times checkpoint
``step{before_step}`` had seen it (see :mod:`lmscope.index.exposures`).

Entry points: :func:`trace_tokens`, :func:`trace_text`, :func:`trace_model` (greedy decoding
with a model whose tokenizer is the corpus's, :func:`generate_output`, then a trace);
:func:`maximal_spans` and :func:`sample_matches` are the building blocks, over the index's own
queries (:meth:`~lmscope.index.Index.longest_matches`, :meth:`~lmscope.index.Index.count`,
:meth:`~lmscope.index.Index.occurrences`); :mod:`lmscope.index.trace_html` renders a trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress

BM25_K1 = 1.5
BM25_B = 0.75

RankBy = Literal["length", "unigram"]


# --- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceSettings:
    """How a trace picks spans and documents (the CLI's options, with the same names)."""

    min_length: int = 5
    """Shortest span kept, in tokens."""
    max_frequency: int | None = 10
    """Spans that occur more often than this in the corpus are dropped (``None``: no limit)."""
    top_fraction: float = 0.05
    """Keep the ``⌈top_fraction · L⌉`` best spans of an output of ``L`` tokens (1.0 keeps every candidate)."""
    rank_by: RankBy = "length"
    """Which spans are best: ``length`` (longest first) or ``unigram`` (lowest unigram log-probability first)."""
    docs_per_span: int = 10
    """Occurrences sampled per span (all of them when it has no more)."""
    window: int = 32
    """Tokens of context shown on each side of an occurrence (and used for BM25)."""
    seed: int = 0
    """Seed of the occurrence sample."""

    def __post_init__(self) -> None:
        def whole(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise LmscopeError(f"--{name.replace('_', '-')} {value!r} is not an integer ≥ {low}; give e.g. {getattr(TraceSettings, name)}.")

        whole("min_length", self.min_length, 1)
        whole("docs_per_span", self.docs_per_span, 0)
        whole("window", self.window, 0)
        whole("seed", self.seed, 0)
        if self.max_frequency is not None:
            whole("max_frequency", self.max_frequency, 1)
        if isinstance(self.top_fraction, bool) or not isinstance(self.top_fraction, (int, float)) or not 0 < self.top_fraction <= 1:
            raise LmscopeError(f"--top-fraction {self.top_fraction!r} is not in (0, 1]; give e.g. 0.05 (1 keeps every span).")
        if self.rank_by not in ("length", "unigram"):
            raise LmscopeError(f"--rank-by {self.rank_by!r} is not a ranking; use length or unigram.")

    def span_budget(self, n_tokens: int) -> int:
        """``⌈top_fraction · n_tokens⌉``: how many spans an output of ``n_tokens`` keeps."""
        return math.ceil(self.top_fraction * n_tokens - 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_length": self.min_length,
            "max_frequency": self.max_frequency,
            "top_fraction": self.top_fraction,
            "rank_by": self.rank_by,
            "docs_per_span": self.docs_per_span,
            "window": self.window,
            "seed": self.seed,
        }


# --- results ------------------------------------------------------------------------------


@dataclass
class TracedMatch:
    """One sampled occurrence of a span in a corpus document.

    Attributes:
        span: the span's position in :attr:`Trace.spans`.
        match: where it occurs (:class:`lmscope.index.Match`).
        window: the document's tokens around it (:class:`lmscope.index.Window`).
        exposures: with a suite, the steps that trained it whole, its first exposure, how many
            times in all and (with ``before_step``) before the checkpoint; else ``None``.
    """

    span: int
    match: Any
    window: Any
    exposures: dict[str, Any] | None = None

    @property
    def first_step(self) -> int | None:
        return None if self.exposures is None else self.exposures["first_step"]

    def to_dict(self) -> dict[str, Any]:
        out = {"span": self.span, "offset": self.match.offset, "length": self.match.length, "window": self.window.to_dict()}
        if self.exposures is not None:
            out["exposures"] = self.exposures
        return out


@dataclass
class Span:
    """A kept span of the output.

    Attributes:
        start, stop: its token range in the output (stop excluded).
        count: its occurrences in the corpus.
        unigram_logprob: the sum of the natural-log unigram probabilities of its tokens.
        tokens: its token ids.
        text: decoded, when the trace decodes.
        matches: the sampled occurrences, in corpus order.
    """

    start: int
    stop: int
    count: int
    unigram_logprob: float
    tokens: list[int]
    text: str | None = None
    matches: list[TracedMatch] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "start": self.start,
            "stop": self.stop,
            "length": self.length,
            "count": self.count,
            "unigram_logprob": round(self.unigram_logprob, 6),
            "tokens": self.tokens,
        }
        if self.text is not None:
            out["text"] = self.text
        out["documents"] = [{"doc_index": m.match.doc_index, "doc_id": m.match.doc_id, "offset": m.match.offset} for m in self.matches]
        return out


@dataclass
class TracedDocument:
    """A retrieved document, with every sampled occurrence of every span in it and its BM25 score.

    Attributes:
        doc_index, doc_id, domain, split: the document.
        score: its BM25 score against the prompt and the output.
        rank: its position by score (1 = most relevant).
        matches: its occurrences, by span then offset.
    """

    doc_index: int
    doc_id: str
    domain: str
    split: str
    score: float = 0.0
    rank: int = 0
    matches: list[TracedMatch] = field(default_factory=list)

    @property
    def spans(self) -> list[int]:
        return sorted({m.span for m in self.matches})

    @property
    def first_step(self) -> int | None:
        """The earliest step at which any of its matches was trained whole."""
        steps = [m.first_step for m in self.matches if m.first_step is not None]
        return min(steps) if steps else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank,
            "doc_index": self.doc_index,
            "doc_id": self.doc_id,
            "domain": self.domain,
            "split": self.split,
            "bm25": round(self.score, 6),
            "spans": self.spans,
        }
        if any(m.exposures is not None for m in self.matches):
            out["first_step"] = self.first_step
        out["matches"] = [m.to_dict() for m in self.matches]
        return out


@dataclass
class Trace:
    """The result of :func:`trace_tokens`.

    Attributes:
        tokens: the output traced.
        prompt_tokens: the prompt (used only in the BM25 query).
        settings: what picked spans and documents.
        spans: the kept spans, in output order.
        documents: the retrieved documents, most relevant (BM25) first.
        lengths: :math:`\\ell_i`, the longest match at each start position.
        n_maximal: maximal spans found; n_candidates: those that passed length and frequency.
        text, prompt: decoded, when the trace decodes.
        segment_texts: with ``text``, each of :meth:`segments` decoded on its own (for highlighting).
        suite, before_step: the mini suite whose exposures were added, and the checkpoint asked about.
        model: for an output generated here, the model spec and decoding settings.
    """

    tokens: list[int]
    prompt_tokens: list[int]
    settings: TraceSettings
    spans: list[Span]
    documents: list[TracedDocument]
    lengths: list[int]
    n_maximal: int
    n_candidates: int
    text: str | None = None
    prompt: str | None = None
    segment_texts: list[str] | None = None
    suite: str | None = None
    before_step: int | None = None
    model: dict[str, Any] | None = None

    def segments(self) -> list[tuple[int, int, list[int]]]:
        """The output cut at every span boundary: ``(start, stop, spans covering it)``, in order, covering every token."""
        cuts = sorted({0, len(self.tokens)} | {s.start for s in self.spans} | {s.stop for s in self.spans})
        return [(a, b, [k for k, s in enumerate(self.spans) if s.start <= a and b <= s.stop]) for a, b in zip(cuts, cuts[1:])]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model is not None:
            out["model"] = self.model
        if self.prompt is not None:
            out["prompt"] = self.prompt
        out["prompt_tokens"] = self.prompt_tokens
        if self.text is not None:
            out["text"] = self.text
        out.update(
            tokens=self.tokens,
            n_tokens=len(self.tokens),
            settings=self.settings.to_dict(),
            suite=self.suite,
            before_step=self.before_step,
            longest_match=self.lengths,
            n_maximal_spans=self.n_maximal,
            n_candidate_spans=self.n_candidates,
            spans=[s.to_dict() for s in self.spans],
            segments=[
                {"start": a, "stop": b, "spans": covering, **({"text": self.segment_texts[k]} if self.segment_texts else {})}
                for k, (a, b, covering) in enumerate(self.segments())
            ],
            documents=[d.to_dict() for d in self.documents],
        )
        return out


# --- spans ------------------------------------------------------------------------------


def maximal_spans(lengths: Any) -> list[tuple[int, int]]:
    """The maximal matching spans ``(start, stop)`` given the longest match at each start (see the module docstring)."""
    out, last_end = [], 0
    for i, length in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        end = i + length
        if length > 0 and (not out or end > last_end):
            out.append((i, end))
        last_end = max(last_end, end)
    return out


# --- occurrences --------------------------------------------------------------------------


def sample_matches(index: Any, tokens: Any, k: int, seed: Any) -> tuple[int, list[Any]]:
    """``(count, up to k occurrences)``: every occurrence when there are at most ``k``, else ``k`` drawn without replacement (``np.random.default_rng(seed)``), in corpus order."""
    pattern = index.check_tokens(tokens)
    count = index.count(pattern)
    if k <= 0 or count == 0:
        return count, []
    ranks = None if count <= k else np.sort(np.random.default_rng(seed).choice(count, size=k, replace=False))
    docs, offsets = index.occurrences(pattern, ranks)
    order = np.lexsort((offsets, docs))
    return count, index.matches_at(docs[order], offsets[order], len(pattern))


# --- BM25 ---------------------------------------------------------------------------------


def bm25_scores(documents: list[list[int]], query: list[int], *, k1: float = BM25_K1, b: float = BM25_B) -> np.ndarray:
    """BM25 (Lucene's variant, by ``bm25s``) of each document (a list of token ids) for the distinct ids of ``query``.

    :math:`\\sum_{t \\in q} \\ln\\!\\big(1 + \\frac{N - n_t + 0.5}{n_t + 0.5}\\big) \\cdot \\frac{f_{t,d}}{f_{t,d} + k_1 (1 - b + b\\,|d| / \\overline{|d|})}`
    with :math:`N` documents, :math:`n_t` of them holding :math:`t`, :math:`f_{t,d}` its count in :math:`d`.
    """
    if not documents:
        return np.zeros(0, dtype=np.float64)
    import bm25s

    corpus = [[str(int(t)) for t in doc] for doc in documents]
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(corpus, show_progress=False)
    terms = [str(t) for t in sorted({int(t) for t in query}) if str(t) in retriever.vocab_dict]
    if not terms:
        return np.zeros(len(documents), dtype=np.float64)
    return np.asarray(retriever.get_scores(terms), dtype=np.float64)


def _covered_tokens(index: Any, doc_index: int, windows: list[Any]) -> list[int]:
    """The tokens of a document inside the union of its windows (overlaps once), in document order."""
    tokens = index.document_tokens(doc_index)
    out: list[int] = []
    end = 0
    for window in sorted(windows, key=lambda w: (w.start, w.stop)):
        start = max(window.start, end)
        if window.stop > start:
            out += np.asarray(tokens[start : window.stop]).tolist()
        end = max(end, window.stop)
    return out


# --- tracing ------------------------------------------------------------------------------


def trace_tokens(
    index: Any,
    tokens: Any,
    *,
    prompt_tokens: Any = None,
    min_length: int = TraceSettings.min_length,
    max_frequency: int | None = TraceSettings.max_frequency,
    top_fraction: float = TraceSettings.top_fraction,
    rank_by: RankBy = TraceSettings.rank_by,
    docs_per_span: int = TraceSettings.docs_per_span,
    window: int = TraceSettings.window,
    seed: int = TraceSettings.seed,
    suite: Any = None,
    before_step: int | None = None,
    decode: bool = False,
    progress: Progress = no_progress,
) -> Trace:
    """Trace an output (token ids of the index's corpus) into the corpus: spans, documents, BM25 ranks and, with a suite, training steps.

    Args:
        index: an :class:`lmscope.index.Index`.
        tokens: the output's token ids.
        prompt_tokens: the prompt's token ids; joins the output in the BM25 query, is not traced.
        min_length, max_frequency, top_fraction, rank_by, docs_per_span, window, seed: see :class:`TraceSettings`.
        suite: a mini suite (directory or :class:`~lmscope.suites.replay.MiniSuiteSource`) trained on
            the index's corpus: add each occurrence's training exposures.
        before_step: with ``suite``, count the exposures checkpoint ``step{before_step}`` had seen.
        decode: add text (needs the corpus's tokenizer, see :class:`lmscope.index.Index`).
        progress: receives ``("trace positions", 1, L)`` per output position.
    """
    settings = TraceSettings(min_length, max_frequency, top_fraction, rank_by, docs_per_span, window, seed)
    output = index.check_tokens(tokens, "output to trace").astype(np.int64).tolist()
    prompt = [] if prompt_tokens is None or len(prompt_tokens) == 0 else index.check_tokens(prompt_tokens, "prompt").astype(np.int64).tolist()
    source = None
    if before_step is not None and suite is None:
        raise LmscopeError("--before-step counts exposures in a suite's training; name the suite with --suite.")
    if suite is not None:
        from lmscope.index.exposures import check_same_corpus, open_suite

        source = open_suite(suite)
        check_same_corpus(index, source)
        if before_step is not None and (isinstance(before_step, bool) or not isinstance(before_step, int) or before_step < 0):
            raise LmscopeError(f"--before-step {before_step!r} is not a checkpoint step; give an integer ≥ 0.")

    progress("trace positions", 0, len(output))
    lengths, counts = index.longest_matches(output)
    progress("trace positions", len(output), len(output))
    maximal = maximal_spans(lengths)
    candidates = [
        (a, b) for a, b in maximal if b - a >= settings.min_length and (settings.max_frequency is None or counts[a] <= settings.max_frequency)
    ]
    unigram: dict[int, float] = {}
    total = max(index.n_tokens, 1)
    for token in sorted({t for a, b in candidates for t in output[a:b]}):
        unigram[token] = math.log(index.count([token]) / total)

    def logprob(span: tuple[int, int]) -> float:
        return float(sum(unigram[t] for t in output[span[0] : span[1]]))

    if settings.rank_by == "length":
        best = sorted(candidates, key=lambda s: (-(s[1] - s[0]), s[0]))
    else:
        best = sorted(candidates, key=lambda s: (logprob(s), s[0]))
    kept = sorted(best[: settings.span_budget(len(output))])

    spans: list[Span] = []
    by_document: dict[int, TracedDocument] = {}
    for k, (a, b) in enumerate(kept):
        span = Span(a, b, int(counts[a]), logprob((a, b)), output[a:b])
        if decode:
            span.text = index.decode(span.tokens)
        _, matches = sample_matches(index, span.tokens, settings.docs_per_span, [settings.seed, a])
        for match in matches:
            traced = TracedMatch(k, match, index.window(match, settings.window, settings.window, decode=decode))
            if source is not None:
                seen = index.exposures(match, source, before_step=before_step)
                traced.exposures = {
                    "steps": seen.steps,
                    "first_step": seen.first_step,
                    "times_seen": seen.times_seen,
                    "seen_before": seen.seen_before,
                    "partial_steps": sorted({e.step for e in seen.partial}),
                }
            span.matches.append(traced)
            doc = by_document.setdefault(match.doc_index, TracedDocument(match.doc_index, match.doc_id, match.domain, match.split))
            doc.matches.append(traced)
        spans.append(span)

    documents = list(by_document.values())
    texts = [_covered_tokens(index, d.doc_index, [m.window for m in d.matches]) for d in documents]
    scores = bm25_scores(texts, prompt + output)
    for doc, score in zip(documents, scores.tolist()):
        doc.score = float(score)
        doc.matches.sort(key=lambda m: (m.span, m.match.offset))
    documents.sort(key=lambda d: (-d.score, d.doc_index))
    for rank, doc in enumerate(documents, start=1):
        doc.rank = rank
    trace = Trace(
        tokens=output,
        prompt_tokens=prompt,
        settings=settings,
        spans=spans,
        documents=documents,
        lengths=lengths.tolist(),
        n_maximal=len(maximal),
        n_candidates=len(candidates),
        suite=None if source is None else str(source.root),
        before_step=before_step,
    )
    if decode:
        trace.text = index.decode(output)
        trace.prompt = index.decode(prompt) if prompt else None
        trace.segment_texts = [index.decode(output[a:b]) for a, b, _ in trace.segments()]
    return trace


def trace_text(index: Any, text: str, *, prompt: str | None = None, **options: Any) -> Trace:
    """:func:`trace_tokens` of ``text`` (and ``prompt``) encoded with the corpus's tokenizer, decoded back for display."""
    if not isinstance(text, str) or not text:
        raise LmscopeError("the text to trace is empty; give some text with --text.")
    output = index.encode(text)
    prompt_tokens = index.encode(prompt) if prompt else []
    trace = trace_tokens(index, output, prompt_tokens=prompt_tokens, decode=True, **options)
    trace.text, trace.prompt = text, prompt or None
    return trace


# --- generating the output ----------------------------------------------------------------


@dataclass
class GeneratedOutput:
    """A greedy continuation of a prompt.

    Attributes:
        prompt_tokens, tokens: the prompt and the generated tokens (ids of the corpus's tokenizer).
        model: the model spec, where its weights came from, and the decoding settings.
    """

    prompt_tokens: list[int]
    tokens: list[int]
    model: dict[str, Any]


def generate_output(
    index: Any,
    model: str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    device: str = "auto",
    dtype: str = "float32",
    stop_at_eos: bool = True,
) -> GeneratedOutput:
    """Greedy decoding of ``max_new_tokens`` after ``prompt`` by the model spec ``model``, whose tokenizer must be the corpus's.

    The prompt is encoded without special tokens, exactly as the corpus was; generation stops
    before the first end-of-text token when ``stop_at_eos``. Ids past the corpus's vocabulary
    (padding rows of a model's embedding) are never generated.
    """
    import torch

    from lmscope.data.tokenizer_info import corpus_tokenizer
    from lmscope.evals.memorization import greedy_continuations
    from lmscope.models.loading import load_model

    if not isinstance(prompt, str) or not prompt:
        raise LmscopeError("--prompt is empty; give the text the model should continue.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LmscopeError(f"--max-new-tokens {max_new_tokens!r} is not a positive number of tokens; give e.g. 64.")
    recorded = index.manifest["corpus"].get("tokenizer") or {}
    if not recorded.get("sha256"):
        raise LmscopeError(
            f"the corpus of index {str(index.path)!r} records no tokenizer, so a model's tokens cannot be matched to it; "
            "trace text or token ids instead."
        )
    loaded = load_model(model, dtype=dtype, device=device)
    if loaded.tokenizer is None:
        raise LmscopeError(f"model {model!r} ships no tokenizer, so its ids cannot be checked against the corpus's; give a model directory with its tokenizer files.")
    wrapped = corpus_tokenizer(loaded.tokenizer)
    if wrapped.sha256 != recorded["sha256"]:
        raise LmscopeError(
            f"model {model!r} uses a different tokenizer from the one the index's corpus was tokenized with ({recorded.get('spec')!r}), "
            "so its tokens cannot be traced; trace a model trained on this corpus, or index a corpus tokenized with the model's tokenizer."
        )
    prompt_ids = wrapped.encode_batch([prompt])[0]
    if not prompt_ids:
        raise LmscopeError(f"--prompt {prompt!r} encodes to no tokens; give some text.")
    hf = loaded.model
    embedding = hf.get_output_embeddings()
    model_vocab = int(embedding.weight.shape[0]) if embedding is not None else int(hf.config.vocab_size)
    banned = range(index.vocab_size, model_vocab)
    prefix = torch.tensor([prompt_ids], dtype=torch.long)
    generated = greedy_continuations(hf, prefix, max_new_tokens, batch_size=1, suppress_tokens=banned)[0].tolist()
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if stop_at_eos and eos is not None and eos in generated:
        generated = generated[: generated.index(eos)]
    if not generated:
        raise LmscopeError(f"model {model!r} ended its answer at once (end-of-text first) after {prompt!r}; try another prompt.")
    info = {"spec": model, "source": loaded.source, "max_new_tokens": max_new_tokens, "decoding": "greedy", "stopped_at_eos": len(generated) < max_new_tokens}
    return GeneratedOutput([int(t) for t in prompt_ids], [int(t) for t in generated], info)


def trace_model(
    index: Any,
    model: str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    device: str = "auto",
    dtype: str = "float32",
    **options: Any,
) -> Trace:
    """Generate greedily with ``model`` after ``prompt`` (:func:`generate_output`) and trace the generated tokens."""
    generated = generate_output(index, model, prompt, max_new_tokens=max_new_tokens, device=device, dtype=dtype)
    trace = trace_tokens(index, generated.tokens, prompt_tokens=generated.prompt_tokens, decode=True, **options)
    trace.prompt, trace.model = prompt, generated.model
    return trace
