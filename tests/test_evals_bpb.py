"""Bits per byte by domain against plain `transformers` losses and a token-by-token brute force."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import tiny_tokenized_corpus
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.evals.bpb import bits_per_byte_by_domain, windows
from tiny_models import tiny_model

VOCAB = 400
PREFIX = 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, TokenizedCorpus]:
    root = tmp_path_factory.mktemp("bpb")
    corpus = tiny_tokenized_corpus(root, vocab_size=VOCAB)
    model = tiny_model("gpt_neox", vocab_size=VOCAB)
    return model, corpus


@pytest.mark.parametrize(("n", "ctx", "stride"), [(1, 4, 2), (2, 4, 2), (30, 8, 3), (30, 8, 7), (64, 16, 1), (5, 64, 32)])
def test_windows_score_every_position_once_with_enough_context(n: int, ctx: int, stride: int) -> None:
    counts = np.zeros(n, dtype=int)
    for begin, end, first in windows(n, ctx, stride):
        assert end - begin <= ctx and begin < first <= end
        counts[first:end] += 1
        if begin > 0:
            assert first - begin >= ctx - stride  # every scored token sees at least ctx - stride tokens
    assert counts[0] == 0 and (counts[1:] == 1).all()


def _hf_bits(model: torch.nn.Module, tokens: np.ndarray) -> float:
    ids = torch.from_numpy(np.concatenate([[PREFIX], tokens]).astype(np.int64))[None]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean over the len(tokens) predicted positions
    return loss * len(tokens) / math.log(2)


def test_matches_plain_transformers_loss_per_domain(setup) -> None:
    model, corpus = setup
    results = bits_per_byte_by_domain(model, corpus, ctx=256, stride=128, prefix_token_id=PREFIX)
    heldout = corpus.select(split="heldout")
    by_domain: dict[str, list[int]] = {}
    for doc in heldout.tolist():
        assert corpus.documents.column("n_tokens")[doc].as_py() + 1 <= 256, "the fixture documents must fit one window"
        by_domain.setdefault(corpus.documents.column("domain")[doc].as_py(), []).append(doc)
    n_bytes = corpus.documents.column("n_bytes").to_numpy()
    for row in results:
        docs = heldout.tolist() if row.domain == "all" else by_domain[row.domain]
        bits = sum(_hf_bits(model, corpus.document_tokens(d)) for d in docs)
        assert row.bits == pytest.approx(bits, rel=1e-5)
        assert row.bytes == int(n_bytes[docs].sum()) and row.documents == len(docs)
        assert row.bits_per_byte == pytest.approx(bits / row.bytes, rel=1e-5)
    assert [row.domain for row in results] == sorted(by_domain) + ["all"]


def test_sliding_window_with_stride_one_equals_token_by_token(setup) -> None:
    model, corpus = setup
    doc = int(corpus.select(split="heldout")[0])
    tokens = corpus.document_tokens(doc).astype(np.int64)
    sequence = np.concatenate([[PREFIX], tokens])
    ctx = 6
    nats = 0.0
    with torch.no_grad():
        for i in range(1, len(sequence)):
            context = torch.from_numpy(sequence[max(0, i - ctx + 1) : i])[None]
            log_probs = torch.log_softmax(model(input_ids=context).logits[0, -1].double(), dim=-1)
            nats -= log_probs[sequence[i]].item()
    (row, _) = bits_per_byte_by_domain(model, corpus, ctx=ctx, stride=1, prefix_token_id=PREFIX, max_documents=1)
    assert row.tokens == len(tokens)
    assert row.bits == pytest.approx(nats / math.log(2), rel=1e-5)


def test_batch_size_invariant_and_deterministic(setup) -> None:
    model, corpus = setup
    one = bits_per_byte_by_domain(model, corpus, ctx=16, stride=8, batch_size=1, prefix_token_id=PREFIX)
    many = bits_per_byte_by_domain(model, corpus, ctx=16, stride=8, batch_size=7, prefix_token_id=PREFIX)
    again = bits_per_byte_by_domain(model, corpus, ctx=16, stride=8, batch_size=7, prefix_token_id=PREFIX)
    for a, b, c in zip(one, many, again):
        assert abs(a.bits_per_byte - b.bits_per_byte) <= 1e-5 and a.tokens == b.tokens
        assert b.bits_per_byte == c.bits_per_byte


def test_bad_input(setup) -> None:
    model, corpus = setup
    with pytest.raises(LmscopeError, match="ctx >= 2 and 1 <= stride < ctx"):
        bits_per_byte_by_domain(model, corpus, ctx=8, stride=8)
    with pytest.raises(LmscopeError, match="domain 'nope' is not in"):
        bits_per_byte_by_domain(model, corpus, domain="nope")


def test_result_rows_fit_the_results_schema(setup, tmp_path: Path) -> None:
    from lmscope.evals.bpb import result_rows
    from lmscope.results.query import query_results
    from lmscope.results.schema import write_results

    model, corpus = setup
    results = bits_per_byte_by_domain(model, corpus, ctx=32, stride=16, prefix_token_id=PREFIX)
    write_results(result_rows(results, model="tiny", revision="step0", step=0, tokens_seen=0), tmp_path / "bpb.parquet")
    (row,) = query_results("SELECT value, bytes FROM results WHERE domain = 'all'", [tmp_path]).to_pylist()
    assert row == {"value": results[-1].bits_per_byte, "bytes": results[-1].bytes}


def test_max_per_domain_takes_the_first_documents_of_each_domain(setup) -> None:
    model, corpus = setup
    heldout = corpus.select(split="heldout").tolist()
    domains = corpus.documents.column("domain").to_pylist()
    expected: dict[str, list[int]] = {}
    for doc in heldout:
        if len(expected.setdefault(domains[doc], [])) < 2:
            expected[domains[doc]].append(doc)
    results = {r.domain: r for r in bits_per_byte_by_domain(model, corpus, ctx=256, prefix_token_id=PREFIX, max_per_domain=2)}
    n_tokens = corpus.documents.column("n_tokens").to_numpy()
    assert len(expected) >= 2 and set(results) == set(expected) | {"all"}
    for domain, docs in expected.items():
        assert results[domain].documents == len(docs) and results[domain].tokens == int(n_tokens[docs].sum())
    with pytest.raises(LmscopeError, match="max_per_domain=0"):
        bits_per_byte_by_domain(model, corpus, max_per_domain=0)
