"""Logit lens against HF's own loss (last layer) and a per-layer brute force through HF modules."""

from __future__ import annotations

import pytest
import torch

from data_fixtures import tiny_tokenized_corpus
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.evals.lens import logit_lens, result_rows
from lmscope.models.hooks import HookedModel
from tiny_models import tiny_model

VOCAB = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> TokenizedCorpus:
    root = tmp_path_factory.mktemp("lens")
    return tiny_tokenized_corpus(root, vocab_size=VOCAB)


@pytest.mark.parametrize("label", ["gpt_neox", "llama", "olmo2"])
def test_last_layer_lens_is_the_model_and_layers_match_brute_force(label: str, corpus: TokenizedCorpus) -> None:
    model = tiny_model(label, vocab_size=VOCAB)
    hooked = HookedModel(model)
    layers = logit_lens(hooked, corpus, ctx=16, n_contexts=6, batch_size=4)
    assert [layer.layer for layer in layers] == list(range(hooked.n_layers))
    contexts = [corpus.document_tokens(d)[:16] for d in corpus.select(split="heldout").tolist() if len(corpus.document_tokens(d)) >= 16][:6]
    ids = torch.tensor([list(map(int, c)) for c in contexts])
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
    assert layers[-1].cross_entropy == pytest.approx(out.loss.item(), rel=1e-6)
    assert abs(layers[-1].kl) <= 1e-9
    # Brute force for layer 0 through HF's hidden states (layer 0 output = hidden_states[1]).
    final_norm = model.get_submodule(hooked.arch.final_norm)
    with torch.no_grad():
        lens = torch.log_softmax(model.get_output_embeddings()(final_norm(out.hidden_states[1]))[:, :-1].double(), -1)
        final = torch.log_softmax(out.logits[:, :-1].double(), -1)
    ce0 = -lens.gather(-1, ids[:, 1:].unsqueeze(-1)).mean().item()
    kl0 = (final.exp() * (final - lens)).sum(-1).mean().item()
    assert layers[0].cross_entropy == pytest.approx(ce0, rel=1e-6) and layers[0].kl == pytest.approx(kl0, rel=1e-6)
    assert layers[0].kl > 0


def test_batch_size_invariance_rows_and_bad_input(corpus: TokenizedCorpus) -> None:
    hooked = HookedModel(tiny_model("gpt2", vocab_size=VOCAB))
    a = logit_lens(hooked, corpus, ctx=16, n_contexts=6, batch_size=1)
    b = logit_lens(hooked, corpus, ctx=16, n_contexts=6, batch_size=6)
    for x, y in zip(a, b):
        assert abs(x.cross_entropy - y.cross_entropy) <= 1e-5 and abs(x.kl - y.kl) <= 1e-5
    rows = result_rows(a, model="tiny")
    assert {r["metric"] for r in rows} == {"lens_cross_entropy", "lens_kl"} and len(rows) == 2 * hooked.n_layers
    with pytest.raises(LmscopeError, match="has 100000 tokens; pass a smaller ctx"):
        logit_lens(hooked, corpus, ctx=100000)
