"""Corpus statistics against brute force: term frequency by step (a scan of the training rows), top n-grams (Counter), duplicates, contamination."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from index_fixtures import PHRASE, build_planted_suite, naive_locate, random_docs, write_corpus, run_cli as _run, sentence as _sentence
from lmscope.errors import LmscopeError
from lmscope.index import Index, build_index
from lmscope.index.stats import (
    ALL_DOMAINS,
    EvalDocument,
    contamination,
    duplicate_documents,
    read_eval_set,
    term_frequency,
    top_ngrams,
)




def _domain(i: int) -> str:  # write_corpus's domains
    return "alpha" if i % 2 else "beta"


# --- term frequency by training step ------------------------------------------------------


def test_term_frequency_by_step_equals_a_scan_of_the_training_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built = build_planted_suite(tmp_path)
    index = Index.open(build_index(built.suite, tmp_path / "index", shard_tokens=600).path)
    rows = np.fromfile(built.suite / "data" / "train.bin", dtype="<u2").reshape(-1, built.seq_len + 1).tolist()

    def seen_in_rows(term: list[int], before: int) -> int:
        m = len(term)
        return sum(1 for row in rows[: built.batch * before] for o in range(len(row) - m + 1) if row[o : o + m] == term)

    steps = [0, 1, 7, 20, built.steps]
    terms = [PHRASE, [5], [3, 4], built.docs[0][2:6], built.docs[7][10:13], [63]]
    for term in terms:
        result = term_frequency(index, term, suite=built.suite, steps=steps)
        truth = naive_locate(built.docs, term)
        assert result.corpus_count == len(truth) and result.documents == len({d for d, _ in truth})
        assert result.by_split == dict(Counter("heldout" if d == 25 else "train" for d, _ in truth))
        assert result.checkpoints == steps
        assert result.seen == [seen_in_rows(term, n) for n in steps], term
        assert result.trained == seen_in_rows(term, built.steps)
        first = next((s for s in range(built.steps) if seen_in_rows(term, s + 1)), None)
        assert result.first_step == first
    assert term_frequency(index, [5], suite=built.suite, steps=steps).seen[-1] > 50  # a frequent unigram: many exposures, rows overlapping by a token
    plain = term_frequency(index, [3, 4])
    assert plain.suite is None and plain.corpus_count == len(naive_locate(built.docs, [3, 4])) and plain.seen == []

    code, stdout, err = _run(
        ["index", "stats", "frequency", str(index.path), "--tokens", ",".join(map(str, PHRASE)), "--tokens", "5", "--suite", str(built.suite), "--steps", "0,20", "--json"],
        capsys,
    )
    assert code == 0, err
    listed = json.loads(stdout)["terms"]
    assert [[c["seen"] for c in t["seen_by_checkpoint"]] for t in listed] == [[seen_in_rows(PHRASE, 0), seen_in_rows(PHRASE, 20)], [0, seen_in_rows([5], 20)]]
    code, stdout, err = _run(["index", "stats", "frequency", str(index.path), "--tokens", "5", "--suite", str(built.suite)], capsys)
    assert code == 0 and "<step20" not in stdout and "<step40" in stdout, err  # the suite.json here lists no checkpoints: its last step is used
    code, _, err = _run(["index", "stats", "frequency", str(index.path), "--tokens", "5", "--steps", "3"], capsys)
    assert code == 2 and "name the suite with --suite" in " ".join(err.split())


# --- top n-grams --------------------------------------------------------------------------


def naive_top(docs: list[list[int]], n: int, top: int, keep: list[int]) -> tuple[list[tuple[list[int], int]], int, int]:
    counts: Counter[tuple[int, ...]] = Counter()
    for i in keep:
        doc = docs[i]
        counts.update(tuple(doc[o : o + n]) for o in range(len(doc) - n + 1))
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [(list(g), c) for g, c in ordered], sum(counts.values()), len(counts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stats")
    docs = random_docs(30, 60, 7, 90)
    docs[20], docs[33] = list(docs[13]), list(docs[13])  # duplicates (44 tokens), in both domains; 33 held out
    docs[40] = list(docs[11])
    docs[50] = []
    splits = ["heldout" if i in (33, 41, 42, 43) else "train" for i in range(len(docs))]
    path = write_corpus(root / "corpus", docs, 7, splits=splits)
    index = Index.open(build_index(path, root / "index", shard_tokens=700).path)
    return {"root": root, "docs": docs, "splits": splits, "path": path, "index": index}


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_top_ngrams_equal_counter(corpus: dict, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmscope.index.stats._CHUNK", 97)  # many chunks per shard: merging must stay exact
    docs, index = corpus["docs"], corpus["index"]
    result = top_ngrams(index, n, top=8)
    assert list(result.by_domain) == ["alpha", "beta", ALL_DOMAINS]
    for name, keep in [("alpha", [i for i in range(len(docs)) if _domain(i) == "alpha"]), ("beta", [i for i in range(len(docs)) if _domain(i) == "beta"]), (ALL_DOMAINS, list(range(len(docs))))]:
        grams, total, distinct = naive_top(docs, n, 8, keep)
        assert [(g.tokens, g.count) for g in result.by_domain[name]] == grams, (name, n)
        assert (result.totals[name], result.distinct[name]) == (total, distinct)
    held = top_ngrams(index, n, top=5, domains=["beta"], split="heldout")
    keep = [i for i in range(len(docs)) if _domain(i) == "beta" and corpus["splits"][i] == "heldout"]
    assert [(g.tokens, g.count) for g in held.by_domain["beta"]] == naive_top(docs, n, 5, keep)[0] and list(held.by_domain) == ["beta", ALL_DOMAINS]


def test_top_ngrams_past_64_bits_and_with_text(tmp_path: Path, corpus: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    docs = [rng.choice([0, 7, 40_000, 65_000], size=int(rng.integers(5, 60))).tolist() for _ in range(30)]  # 16-bit ids: 5-grams do not fit 64 bits
    index = Index.open(build_index(write_corpus(tmp_path / "wide", docs, 65_001), tmp_path / "wide-index").path)
    monkeypatch.setattr("lmscope.index.stats._CHUNK", 50)
    for n in (4, 5):
        result = top_ngrams(index, n, top=6)
        assert [(g.tokens, g.count) for g in result.by_domain[ALL_DOMAINS]] == naive_top(docs, n, 6, list(range(len(docs))))[0]
    from data_fixtures import tiny_tokenized_corpus

    text = tiny_tokenized_corpus(tmp_path / "text", n_documents=8)
    decoded = top_ngrams(Index.open(build_index(text, tmp_path / "text-index").path), 2, top=3, decode=True)
    assert all(g.text for g in decoded.by_domain[ALL_DOMAINS])


# --- duplicates ---------------------------------------------------------------------------


def test_duplicates_equal_brute_force(corpus: dict, capsys: pytest.CaptureFixture[str]) -> None:
    docs, index = corpus["docs"], corpus["index"]
    result = duplicate_documents(index)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, doc in enumerate(docs):
        if doc:
            groups.setdefault(tuple(doc), []).append(i)
    truth = sorted(g for g in groups.values() if len(g) > 1)
    assert sorted(g.doc_indices for g in result.groups) == truth and [13, 20, 33] in truth
    assert result.redundant_documents == sum(len(g) - 1 for g in truth)
    assert result.redundant_tokens == sum((len(g) - 1) * len(docs[g[0]]) for g in truth)
    assert result.n_documents == sum(1 for d in docs if d)
    crossing = [g for g in result.groups if g.crosses_splits]
    assert [g.doc_indices for g in crossing] == [[13, 20, 33]] and crossing[0].doc_ids == ["doc-13", "doc-20", "doc-33"]
    with_empty = duplicate_documents(index, min_tokens=0)
    assert sorted(g.doc_indices for g in with_empty.groups) == sorted(truth + [[i for i, d in enumerate(docs) if not d]])
    code, stdout, err = _run(["index", "stats", "duplicates", str(index.path), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["groups_across_splits"] == 1, err


# --- contamination ------------------------------------------------------------------------


def naive_overlap(corpus_docs: list[list[int]], tokens: list[int], n: int) -> tuple[int, int]:
    grams = {tuple(doc[o : o + n]) for doc in corpus_docs for o in range(len(doc) - n + 1)}
    found = [i for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n]) in grams]
    covered = {j for i in found for j in range(i, i + n)}
    return len(found), len(covered)


def test_contamination_equals_brute_force(corpus: dict) -> None:
    docs, index = corpus["docs"], corpus["index"]
    rng = np.random.default_rng(9)
    evals = [EvalDocument(f"copy-{i}", docs[i][3:40]) for i in (1, 2)]
    evals += [EvalDocument(f"random-{k}", rng.integers(0, 7, size=40).tolist()) for k in range(6)]
    evals += [EvalDocument("short", [1, 2, 3])]
    for n in (4, 8, 13):
        result = contamination(index, evals, n=n)
        for doc, overlap in zip(evals, result.documents):
            matched, covered = naive_overlap(docs, doc.tokens, n)
            assert (overlap.matched_ngrams, overlap.covered_tokens) == (matched, covered), (doc.id, n)
            assert overlap.n_ngrams == max(len(doc.tokens) - n + 1, 0)
        assert result.contaminated == sum(1 for doc in evals if naive_overlap(docs, doc.tokens, n)[0])
        assert result.fraction == pytest.approx(result.contaminated / len(evals)) and result.too_short == (1 if n > 3 else 0)
    mixed = contamination(index, evals, n=8)
    assert 0 < mixed.contaminated < len(evals)  # both outcomes are covered


def test_contamination_of_a_split_excludes_itself(corpus: dict, capsys: pytest.CaptureFixture[str]) -> None:
    docs, splits, index = corpus["docs"], corpus["splits"], corpus["index"]
    held = read_eval_set(corpus["path"], index, split="heldout")
    assert [d.doc_index for d in held] == [i for i, s in enumerate(splits) if s == "heldout"] and held[0].id == "doc-33"
    train = [doc for i, doc in enumerate(docs) if splits[i] == "train"]
    result = contamination(index, held, n=6, against_split="train")
    for doc, overlap in zip(held, result.documents):
        assert (overlap.matched_ngrams, overlap.covered_tokens) == naive_overlap(train, doc.tokens, 6), doc.id
    assert result.documents[0].token_overlap == 1.0  # doc-33 is a copy of the trained doc-13
    others = [doc for i, doc in enumerate(docs) if i != 41]
    itself = contamination(index, [held[1]], n=6)  # the whole corpus, less the document itself
    assert (itself.documents[0].matched_ngrams, itself.documents[0].covered_tokens) == naive_overlap(others, docs[41], 6)
    code, stdout, err = _run(["index", "stats", "contamination", str(index.path), str(corpus["path"]), "--split", "heldout", "--n", "6", "--json"], capsys)
    assert code == 0, err
    listed = json.loads(stdout)
    assert listed["against_split"] == "train" and listed["contaminated"] == result.contaminated and listed["n_documents"] == len(held)


def test_contamination_of_text_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_fixtures import SAMPLE_TEXTS, tiny_tokenized_corpus, write_jsonl

    text_corpus = tiny_tokenized_corpus(tmp_path, n_documents=10)
    index = Index.open(build_index(text_corpus, tmp_path / "index").path)
    corpus_docs = [text_corpus.document_tokens(i).tolist() for i in range(len(text_corpus))]
    texts = [SAMPLE_TEXTS[2] + " and then", "Zebras quietly juggle forty violet umbrellas near the harbour tonight, said nobody."]
    jsonl = write_jsonl(tmp_path / "eval.jsonl", [{"id": f"e{k}", "prompt": t} for k, t in enumerate(texts)])
    (tmp_path / "eval.txt").write_text("\n".join(texts) + "\n\n")
    for path in (jsonl, tmp_path / "eval.txt"):
        documents = read_eval_set(path, index, text_field="prompt")
        assert [d.tokens for d in documents] == [index.encode(t) for t in texts]
        result = contamination(index, documents, n=5)
        assert [(d.matched_ngrams, d.covered_tokens) for d in result.documents] == [naive_overlap(corpus_docs, index.encode(t), 5) for t in texts]
        assert [d.contaminated for d in result.documents] == [True, False]
    code, stdout, err = _run(["index", "stats", "contamination", str(index.path), str(tmp_path / "eval.txt"), "--n", "5"], capsys)
    assert code == 0 and "1 of 2 documents (50.0%)" in " ".join(stdout.split()), err


# --- bad input ----------------------------------------------------------------------------


def test_bad_input_gets_one_clear_sentence(corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_fixtures import tiny_tokenized_corpus

    index = corpus["index"]
    other = tiny_tokenized_corpus(tmp_path / "other", n_documents=4)
    (tmp_path / "notes.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = [
        (lambda: top_ngrams(index, 0), "--n 0 is not an integer ≥ 1"),
        (lambda: top_ngrams(index, 17), "--n 17 is above 16"),
        (lambda: top_ngrams(index, 2, top=0), "--top 0 is not an integer ≥ 1"),
        (lambda: top_ngrams(index, 2, domains=["gamma"]), "domain 'gamma' is not in the index's corpus; it holds alpha, beta"),
        (lambda: top_ngrams(index, 2, split="dev"), "split 'dev' is not in the index's corpus"),
        (lambda: term_frequency(index, []), "the term is empty"),
        (lambda: term_frequency(index, [1], steps=[3]), "name the suite with --suite"),
        (lambda: term_frequency(index, [1], suite=tmp_path), "is not a mini suite"),
        (lambda: duplicate_documents(index, min_tokens=-1), "--min-tokens -1 is not an integer ≥ 0"),
        (lambda: contamination(index, [], n=0), "--n 0 is not an integer ≥ 1"),
        (lambda: contamination(index, [], against_split="dev"), "--against-split 'dev' is not a split"),
        (lambda: read_eval_set(tmp_path / "missing.jsonl", index), "does not exist"),
        (lambda: read_eval_set(other.path, index), "not with the index's tokenizer"),
        (lambda: read_eval_set(tmp_path / "notes.jsonl", index, split="heldout"), "leave --split out"),
        (lambda: read_eval_set(tmp_path / "empty.txt", index), "holds no documents"),
        (lambda: read_eval_set(corpus["path"], index, split="dev"), "split 'dev' is not in"),
    ]
    for call, message in cases:
        with pytest.raises(LmscopeError) as err:
            call()
        assert message in _sentence(err), (message, str(err.value))
    path = str(index.path)
    for args, message in [
        (["index", "stats", "frequency", path], "give at least one term"),
        (["index", "stats", "frequency", path, "--tokens", "1", "--suite", str(tmp_path), "--steps", "0"], "is not a mini suite"),
        (["index", "stats", "frequency", path, "--tokens", "1,x"], "not a list of integers"),
        (["index", "stats", "top-ngrams", path, "--n", "40", "--no-text"], "--n 40 is above 16"),
        (["index", "stats", "duplicates", str(tmp_path / "none")], "does not exist"),
        (["index", "stats", "contamination", path, str(tmp_path / "missing.jsonl")], "does not exist"),
    ]:
        code, _, err_text = _run(args, capsys)
        assert code == 2 and message in " ".join(err_text.split()) and "Traceback" not in err_text, (args, err_text)
    code, stdout, err_text = _run(["index", "stats", "top-ngrams", path, "--n", "2", "--top", "3", "--no-text", "--json"], capsys)
    assert code == 0 and [d["domain"] for d in json.loads(stdout)["domains"]] == ["alpha", "beta", ALL_DOMAINS], err_text
