"""The suffix-array index against brute force: counts, locations and ∞-gram distributions by a plain scan of the documents.

Corpora are written in the tokenized-corpus format by plain code (:mod:`index_fixtures`: random
tokens over a small vocabulary, so n-grams repeat); the exposure test writes a real data order with
the mini-suite data-order writer and derives the truth from its recipe and a scan of its rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index_fixtures import PHRASE, boundary_ngrams, build_planted_suite, naive_infgram, naive_locate, queries, random_docs, write_corpus, run_cli as _run, sentence as _sentence
from lmscope.errors import LmscopeError
from lmscope.index import Index, Match, build_index
from lmscope.index.search import scalar_reader
from lmscope.index.suffix_array import suffix_array

# --- fixtures -----------------------------------------------------------------------------

VOCAB = 6


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("index")
    docs = random_docs(0, 40, VOCAB, 150)
    corpus = write_corpus(root / "corpus", docs, VOCAB)
    one = build_index(corpus, root / "one")
    many = build_index(corpus, root / "many", shard_tokens=300)
    return {"root": root, "docs": docs, "corpus": corpus, "one": Index.open(one.path), "many": Index.open(many.path), "report": many}


# --- suffix array -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_suffix_array_sorts_like_python(dtype: str) -> None:
    rng = np.random.default_rng(1)
    top = 65535 if dtype == "uint16" else 2**32 - 1
    stream = rng.choice(np.array([0, 1, 2, 300, top - 1, top], dtype=np.int64), size=400).astype(dtype)
    expected = sorted(range(len(stream)), key=lambda i: stream[i:].tolist())
    assert suffix_array(stream).tolist() == expected


# --- counts, locations, ∞-gram ------------------------------------------------------------


@pytest.mark.parametrize("which", ["one", "many"])
def test_counts_equal_a_brute_force_scan(small: dict, which: str) -> None:
    index, docs = small[which], small["docs"]
    qs = queries(docs, VOCAB, seed=2)
    counts = [index.count(q) for q in qs]
    assert counts == [len(naive_locate(docs, q)) for q in qs]
    assert any(c == 0 for c in counts) and any(c > 1 for c in counts)  # absent and repeated n-grams are both covered


@pytest.mark.parametrize("which", ["one", "many"])
def test_ngrams_across_a_document_boundary_count_zero(small: dict, which: str) -> None:
    docs = small["docs"]
    grams = boundary_ngrams(docs)
    stream = [t for doc in docs for t in doc]
    assert len(grams) >= 10 and all(naive_locate([stream], g) for g in grams)  # they do occur in the plain concatenation
    assert [small[which].count(g) for g in grams] == [0] * len(grams)


def test_shards_cut_at_documents_and_agree_with_one_shard(small: dict) -> None:
    one, many = small["one"], small["many"]
    shards = many.manifest["shards"]
    assert len(one.shards) == 1 and len(shards) >= 5
    assert shards[0]["doc_start"] == 0 and shards[-1]["doc_stop"] == len(small["docs"])
    assert all(a["doc_stop"] == b["doc_start"] for a, b in zip(shards, shards[1:]))
    assert all(s["n_tokens"] <= 300 for s in shards if s["doc_stop"] - s["doc_start"] > 1)
    for q in queries(small["docs"], VOCAB, seed=3, n=20):
        assert many.count(q) == one.count(q)
        assert many.locate(q, limit=None).matches == one.locate(q, limit=None).matches
        assert many.infgram(q).counts == one.infgram(q).counts


@pytest.mark.parametrize("which", ["one", "many"])
def test_locate_returns_exactly_the_brute_force_matches(small: dict, which: str) -> None:
    index, docs = small[which], small["docs"]
    for q in queries(docs, VOCAB, seed=4, n=25):
        found = index.locate(q, limit=None)
        truth = naive_locate(docs, q)
        assert [(m.doc_index, m.offset) for m in found.matches] == truth and found.count == len(truth)
        assert all(m.doc_id == f"doc-{m.doc_index}" and m.length == len(q) for m in found.matches)
        assert all((m.domain, m.split) == ("alpha" if m.doc_index % 2 else "beta", "train") for m in found.matches)
        docs_of, offsets_of = index.occurrences(q)
        assert list(zip(docs_of.tolist(), offsets_of.tolist())) == truth
    q = docs[0][:1]
    first = index.locate(q, limit=3)
    assert first.count == len(naive_locate(docs, q)) > 3 and first.truncated
    assert [(m.doc_index, m.offset) for m in first.matches] == naive_locate(docs, q)[:3]
    picked = index.occurrences(q, ranks=np.arange(0, first.count, 2))  # every other occurrence in suffix-array order
    assert len(picked[0]) == (first.count + 1) // 2 and set(zip(*(a.tolist() for a in picked))) <= set(naive_locate(docs, q))
    with pytest.raises(LmscopeError, match="not all below"):
        index.occurrences(q, ranks=[first.count])


@pytest.mark.parametrize("which", ["one", "many"])
@pytest.mark.parametrize("gather_limit", [1 << 16, 0])
def test_infgram_equals_brute_force(small: dict, which: str, gather_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmscope.index.search._GATHER_LIMIT", gather_limit)  # 0: every distribution by galloping over runs
    index, docs = small[which], small["docs"]
    rng = np.random.default_rng(5)
    contexts = [[], [0], docs[0][:12], docs[5][-3:], docs[10][:4] + [VOCAB - 1] * 5] + [rng.integers(0, VOCAB, size=8).tolist() for _ in range(8)]
    for context in contexts:
        result = index.infgram(context, next_token=2)
        length, following = naive_infgram(docs, context)
        assert (result.suffix_length, result.counts) == (length, dict(following)), context
        assert result.context_count == sum(following.values())
        assert result.probability == pytest.approx(following[2] / sum(following.values()))
    last_of_a_document = docs[-1][-8:]  # its only occurrence ends a document: a shorter suffix must be used
    assert index.infgram(last_of_a_document).suffix_length == naive_infgram(docs, last_of_a_document)[0]


@pytest.mark.parametrize("which", ["one", "many"])
def test_infgram_prob_equals_brute_force(small: dict, which: str) -> None:
    index, docs = small[which], small["docs"]
    rng = np.random.default_rng(6)
    contexts = [[], [0], docs[0][:12], docs[5][-3:], docs[-1][-8:], docs[10][:4] + [VOCAB - 1] * 5]
    contexts += [rng.integers(0, VOCAB, size=int(rng.integers(1, 10))).tolist() for _ in range(10)]
    for context in contexts:
        length, following = naive_infgram(docs, context)
        for token in range(VOCAB):  # every continuation, those never seen after the suffix too
            result = index.infgram_prob(context, token)
            assert (result.suffix_length, result.context_count, result.next_count) == (length, sum(following.values()), following[token]), (context, token)
            assert result.probability == pytest.approx(following[token] / sum(following.values()))
            assert result.suffix == context[len(context) - length :]
    full = index.infgram(docs[0][:12], next_token=3)
    one = index.infgram_prob(docs[0][:12], 3)
    assert (one.suffix_length, one.context_count, one.next_count, one.probability) == (full.suffix_length, full.context_count, full.next_count, full.probability)
    with pytest.raises(LmscopeError, match="token id 65535 in the next token"):
        index.infgram_prob([1], 65535)


def test_shards_are_read_through_memory_maps_not_copies(small: dict) -> None:
    for shard in small["many"].shards:
        for array in (shard.stream, shard.sa.entries, shard.starts):
            assert type(array) is np.ndarray and isinstance(array.base, np.memmap) and not array.flags.owndata


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "<u4", ">u4"])
def test_scalar_reads_answer_the_array_in_either_byte_order(dtype: str) -> None:
    values = np.array([0, 1, 300, np.iinfo(dtype).max], dtype=dtype)
    reader = scalar_reader(values)
    assert [reader[j] for j in range(len(values))] == values.tolist()
    assert isinstance(reader, memoryview) == np.dtype(dtype).isnative  # the fast path where the bytes allow it


def test_window_clips_to_the_document(small: dict) -> None:
    index, docs = small["many"], small["docs"]
    match = index.locate(docs[12][2:5], limit=None).matches[0]
    window = index.window(match, before=4, after=500)
    doc = docs[match.doc_index]
    assert (window.start, window.stop) == (max(0, match.offset - 4), len(doc))
    assert window.tokens == doc[window.start : window.stop]
    assert window.tokens[match.offset - window.start : match.offset - window.start + 3] == docs[12][2:5]
    assert index.document_tokens(7).tolist() == docs[7] and index.document_tokens(3).tolist() == []


def test_wide_corpora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # uint32 ids (few distinct, so n-grams repeat), and a uint16 corpus whose vocabulary has all 65,536 ids
    wide = [[70_000 + t for t in doc] for doc in random_docs(6, 25, 5, 90)]
    full = [[65_531 + t for t in doc] for doc in random_docs(7, 25, 5, 90)]  # ids up to 65535, the usual separator
    for name, docs, vocab, dtype in [("wide", wide, 70_010, "uint32"), ("full", full, 65_536, "uint16")]:
        index = Index.open(build_index(write_corpus(tmp_path / name, docs, vocab, dtype), tmp_path / f"{name}-index", shard_tokens=400).path)
        assert index.manifest["stream_dtype"] == "uint32" and index.separator == 2**32 - 1
        for q in queries(docs, 5, seed=8, n=15) + boundary_ngrams(docs)[:10]:
            assert index.count(q) == len(naive_locate(docs, q))
        for context in ([], docs[2][:6]):
            length, following = naive_infgram(docs, context)
            assert index.infgram(context).counts == dict(following)
            token = max(following, key=lambda t: (following[t], t))
            assert (index.infgram_prob(context, token).suffix_length, index.infgram_prob(context, token).next_count) == (length, following[token])
    # five-byte suffix-array entries, as shards past 2^32 positions store them
    monkeypatch.setattr("lmscope.index.build.suffix_array_width", lambda n: 5)
    docs = random_docs(9, 20, VOCAB, 120)
    index = Index.open(build_index(write_corpus(tmp_path / "five", docs, VOCAB), tmp_path / "five-index", shard_tokens=500).path)
    assert {s.info.sa_width for s in index.shards} == {5}
    for q in queries(docs, VOCAB, seed=10, n=15):
        assert [(m.doc_index, m.offset) for m in index.locate(q, limit=None).matches] == naive_locate(docs, q)
        assert index.count(q) == len(naive_locate(docs, q))
    for context in ([], docs[2][:6], docs[-1][-5:]):
        length, following = naive_infgram(docs, context)
        assert (index.infgram(context).suffix_length, index.infgram(context).counts) == (length, dict(following))
        assert index.infgram_prob(context, 1).next_count == following[1]


def test_uint16_index_takes_at_most_7_bytes_per_token(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    docs = [rng.integers(0, 50_000, size=int(rng.integers(50, 800))).tolist() for _ in range(500)]
    report = build_index(write_corpus(tmp_path / "corpus", docs, 50_000), tmp_path / "index", shard_tokens=60_000)
    on_disk = sum(p.stat().st_size for p in report.path.rglob("*") if p.is_file())
    n_tokens = sum(map(len, docs))
    assert report.bytes == on_disk and len(report.manifest["shards"]) > 1
    assert on_disk / n_tokens <= 7.0, on_disk / n_tokens


# --- building: resume, atomicity, refusals -----------------------------------------------


def test_killed_build_resumes_and_ends_byte_identical(small: dict, tmp_path: Path) -> None:
    class Killed(Exception):
        pass

    def kill_after_first_shard(task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
        if advance:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        build_index(small["corpus"], out, shard_tokens=300, progress=kill_after_first_shard)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] == ["shard-00000"] and not manifest["complete"]
    with pytest.raises(LmscopeError, match="unfinished"):
        Index.open(out)
    report = build_index(small["corpus"], out, shard_tokens=300)
    assert (report.shards_resumed, report.shards_built) == (1, len(manifest["shards"]) - 1)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(out) == files(small["many"].path)
    again = build_index(small["corpus"], out, shard_tokens=300)  # a finished index is only read back
    assert (again.shards_built, again.shards_resumed) == (0, len(manifest["shards"]))



def test_bad_input_gets_one_clear_sentence(small: dict, tmp_path: Path) -> None:
    index = small["one"]
    other = write_corpus(tmp_path / "other", random_docs(12, 10, VOCAB, 50), VOCAB)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    cases = [
        (lambda: build_index(tmp_path / "missing", tmp_path / "x"), "does not exist"),
        (lambda: build_index(other, small["many"].path, shard_tokens=300), "holds an index of another corpus"),
        (lambda: build_index(small["corpus"], small["many"].path, shard_tokens=999), "--shard-tokens 300"),
        (lambda: build_index(small["corpus"], tmp_path / "stray"), "already holds files (notes.txt)"),
        (lambda: build_index(small["corpus"], tmp_path / "y", shard_tokens=0), "not a positive number"),
        (lambda: Index.open(small["corpus"]), "does not describe an lmscope index"),
        (lambda: Index.open(tmp_path / "nowhere"), "does not exist"),
        (lambda: index.count([]), "is empty"),
        (lambda: index.count([1, VOCAB]), f"token id {VOCAB} in the token sequence to count is outside the vocabulary"),
        (lambda: index.locate([-1]), "token id -1"),
        (lambda: index.count("hello"), "is text"),
        (lambda: index.infgram([1], next_token=65535), "token id 65535 in the next token"),
        (lambda: index.window(Match(0, 10_000, 2), 1, 1), "lies outside document 0"),
        (lambda: index.document_tokens(len(small["docs"])), "out of range"),
        (lambda: index.encode("hi"), "model spec 'random' is neither an existing directory"),
    ]
    for call, message in cases:
        with pytest.raises(LmscopeError) as err:
            call()
        assert message in _sentence(err), (message, str(err.value))
    bad_vocab = write_corpus(tmp_path / "bad", [[1, 2, 9]], 5)
    with pytest.raises(LmscopeError) as err:
        build_index(bad_vocab, tmp_path / "bad-index")
    assert "holds token id 9 at position 2, outside its vocabulary of 5 ids" in _sentence(err)


# --- command line -------------------------------------------------------------------------



def test_cli_json_and_errors(small: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs, out = small["docs"], tmp_path / "cli-index"
    code, stdout, err = _run(["index", "build", str(small["corpus"]), "--out", str(out), "--shard-tokens", "500", "--json"], capsys)
    assert code == 0, err
    built = json.loads(stdout)
    assert built["n_tokens"] == sum(map(len, docs)) and built["shards_built"] == built["shards"] > 1
    q = docs[0][:2]
    code, stdout, err = _run(["index", "count", str(out), "--tokens", ",".join(map(str, q)), "--json"], capsys)
    assert code == 0 and json.loads(stdout) == {"tokens": q, "count": len(naive_locate(docs, q))}, err
    code, stdout, err = _run(["index", "locate", str(out), "--tokens", ",".join(map(str, q)), "--limit", "2", "--window", "1", "--json"], capsys)
    found = json.loads(stdout)
    assert code == 0 and found["count"] == len(naive_locate(docs, q)) and found["truncated"], err
    assert [(m["doc_index"], m["offset"]) for m in found["matches"]] == naive_locate(docs, q)[:2]
    d, o = naive_locate(docs, q)[0]
    assert found["matches"][0]["window"]["tokens"] == docs[d][max(0, o - 1) : o + 3]
    code, stdout, err = _run(["index", "infgram", str(out), "--context-tokens", ",".join(map(str, docs[0][:5])), "--next-token", "1", "--json"], capsys)
    result = json.loads(stdout)
    length, following = naive_infgram(docs, docs[0][:5])
    assert code == 0 and result["suffix_length"] == length and result["next_count"] == following[1], err
    code, stdout, _ = _run(["index", "info", str(out)], capsys)
    assert code == 0 and "bytes per token" in stdout
    code, stdout, _ = _run(["index", "locate", str(out), "--tokens", ",".join(map(str, q)), "--limit", "2"], capsys)
    assert code == 0 and f"doc-{d}" in stdout
    for args, message in [
        (["index", "count", str(out), "--tokens", "1,x"], "not a list of integers"),
        (["index", "count", str(out)], "exactly one of --tokens or --text"),
        (["index", "count", str(out), "--tokens", "99"], "outside the vocabulary"),
        (["index", "count", str(tmp_path / "none"), "--tokens", "1"], "does not exist"),
        (["index", "locate", str(out), "--tokens", "1", "--before-step", "3"], "name the suite with --suite"),
        (["index", "locate", str(out), "--tokens", "1", "--suite", str(tmp_path)], "is not a mini suite"),
    ]:
        code, _, err = _run(args, capsys)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (args, err)


# --- training time: a planted phrase -----------------------------------------------------


def test_planted_phrase_is_traced_to_its_documents_and_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built = build_planted_suite(tmp_path)
    suite, docs, planted, truth, starts = built.suite, built.docs, built.planted, built.truth, built.starts

    index = Index.open(build_index(suite, tmp_path / "index", shard_tokens=700).path)  # the suite directory names its corpus
    found = index.locate(PHRASE, limit=None)
    assert [(m.doc_index, m.offset) for m in found.matches] == sorted(planted.items())
    checkpoint = 20
    for match in found.matches:
        seen = index.exposures(match, suite, before_step=checkpoint)
        expected = truth[match.doc_index]
        assert sorted(e.step for e in seen.exposures) == sorted(expected), match
        assert seen.steps == sorted(set(expected)) and seen.times_seen == len(expected)
        assert seen.first_step == (min(expected) if expected else None)
        assert seen.seen_before == sum(1 for s in expected if s < checkpoint)
    assert index.exposures(found.matches[-1], suite).first_step is None  # the held-out document
    assert any(len(v) > 1 for v in truth.values())  # a document trained in two epochs
    straddling = [m for m in found.matches if not truth[m.doc_index] and m.doc_index in starts]
    assert straddling and all(index.exposures(m, suite).partial for m in straddling)  # cut by a row boundary: never seen whole

    code, stdout, err = _run(["index", "locate", str(index.path), "--tokens", ",".join(map(str, PHRASE)), "--suite", str(suite), "--before-step", str(checkpoint), "--json"], capsys)
    assert code == 0, err
    listed = json.loads(stdout)["matches"]
    assert [(m["doc_index"], m["steps"], m["seen_before"]) for m in listed] == [
        (doc, sorted(set(truth[doc])), sum(1 for s in truth[doc] if s < checkpoint)) for doc in sorted(planted)
    ]
    other = Index.open(build_index(write_corpus(tmp_path / "other", docs[:5], 64), tmp_path / "other-index").path)
    with pytest.raises(LmscopeError) as err_info:
        other.exposures(Match(0, 0, 1), suite)
    assert "was built from" in _sentence(err_info)


# --- text ---------------------------------------------------------------------------------


def test_text_queries_use_the_corpus_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_fixtures import build_bpe_tokenizer, tiny_tokenized_corpus

    corpus = tiny_tokenized_corpus(tmp_path, n_documents=12)
    index = Index.open(build_index(corpus, tmp_path / "index").path)  # the corpus manifest names its tokenizer directory
    docs = [corpus.document_tokens(i).tolist() for i in range(len(corpus))]
    ids = index.encode("git rebase reapplies commits")
    assert index.count(ids) == len(naive_locate(docs, ids)) > 0
    code, stdout, err = _run(["index", "count", str(index.path), "--text", "git rebase reapplies commits", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["count"] == index.count(ids), err
    match = index.locate(ids, limit=1).matches[0]
    window = index.window(match, before=3, after=3, decode=True)
    assert window.parts["match"] == "git rebase reapplies commits" and window.text == window.parts["before"] + window.parts["match"] + window.parts["after"]
    code, stdout, err = _run(["index", "locate", str(index.path), "--text", "git rebase reapplies commits", "--limit", "1"], capsys)
    assert code == 0 and "[git rebase reapplies commits]" in stdout, err
    other = build_bpe_tokenizer(tmp_path / "other-tok", vocab_size=300)
    with pytest.raises(LmscopeError) as err_info:
        Index.open(index.path, tokenizer=str(other)).encode("git")
    assert "is not the one corpus" in _sentence(err_info)
