"""Tracing outputs into the corpus, against brute force: longest matches, maximal spans, span selection, sampled documents, BM25, training steps.

The truth is computed by plain scans of the documents (:mod:`index_fixtures`), the BM25 scores by
the formula written out here, and the training steps from the planted suite's data-order recipe.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from index_fixtures import PHRASE, build_planted_suite, naive_locate, random_docs, write_corpus, run_cli as _run, sentence as _sentence
from lmscope.errors import LmscopeError
from lmscope.index import Index, build_index
from lmscope.index.trace import TraceSettings, bm25_scores, maximal_spans, trace_text, trace_tokens
from lmscope.index.trace_html import render_trace_html

VOCAB = 10


# --- brute force --------------------------------------------------------------------------


def naive_longest(docs: list[list[int]], tokens: list[int]) -> list[tuple[int, int]]:
    """(ℓ_i, count) at every start: the longest prefix of tokens[i:] that occurs inside a document."""
    out = []
    for i in range(len(tokens)):
        best, count = 0, 0
        for length in range(1, len(tokens) - i + 1):
            found = len(naive_locate(docs, tokens[i : i + length]))
            if not found:
                break
            best, count = length, found
        out.append((best, count))
    return out


def naive_maximal(longest: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans [i, i+ℓ_i) that no other such span contains (checked pairwise, without the monotone-ends shortcut)."""
    spans = [(i, i + length) for i, (length, _) in enumerate(longest) if length > 0]
    return [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]


def naive_selection(docs: list[list[int]], tokens: list[int], settings: TraceSettings) -> list[tuple[int, int]]:
    longest = naive_longest(docs, tokens)
    candidates = [
        (a, b) for a, b in naive_maximal(longest) if b - a >= settings.min_length and (settings.max_frequency is None or longest[a][1] <= settings.max_frequency)
    ]
    unigrams = Counter(t for doc in docs for t in doc)
    total = sum(unigrams.values())

    def logprob(span: tuple[int, int]) -> float:
        return sum(math.log(unigrams[t] / total) for t in tokens[span[0] : span[1]])

    key = (lambda s: (-(s[1] - s[0]), s[0])) if settings.rank_by == "length" else (lambda s: (logprob(s), s[0]))
    budget = math.ceil(settings.top_fraction * len(tokens) - 1e-9)
    return sorted(sorted(candidates, key=key)[:budget])


def outputs(docs: list[list[int]], seed: int, n: int) -> list[list[int]]:
    """Outputs spliced from document pieces (long matches) and random tokens (short ones)."""
    rng = np.random.default_rng(seed)
    long_docs = [d for d in docs if len(d) >= 30]
    out = []
    for _ in range(n):
        tokens: list[int] = []
        for _ in range(int(rng.integers(2, 5))):
            doc = long_docs[int(rng.integers(len(long_docs)))]
            m = int(rng.integers(4, 16))
            at = int(rng.integers(0, len(doc) - m))
            tokens += doc[at : at + m] + rng.integers(0, VOCAB, size=int(rng.integers(0, 4))).tolist()
        out.append(tokens)
    return out


def bm25_by_hand(documents: list[list[int]], query: list[int], k1: float = 1.5, b: float = 0.75) -> list[float]:
    n = len(documents)
    average = sum(map(len, documents)) / n
    scores = []
    for doc in documents:
        counts = Counter(doc)
        score = 0.0
        for term in set(query):
            df = sum(1 for d in documents if term in d)
            if not df:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = counts[term]
            score += idf * tf / (tf + k1 * (1 - b + b * len(doc) / average))
        scores.append(score)
    return scores


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("trace")
    docs = random_docs(20, 30, VOCAB, 120)
    docs[4] = docs[9][5:40] + [1, 2] + docs[9][10:30]  # long repeats, so that spans with several occurrences exist
    docs[12] = docs[9][5:40]
    corpus = write_corpus(root / "corpus", docs, VOCAB)
    one = Index.open(build_index(corpus, root / "one").path)
    many = Index.open(build_index(corpus, root / "many", shard_tokens=250).path)
    with pytest.MonkeyPatch.context() as patch:  # five-byte suffix-array entries, as shards past 2^32 positions store them
        patch.setattr("lmscope.index.build.suffix_array_width", lambda n: 5)
        five = Index.open(build_index(corpus, root / "five", shard_tokens=400).path)
    assert {s.info.sa_width for s in five.shards} == {5}
    return {"root": root, "docs": docs, "corpus": corpus, "one": one, "many": many, "five": five}




# --- longest matches and spans ------------------------------------------------------------


@pytest.mark.parametrize("which", ["one", "many", "five"])
@pytest.mark.parametrize("scan_limit", [0, 256, 1 << 40])  # every block narrowed by binary search / the default / every block compared at once
def test_longest_matches_equal_brute_force(small: dict, which: str, scan_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmscope.index.search._SCAN_LIMIT", scan_limit)
    index, docs = small[which], small["docs"]
    for tokens in outputs(docs, seed=1, n=6) + [docs[-1][-6:] + [0, 0, 0], [VOCAB - 1] * 3]:
        lengths, counts = index.longest_matches(tokens)
        truth = naive_longest(docs, tokens)
        assert list(zip(lengths.tolist(), counts.tolist())) == truth, tokens
        capped, capped_counts = index.longest_matches(tokens, cap=3)
        assert capped.tolist() == [min(length, 3) for length, _ in truth]
        assert capped_counts.tolist() == [len(naive_locate(docs, tokens[i : i + c])) if c else 0 for i, c in enumerate(capped.tolist())]
    assert max(length for tokens in outputs(docs, 1, 6) for length, _ in naive_longest(docs, tokens)) >= 10  # long matches are covered


@pytest.mark.parametrize("which", ["one", "many", "five"])
def test_count_many_equals_brute_force(small: dict, which: str) -> None:
    index, docs = small[which], small["docs"]
    rng = np.random.default_rng(11)
    for n in (1, 3, 6):
        present = [doc[o : o + n] for doc in docs for o in range(0, len(doc) - n + 1, 7)]
        grams = present + [docs[-1][-n:]] + rng.integers(0, VOCAB, size=(40, n)).tolist()  # the stream's last tokens too
        counts = index.count_many(np.asarray(grams), rows_per_batch=17)
        assert counts.tolist() == [len(naive_locate(docs, g)) for g in grams], n
    assert index.count_many(np.zeros((0, 4), dtype=np.int64)).tolist() == []
    with pytest.raises(LmscopeError) as err:
        index.count_many(np.asarray([[1, VOCAB]]))
    assert f"token id {VOCAB} in the n-grams" in _sentence(err)


def test_maximal_spans_equal_pairwise_containment(small: dict) -> None:
    docs = small["docs"]
    for tokens in outputs(docs, seed=2, n=8):
        longest = naive_longest(docs, tokens)
        assert maximal_spans([length for length, _ in longest]) == naive_maximal(longest)
    assert maximal_spans([0, 3, 2, 1, 0, 2, 1]) == [(1, 4), (5, 7)]


@pytest.mark.parametrize("rank_by", ["length", "unigram"])
@pytest.mark.parametrize("max_frequency", [1, 3, None])
def test_trace_keeps_the_brute_force_spans(small: dict, rank_by: str, max_frequency: int | None) -> None:
    index, docs = small["many"], small["docs"]
    for tokens in outputs(docs, seed=3, n=5):
        settings = TraceSettings(min_length=4, max_frequency=max_frequency, top_fraction=0.1, rank_by=rank_by)
        trace = trace_tokens(index, tokens, min_length=4, max_frequency=max_frequency, top_fraction=0.1, rank_by=rank_by)  # type: ignore[arg-type]
        expected = naive_selection(docs, tokens, settings)
        assert [(s.start, s.stop) for s in trace.spans] == expected, tokens
        for span in trace.spans:
            assert span.tokens == tokens[span.start : span.stop] and span.count == len(naive_locate(docs, span.tokens))
        assert len(trace.spans) <= math.ceil(0.1 * len(tokens))
    everything = trace_tokens(index, outputs(docs, 3, 1)[0], min_length=1, max_frequency=None, top_fraction=1.0)
    assert everything.n_candidates == everything.n_maximal == len(everything.spans)


def test_sampled_occurrences_are_real_seeded_and_grouped_by_document(small: dict) -> None:
    index, docs = small["many"], small["docs"]
    tokens = docs[9][5:12] + [VOCAB - 1] * 2 + docs[9][20:23]  # docs[9][5:12] occurs in documents 4, 9 and 12
    trace = trace_tokens(index, tokens, min_length=3, max_frequency=None, top_fraction=1.0, docs_per_span=2, seed=7)
    again = trace_tokens(index, tokens, min_length=3, max_frequency=None, top_fraction=1.0, docs_per_span=2, seed=7)
    assert trace.to_dict() == again.to_dict()
    for k, span in enumerate(trace.spans):
        truth = naive_locate(docs, span.tokens)
        picked = [(m.match.doc_index, m.match.offset) for m in span.matches]
        assert len(picked) == min(2, len(truth)) and set(picked) <= set(truth) and picked == sorted(picked)
        for m in span.matches:
            doc = docs[m.match.doc_index]
            assert m.window.tokens == doc[max(0, m.match.offset - 32) : m.match.offset + span.length + 32] and m.span == k
    long_span = trace.spans[0]
    assert long_span.count >= 3 and len(long_span.matches) == 2
    draws = {tuple((m.match.doc_index, m.match.offset) for m in trace_tokens(index, tokens, min_length=3, max_frequency=None, top_fraction=1.0, docs_per_span=2, seed=s).spans[0].matches) for s in range(8)}
    assert len(draws) > 1  # the seed changes the sample
    listed = {(m.match.doc_index, m.match.offset, m.span) for d in trace.documents for m in d.matches}
    assert listed == {(m.match.doc_index, m.match.offset, m.span) for s in trace.spans for m in s.matches}
    assert len({d.doc_index for d in trace.documents}) == len(trace.documents)


def test_documents_are_ranked_by_bm25(small: dict) -> None:
    index, docs = small["many"], small["docs"]
    tokens = docs[9][5:14] + [VOCAB - 1] + docs[20][3:12]
    prompt = docs[4][:6]
    trace = trace_tokens(index, tokens, prompt_tokens=prompt, min_length=4, max_frequency=None, top_fraction=1.0, window=5)
    assert len(trace.documents) >= 3
    texts = []
    for doc in trace.documents:  # the union of each document's windows, overlaps once
        covered = sorted({i for m in doc.matches for i in range(m.window.start, m.window.stop)})
        texts.append([docs[doc.doc_index][i] for i in covered])
    by_hand = bm25_by_hand(texts, prompt + tokens)
    assert [d.score for d in trace.documents] == pytest.approx(by_hand, rel=1e-5)
    assert [d.rank for d in trace.documents] == list(range(1, len(trace.documents) + 1))
    assert all(a.score >= b.score for a, b in zip(trace.documents, trace.documents[1:]))
    assert len(set(np.round(by_hand, 4))) > 1  # the ranking is not a tie
    assert bm25_scores([[1, 2], [3]], [7]).tolist() == [0.0, 0.0] and bm25_scores([], [1]).tolist() == []


# --- training time: a planted phrase -----------------------------------------------------


def test_planted_phrase_is_traced_to_exactly_its_documents_and_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built = build_planted_suite(tmp_path)
    index = Index.open(build_index(built.suite, tmp_path / "index").path)
    output = [30, 31] + PHRASE + [32, 5, 33]  # ids 30-49 occur nowhere in the corpus
    checkpoint = 20
    trace = trace_tokens(index, output, min_length=5, top_fraction=0.1, suite=built.suite, before_step=checkpoint)
    assert [(s.start, s.stop, s.count) for s in trace.spans] == [(2, 8, len(built.planted))]
    assert sorted(d.doc_index for d in trace.documents) == sorted(built.planted)
    for doc in trace.documents:
        (match,) = doc.matches
        expected = built.truth[doc.doc_index]
        assert match.match.offset == built.planted[doc.doc_index]
        assert match.exposures is not None
        assert match.exposures["steps"] == sorted(set(expected)) and match.exposures["times_seen"] == len(expected)
        assert match.exposures["first_step"] == (min(expected) if expected else None) == doc.first_step
        assert match.exposures["seen_before"] == sum(1 for s in expected if s < checkpoint)
        assert doc.split == ("heldout" if doc.doc_index == 25 else "train")
    assert any(len(v) > 1 for v in built.truth.values()) and any(not v for v in built.truth.values())

    html_path = tmp_path / "out" / "trace.html"
    args = ["trace", "--index", str(index.path), "--tokens", ",".join(map(str, output)), "--min-length", "5", "--suite", str(built.suite)]
    code, stdout, err = _run(args + ["--before-step", str(checkpoint), "--html", str(html_path), "--json"], capsys)
    assert code == 0, err
    listed = json.loads(stdout)
    assert [(s["start"], s["stop"]) for s in listed["spans"]] == [(2, 8)] and listed["html"] == str(html_path)
    found = {d["doc_index"]: d["matches"][0]["exposures"] for d in listed["documents"]}
    assert {doc: (e["steps"], e["seen_before"]) for doc, e in found.items()} == {
        doc: (sorted(set(steps)), sum(1 for s in steps if s < checkpoint)) for doc, steps in built.truth.items()
    }
    page = html_path.read_text()
    assert all(f"doc-{doc}" in page for doc in built.planted) and "first seen at step" in page and "never trained whole" in page
    code, stdout, err = _run(args, capsys)
    assert code == 0 and "doc-3" in stdout and "first step" in stdout, err


# --- text, HTML, models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from data_fixtures import tiny_tokenized_corpus

    root = tmp_path_factory.mktemp("trace-text")
    corpus = tiny_tokenized_corpus(root, n_documents=14)
    index = Index.open(build_index(corpus, root / "index").path)
    return {"root": root, "corpus": corpus, "index": index, "tokenizer": root / "tok"}


def test_trace_text_and_its_html_page(texts: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = texts["index"]
    text = "Tell me: git rebase reapplies commits on top of another base tip. <script>alert(1)</script>"
    trace = trace_text(index, text, prompt="What does git rebase do?", min_length=4, max_frequency=None, top_fraction=0.2)
    assert trace.spans and trace.text == text and trace.prompt == "What does git rebase do?"
    assert any("git rebase reapplies commits" in (s.text or "") for s in trace.spans)
    assert "".join(trace.segment_texts or []) == index.decode(trace.tokens)
    page = render_trace_html(trace)
    assert "<mark" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert "http://" not in page and "https://" not in page and " src=" not in page  # self-contained
    for doc in trace.documents:
        assert doc.doc_id in page and doc.domain in page
    out = tmp_path / "page.html"
    code, stdout, err = _run(["trace", "--index", str(index.path), "--text", text, "--min-length", "4", "--max-frequency", "0", "--html", str(out)], capsys)
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>") and "spans" in stdout, err


def _save_model(directory: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(directory)
    return directory


def test_trace_a_model_answer_and_refuse_another_tokenizer(texts: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_torch_thread: None) -> None:
    import torch
    from data_fixtures import build_bpe_tokenizer
    from transformers import AutoModelForCausalLM

    from lmscope.index.trace import generate_output, trace_model

    index = texts["index"]
    model_dir = _save_model(tmp_path / "model", texts["tokenizer"], vocab_size=index.vocab_size + 12)  # padding rows past the corpus's vocabulary
    generated = generate_output(index, str(model_dir), "git rebase", max_new_tokens=6, stop_at_eos=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = list(generated.prompt_tokens)
    with torch.no_grad():  # greedy decoding by plain full forward passes, never past the corpus's vocabulary
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1, : index.vocab_size].argmax()))
    assert generated.prompt_tokens == index.encode("git rebase") and generated.tokens == ids[len(generated.prompt_tokens) :]
    trace = trace_model(index, str(model_dir), "git rebase", max_new_tokens=6, min_length=1, top_fraction=1.0)
    assert trace.model is not None and trace.model["spec"] == str(model_dir) and trace.prompt == "git rebase"
    assert trace.tokens == generated.tokens[: len(trace.tokens)] and trace.prompt_tokens == generated.prompt_tokens

    other_tok = build_bpe_tokenizer(tmp_path / "other-tok", vocab_size=300)
    other = _save_model(tmp_path / "other-model", other_tok, vocab_size=300)
    with pytest.raises(LmscopeError) as err:
        generate_output(index, str(other), "git rebase")
    assert "uses a different tokenizer" in _sentence(err)
    code, _, err_text = _run(["trace", "--index", str(index.path), "--model", str(other), "--prompt", "git"], capsys)
    assert code == 2 and "uses a different tokenizer" in " ".join(err_text.split()) and "Traceback" not in err_text
    code, stdout, err_text = _run(["trace", "--index", str(index.path), "--model", str(model_dir), "--prompt", "git rebase", "--max-new-tokens", "4", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["model"]["max_new_tokens"] == 4, err_text


# --- bad input ----------------------------------------------------------------------------


def test_bad_input_gets_one_clear_sentence(small: dict, texts: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = small["one"]
    cases = [
        (lambda: trace_tokens(index, []), "the output to trace is empty"),
        (lambda: trace_tokens(index, [1, VOCAB]), f"token id {VOCAB} in the output to trace is outside the vocabulary"),
        (lambda: trace_tokens(index, [1, 2], min_length=0), "--min-length 0 is not an integer ≥ 1"),
        (lambda: trace_tokens(index, [1, 2], top_fraction=0), "--top-fraction 0 is not in (0, 1]"),
        (lambda: trace_tokens(index, [1, 2], rank_by="random"), "--rank-by 'random' is not a ranking"),  # type: ignore[arg-type]
        (lambda: trace_tokens(index, [1, 2], max_frequency=0), "--max-frequency 0 is not an integer ≥ 1"),
        (lambda: trace_tokens(index, [1, 2], before_step=3), "name the suite with --suite"),
        (lambda: trace_tokens(index, [1, 2], suite=tmp_path), "is not a mini suite"),
        (lambda: trace_text(index, ""), "the text to trace is empty"),
        (lambda: trace_text(index, "hello"), "model spec 'random' is neither an existing directory"),  # the corpus names no usable tokenizer
        (lambda: Index.open(tmp_path / "nowhere"), "does not exist"),
    ]
    for call, message in cases:
        with pytest.raises(LmscopeError) as err:
            call()
        assert message in _sentence(err), (message, str(err.value))
    from lmscope.index.trace import generate_output

    with pytest.raises(LmscopeError) as err:
        generate_output(small["one"], str(tmp_path), "hi")
    assert "records no tokenizer" in _sentence(err) or "holds no config.json" in _sentence(err)
    with pytest.raises(LmscopeError) as err:
        generate_output(texts["index"], str(tmp_path / "no-model"), "")
    assert "--prompt is empty" in _sentence(err)
    path = str(index.path)
    for args, message in [
        (["trace", "--index", path], "exactly one of --text TEXT, --tokens IDS, or --model SPEC"),
        (["trace", "--index", path, "--text", "a", "--tokens", "1"], "exactly one of"),
        (["trace", "--index", path, "--model", "x"], "give it with --prompt"),
        (["trace", "--index", path, "--tokens", "1,2", "--prompt", "p"], "--prompt is text"),
        (["trace", "--index", path, "--tokens", "1,x"], "not a list of integers"),
        (["trace", "--index", path, "--tokens", "1,2", "--top-fraction", "2"], "--top-fraction 2.0 is not in (0, 1]"),
        (["trace", "--index", path, "--tokens", "1,2", "--before-step", "3"], "name the suite with --suite"),
        (["trace", "--index", path, "--text", "hello"], "neither an existing directory"),
        (["trace", "--index", str(tmp_path / "none"), "--tokens", "1"], "does not exist"),
        (["trace", "--index", path, "--tokens", "1,2", "--html", str(tmp_path)], "is a directory"),
    ]:
        code, _, err_text = _run(args, capsys)
        assert code == 2 and message in " ".join(err_text.split()) and "Traceback" not in err_text, (args, err_text)


def test_command_line_defaults_are_the_library_defaults() -> None:
    from lmscope.cli import trace as cli_trace

    defaults = TraceSettings()
    assert (cli_trace._MIN_LENGTH, cli_trace._MAX_FREQUENCY, cli_trace._TOP_FRACTION, cli_trace._RANK_BY, cli_trace._DOCS_PER_SPAN, cli_trace._WINDOW, cli_trace._SEED) == (
        defaults.min_length,
        defaults.max_frequency,
        defaults.top_fraction,
        defaults.rank_by,
        defaults.docs_per_span,
        defaults.window,
        defaults.seed,
    )
