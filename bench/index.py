"""Benchmark: lmscope's suffix-array index vs the ``infini-gram`` package, on the same token stream, in one run.

Both indexes are built from one tokenized corpus (by default the default corpus, SmolLM2 tokens):
lmscope with :func:`lmscope.index.build_index`, infini-gram from the token stream written in its
own format (``tokenized.0``: each document preceded by ``0xFFFF``; ``offset.0``: the byte offset of
each document's separator) and indexed by ``python -m infini_gram.indexing``. Then:

- **counts** of ``--queries`` random n-grams (lengths 1–10: 90 % cut from documents, 10 % random
  ids, mostly absent) must be identical;
- **build time** (wall, one process each; infini-gram's includes writing its token stream) and
  **bytes per token** of everything each index stores;
- **latency**, p50 and p99 over the same queries, each call timed alone: ``count``
  (``Index.count`` vs ``count``); ``locate`` (the first 10 occurrences with 32 tokens of context
  each: lmscope ``locate`` + ``window``, infini-gram ``find`` + ``get_docs_by_ranks_2``; for n-grams
  with at most 10 occurrences the documents found must agree); the **∞-gram probability** of a
  document's next token after a context of 1–30 tokens (``Index.infgram_prob`` vs
  ``infgram_prob``: both count the one continuation; suffix lengths and probabilities must agree);
  the **∞-gram distribution** after the same contexts (``Index.infgram`` vs ``infgram_ntd`` with
  ``max_support`` above the corpus size, so that both are exact; the distributions must agree);
  and a **trace** of synthetic outputs (~100 tokens spliced from corpus pieces and random ids):
  lmscope's full :func:`~lmscope.index.trace.trace_tokens` (spans, 10 sampled documents per span
  with context, BM25 ranking), lmscope's span step alone (``Index.longest_matches`` +
  :func:`~lmscope.index.trace.maximal_spans`), and infini-gram's ``attribute`` (OLMoTrace's span
  step in its engine: spans and document pointers, no context, no ranking), whose spans are
  compared with lmscope's candidates.

A warm-up pass over every query precedes the timed pass, so both read from the page cache.

Run: ``.venv/bin/python bench/index.py [--corpus DIR] [--queries 1000] [--traces 50] [--quick] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmscope.data.tokenized import TokenizedCorpus, is_tokenized_corpus
from lmscope.index import Index, build_index
from lmscope.index.trace import maximal_spans, trace_tokens


def default_corpus() -> Path:
    from lmscope.data.default_corpus import default_corpus_dir
    from lmscope.home import lmscope_home

    for candidate in sorted(default_corpus_dir().glob("tokenized-default-*")) + sorted((lmscope_home() / "suites").glob("default-*/corpus")):
        if is_tokenized_corpus(candidate):
            return candidate
    raise SystemExit("no tokenized default corpus in the cache; run `make corpus` (or give --corpus DIR)")


def subset(corpus: TokenizedCorpus, n_docs: int, out: Path) -> TokenizedCorpus:
    """The first ``n_docs`` documents of ``corpus`` as a tokenized corpus of their own (for --quick)."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    table = corpus.documents.slice(0, n_docs)
    n_tokens = int(sum(table.column("n_tokens").to_pylist()))
    np.asarray(corpus.tokens[:n_tokens]).tofile(out / "tokens.bin")
    pq.write_table(table, out / "documents.parquet")
    manifest = {key: value for key, value in corpus.manifest.items() if key not in ("files", "counts", "n_bytes")}
    manifest.update(n_documents=n_docs, n_tokens=n_tokens, subset_of=str(corpus.path))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return TokenizedCorpus.open(out)


def write_infini_gram_stream(corpus: TokenizedCorpus, out: Path) -> None:
    """``tokenized.0`` and ``offset.0`` in infini-gram's format (uint16, each document preceded by 0xFFFF)."""
    out.mkdir(parents=True)
    lengths = corpus.documents.column("n_tokens").to_numpy().astype(np.int64)
    tokens = np.asarray(corpus.tokens, dtype="<u2")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    stream = np.insert(tokens, starts, np.uint16(0xFFFF))
    stream.tofile(out / "tokenized.0")
    ((starts + np.arange(len(starts))) * 2).astype("<u8").tofile(out / "offset.0")


def build_infini_gram(corpus: TokenizedCorpus, out: Path, mem_gib: int) -> tuple[float, float]:
    """(seconds writing the stream, seconds indexing); raises SystemExit with infini-gram's output on failure."""
    import infini_gram

    started = time.perf_counter()
    write_infini_gram_stream(corpus, out)
    written = time.perf_counter() - started
    empty = out.parent / "infini-gram-raw"
    empty.mkdir()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    command = [
        sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(empty.resolve()), "--save_dir", str(out.resolve()),
        "--token_dtype", "u16", "--cpus", str(os.cpu_count() or 1), "--mem", str(mem_gib), "--ulimit", str(limit),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=Path(infini_gram.__file__).parent, capture_output=True, text=True)
    indexed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"infini-gram indexing failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return written, indexed


def make_queries(docs: list[np.ndarray], vocab_size: int, n: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` n-grams of 1–10 tokens: 90 % cut from random documents, 10 % random ids."""
    usable = [d for d in docs if len(d) >= 10]
    out = []
    for k in range(n):
        m = int(rng.integers(1, 11))
        if k % 10 == 9:
            out.append(rng.integers(0, vocab_size, size=m).tolist())
            continue
        doc = usable[int(rng.integers(len(usable)))]
        at = int(rng.integers(0, len(doc) - m + 1))
        out.append(doc[at : at + m].tolist())
    return out


def make_contexts(docs: list[np.ndarray], n: int, rng: np.random.Generator) -> list[tuple[list[int], int]]:
    usable = [d for d in docs if len(d) >= 32]
    out = []
    for _ in range(n):
        doc = usable[int(rng.integers(len(usable)))]
        at = int(rng.integers(1, len(doc)))
        length = int(rng.integers(1, 31))
        out.append((doc[max(0, at - length) : at].tolist(), int(doc[at])))
    return out


def make_outputs(docs: list[np.ndarray], vocab_size: int, n: int, rng: np.random.Generator) -> list[list[int]]:
    """Synthetic model outputs of about 100 tokens: corpus pieces of 8–24 tokens joined by 1–3 random ids."""
    usable = [d for d in docs if len(d) >= 32]
    out = []
    for _ in range(n):
        tokens: list[int] = []
        while len(tokens) < 100:
            doc = usable[int(rng.integers(len(usable)))]
            m = int(rng.integers(8, 25))
            at = int(rng.integers(0, len(doc) - m + 1))
            tokens += doc[at : at + m].tolist() + rng.integers(0, vocab_size, size=int(rng.integers(1, 4))).tolist()
        out.append(tokens)
    return out


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(values, 50)), 4), "p99_ms": round(float(np.percentile(values, 99)), 4), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="a tokenized corpus (uint16); default: the default corpus")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--contexts", type=int, default=300)
    parser.add_argument("--traces", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="the first 150 documents and 200 queries: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mem", type=int, default=8, help="GiB that infini-gram's indexer may use")
    parser.add_argument("--work", type=Path, default=None, help="keep both indexes here (default: a temporary directory, removed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from infini_gram.engine import InfiniGramEngine

    corpus = TokenizedCorpus.open(args.corpus or default_corpus())
    if corpus.dtype.itemsize != 2:
        raise SystemExit("the benchmark writes infini-gram's u16 format; give a uint16 corpus")
    work = args.work or Path(tempfile.mkdtemp(prefix="lmscope-bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    n_queries, n_contexts, n_traces = args.queries, args.contexts, args.traces
    try:
        if args.quick:
            corpus = subset(corpus, 150, work / "corpus")
            n_queries, n_contexts, n_traces = min(n_queries, 200), min(n_contexts, 60), min(n_traces, 8)
        n_tokens = corpus.n_tokens
        load = os.getloadavg()

        lm_seconds, report = timed(lambda: build_index(corpus, work / "lmscope"))
        ig_write, ig_index = build_infini_gram(corpus, work / "infini-gram", args.mem)
        ig_bytes = sum(p.stat().st_size for p in (work / "infini-gram").iterdir() if p.is_file())

        index = Index.open(report.path)
        engine = InfiniGramEngine(index_dir=str(work / "infini-gram"), eos_token_id=0, vocab_size=max(index.vocab_size, 1), token_dtype="u16")
        docs = [np.asarray(corpus.document_tokens(i)) for i in range(len(corpus))]
        rng = np.random.default_rng(args.seed)
        queries = make_queries(docs, index.vocab_size, n_queries, rng)
        contexts = make_contexts(docs, n_contexts, rng)
        outputs = make_outputs(docs, index.vocab_size, n_traces, rng)

        # counts: a warm-up pass that also checks them, then the timed pass
        ours = [index.count(q) for q in queries]
        theirs = [engine.count(input_ids=q)["count"] for q in queries]
        mismatches = [(q, a, b) for q, a, b in zip(queries, ours, theirs) if a != b]
        lm_count, ig_count = [], []
        for q in queries:
            lm_count.append(timed(lambda: index.count(q))[0])
            ig_count.append(timed(lambda: engine.count(input_ids=q))[0])

        def lm_locate(q: list[int]) -> list[Any]:
            found = index.locate(q, limit=10)
            return [(m.doc_index, index.window(m, 32, 32)) for m in found.matches]

        def ig_locate(q: list[int]) -> list[Any]:
            found = engine.find(input_ids=q)
            requests = [(s, r, len(q), 32) for s, (lo, hi) in enumerate(found["segment_by_shard"]) for r in range(lo, min(hi, lo + 10))][:10]
            return engine.get_docs_by_ranks_2(requests) if requests else []

        present = [q for q, c in zip(queries, ours) if c > 0]
        for q in present:  # warm-up
            lm_locate(q)
            ig_locate(q)
        locate_disagree = 0  # where both list every occurrence (at most 10), the documents must agree
        lm_loc, ig_loc = [], []
        for q, c in zip(queries, ours):
            if c == 0:
                continue
            t_lm, mine = timed(lambda: lm_locate(q))
            t_ig, theirs_docs = timed(lambda: ig_locate(q))
            lm_loc.append(t_lm)
            ig_loc.append(t_ig)
            if c <= 10 and sorted(d for d, _ in mine) != sorted(r["doc_ix"] for r in theirs_docs):
                locate_disagree += 1

        exact = n_tokens + len(corpus) + 1  # infini-gram's ntd samples past max_support occurrences: above the stream's size it is exact
        for context, nxt in contexts:  # warm-up
            index.infgram_prob(context, nxt)
            engine.infgram_prob(prompt_ids=context, cont_id=nxt)
            index.infgram(context)
            engine.infgram_ntd(prompt_ids=context, max_support=exact)
        lm_prob, ig_prob, same_prob = [], [], 0
        lm_ntd, ig_ntd, same_ntd = [], [], 0
        for context, nxt in contexts:
            t_lm, mine = timed(lambda: index.infgram_prob(context, nxt))
            t_ig, theirs_p = timed(lambda: engine.infgram_prob(prompt_ids=context, cont_id=nxt))
            lm_prob.append(t_lm)
            ig_prob.append(t_ig)
            same_prob += int(mine.suffix_length == theirs_p["suffix_len"] and abs((mine.probability or 0.0) - theirs_p["prob"]) < 1e-9)
            t_lm, dist = timed(lambda: index.infgram(context))
            t_ig, theirs_d = timed(lambda: engine.infgram_ntd(prompt_ids=context, max_support=exact))
            lm_ntd.append(t_lm)
            ig_ntd.append(t_ig)
            their_counts = {int(t): int(r["cont_cnt"]) for t, r in theirs_d["result_by_token_id"].items()}
            same_ntd += int(dist.suffix_length == theirs_d["suffix_len"] and not theirs_d["approx"] and dist.counts == their_counts)

        def lm_spans(tokens: list[int]) -> list[tuple[int, int]]:
            lengths, counts = index.longest_matches(tokens)
            return [(a, b) for a, b in maximal_spans(lengths) if b - a >= 5 and counts[a] <= 10]

        lm_trace, lm_span, ig_attr, same_spans = [], [], [], 0
        trace_tokens(index, outputs[0])  # imports bm25s, outside the timing
        for tokens in outputs:
            lm_trace.append(timed(lambda: trace_tokens(index, tokens))[0])
            t_span, mine_spans = timed(lambda: lm_spans(tokens))
            lm_span.append(t_span)
            t_attr, attributed = timed(lambda: engine.attribute(input_ids=tokens, delim_ids=[], min_len=5, max_cnt=10, enforce_bow=False))
            ig_attr.append(t_attr)
            same_spans += int(sorted(mine_spans) == sorted((s["l"], s["r"]) for s in attributed["spans"]))

        result = {
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_average_at_start": [round(x, 2) for x in load],
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "corpus": {"path": str(corpus.path), "documents": len(corpus), "tokens": n_tokens, "vocab_size": index.vocab_size},
            "counts": {"queries": len(queries), "present": len(present), "identical": len(queries) - len(mismatches), "mismatches": [list(m) for m in mismatches[:5]]},
            "build": {
                "lmscope_s": round(lm_seconds, 3),
                "infini_gram_s": round(ig_write + ig_index, 3),
                "infini_gram_write_stream_s": round(ig_write, 3),
                "infini_gram_indexing_s": round(ig_index, 3),
            },
            "bytes_per_token": {"lmscope": round(report.bytes / n_tokens, 3), "infini_gram": round(ig_bytes / n_tokens, 3)},
            "latency": {
                "count": {"lmscope": percentiles(lm_count), "infini_gram": percentiles(ig_count)},
                "locate_10_with_context": {"lmscope": percentiles(lm_loc), "infini_gram": percentiles(ig_loc), "document_sets_differing": locate_disagree},
                "infgram_probability": {"lmscope": percentiles(lm_prob), "infini_gram": percentiles(ig_prob), "identical_answers": same_prob},
                "infgram_distribution": {"lmscope": percentiles(lm_ntd), "infini_gram": percentiles(ig_ntd), "identical_distributions": same_ntd},
                "trace_100_tokens": {
                    "lmscope_full_trace": percentiles(lm_trace),
                    "lmscope_spans_only": percentiles(lm_span),
                    "infini_gram_attribute": percentiles(ig_attr),
                    "identical_span_sets": same_spans,
                },
            },
        }
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"corpus {result['corpus']['path']}: {len(corpus):,} documents, {n_tokens:,} tokens; load {result['machine']['load_average_at_start']}")
    c = result["counts"]
    print(f"counts: {c['identical']} of {c['queries']} identical ({c['present']} present)")
    b = result["build"]
    print(f"build: lmscope {b['lmscope_s']} s, infini-gram {b['infini_gram_s']} s; bytes/token {result['bytes_per_token']}")
    for name, row in result["latency"].items():
        print(name, json.dumps(row))


if __name__ == "__main__":
    main()
