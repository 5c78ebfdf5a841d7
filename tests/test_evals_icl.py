"""In-context learning score and induction scores against plain `transformers` and hand-made patterns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import tiny_tokenized_corpus
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.evals.icl import (
    ICLScore,
    in_context_learning_score,
    induction_scores,
    prefix_matching_score,
    repeated_random_tokens,
    result_rows,
    scaled_positions,
    uniform_induction_score,
)
from lmscope.models.hooks import HookedModel
from tiny_models import tiny_model

VOCAB = 400


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, TokenizedCorpus]:
    root = tmp_path_factory.mktemp("icl")
    corpus = tiny_tokenized_corpus(root, vocab_size=VOCAB)
    return tiny_model("gpt_neox", vocab_size=VOCAB), corpus


# -- induction ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1])
def test_prefix_matching_score_on_hand_made_patterns(offset: int) -> None:
    T, size = 5, offset + 10
    causal = torch.tril(torch.ones(size, size, dtype=torch.float64))
    uniform = causal / causal.sum(-1, keepdim=True)
    perfect = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        perfect[i, i - T + 1 if i >= offset + T else i] = 1.0
    pattern = torch.stack([perfect, uniform, torch.eye(size, dtype=torch.float64)])[None].repeat(2, 1, 1, 1)  # [batch 2, heads 3, q, k]
    scores = prefix_matching_score(pattern, T, offset)
    expected_uniform = np.mean([1 / (i + 1) for i in range(offset + T, size)])  # query i attends uniformly to i + 1 keys
    assert scores.tolist() == pytest.approx([1.0, expected_uniform, 0.0], abs=1e-12)
    with pytest.raises(LmscopeError, match="does not fit seq_len"):
        prefix_matching_score(pattern, T + 1, offset)


def test_repeated_random_tokens_repeat_and_avoid_special_tokens() -> None:
    ids = repeated_random_tokens(20, 7, 4, seed=3, exclude={0, 1, 2}, bos=1)
    assert ids.shape == (4, 15) and (ids[:, 0] == 1).all()
    assert torch.equal(ids[:, 1:8], ids[:, 8:]) and ids[:, 1:].min() >= 3
    assert torch.equal(ids, repeated_random_tokens(20, 7, 4, seed=3, exclude={0, 1, 2}, bos=1))


@pytest.mark.parametrize("label", ["gpt_neox", "llama", "gpt2"])
def test_induction_scores_match_brute_force_on_hf_attentions(label: str) -> None:
    model = tiny_model(label, attn_implementation="eager")
    T, n, seed = 9, 3, 5
    scores = induction_scores(HookedModel(model), seq_len=T, n_sequences=n, seed=seed)
    bos = model.config.bos_token_id
    offset = 1 if bos is not None else 0
    special = {v for v in (model.config.bos_token_id, model.config.eos_token_id, getattr(model.config, "pad_token_id", None)) if v is not None}
    ids = repeated_random_tokens(model.config.vocab_size, T, n, seed=seed, exclude=special, bos=bos)
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    assert scores.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    for layer, pattern in enumerate(attentions):
        for head in range(pattern.shape[1]):
            total, count = 0.0, 0
            for b in range(n):
                for i in range(offset + T, offset + 2 * T):
                    assert ids[b, i] == ids[b, i - T]  # the current token occurred T positions earlier
                    total += pattern[b, head, i, i - T + 1].item()
                    count += 1
            assert scores[layer, head].item() == pytest.approx(total / count, abs=1e-6)


def test_induction_scores_reject_too_long_sequences() -> None:
    with pytest.raises(LmscopeError, match="pass a seq_len from 1 to 31"):
        induction_scores(tiny_model("gpt_neox"), seq_len=40)


# -- in-context learning score -------------------------------------------------------------


def _brute_force(model: torch.nn.Module, corpus: TokenizedCorpus, late: int, early: int, n_contexts: int | None) -> tuple[float, float, int]:
    docs = [d for d in corpus.select(split="heldout").tolist() if len(corpus.document_tokens(d)) > late][:n_contexts]
    losses = {late: [], early: []}
    with torch.no_grad():
        for d in docs:
            ids = torch.from_numpy(corpus.document_tokens(d)[: late + 1].astype(np.int64))[None]
            logits = model(input_ids=ids).logits[0]
            for k in (late, early):
                losses[k].append(-torch.log_softmax(logits[k - 1].double(), -1)[ids[0, k]].item())
    return float(np.mean(losses[late])), float(np.mean(losses[early])), len(docs)


def test_icl_score_matches_brute_force_losses(setup) -> None:
    model, corpus = setup
    result = in_context_learning_score(model, corpus, late=20, early=3, n_contexts=6, batch_size=4)
    loss_late, loss_early, count = _brute_force(model, corpus, 20, 3, 6)
    assert (result.late, result.early, result.scaled, result.contexts, result.context_tokens) == (20, 3, False, count, 21)
    assert count == 6
    assert result.loss_late == pytest.approx(loss_late, rel=1e-5) and result.loss_early == pytest.approx(loss_early, rel=1e-5)
    assert result.score == pytest.approx(loss_late - loss_early, abs=1e-5)


def test_icl_score_scales_positions_that_do_not_fit(setup) -> None:
    model, corpus = setup
    longest = max(len(corpus.document_tokens(d)) for d in corpus.select(split="heldout").tolist())
    available = min(64, longest)  # the tiny model's max_position_embeddings is 64
    result = in_context_learning_score(model, corpus)  # default 500 / 50 cannot fit
    assert result.scaled and (result.late, result.early) == scaled_positions(available)
    loss_late, loss_early, count = _brute_force(model, corpus, result.late, result.early, None)
    assert result.contexts == count >= 1
    assert result.score == pytest.approx(loss_late - loss_early, abs=1e-5)


def test_icl_score_batch_size_invariant(setup) -> None:
    model, corpus = setup
    one = in_context_learning_score(model, corpus, late=15, early=2, batch_size=1)
    many = in_context_learning_score(model, corpus, late=15, early=2, batch_size=5)
    assert abs(one.score - many.score) <= 1e-5 and one.contexts == many.contexts > 5


class _ShortCorpus:
    def select(self, split: str | None = None) -> np.ndarray:
        return np.arange(3)

    def document_tokens(self, doc: int) -> np.ndarray:
        return np.array([5, 6, 7][: doc + 1])


def test_icl_score_bad_input(setup) -> None:
    model, corpus = setup
    with pytest.raises(LmscopeError, match="too short for an in-context learning score; use documents"):
        in_context_learning_score(model, _ShortCorpus())
    with pytest.raises(LmscopeError, match="1 <= early < late"):
        in_context_learning_score(model, corpus, late=5, early=5)


def test_result_rows_fit_the_results_schema(setup, tmp_path: Path) -> None:
    from lmscope.results.query import query_results
    from lmscope.results.schema import write_results

    model, corpus = setup
    icl = in_context_learning_score(model, corpus, late=10, early=2)
    scores = induction_scores(model, seq_len=8, n_sequences=2)
    rows = result_rows(icl, model="tiny", step=0) + result_rows(scores, model="tiny", step=0)
    write_results(rows, tmp_path / "icl.parquet")
    (row,) = query_results("SELECT value, late FROM results WHERE metric = 'icl_score'", [tmp_path]).to_pylist()
    assert row == {"value": icl.score, "late": 10}
    heads = query_results("SELECT layer, head, value FROM results WHERE metric = 'induction_score' ORDER BY layer, head", [tmp_path]).to_pylist()
    assert [(r["layer"], r["head"]) for r in heads] == [(l, h) for l in range(3) for h in range(4)]
    assert heads[5]["value"] == pytest.approx(scores[1, 1].item())
    assert isinstance(icl, ICLScore)


@pytest.mark.parametrize("bos", [True, False])
def test_uniform_attention_scores_the_chance_level(bos: bool) -> None:
    model = tiny_model("llama")
    with torch.no_grad():  # zero queries: every score is 0, so causal softmax attention is uniform over earlier keys
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    scores = induction_scores(HookedModel(model), seq_len=9, n_sequences=3, prepend_bos=bos)
    assert torch.allclose(scores, torch.full_like(scores, uniform_induction_score(9, bos=bos)), atol=1e-6)
