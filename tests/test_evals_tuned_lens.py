"""Tuned lens against the logit lens (untrained), an independent float64 L-BFGS optimum (trained), and its file format."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers

from data_fixtures import tiny_tokenized_corpus
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.evals.lens import logit_lens
from lmscope.evals.tuned_lens import TunedLens, evaluate_lens, result_rows, train_tuned_lens
from lmscope.models.hooks import HookedModel
from lmscope.results.schema import results_table
from tiny_models import tiny_model

VOCAB = 400
CTX = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> TokenizedCorpus:
    root = tmp_path_factory.mktemp("tuned_lens")
    return tiny_tokenized_corpus(root, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def gpt_neox() -> HookedModel:
    return HookedModel(tiny_model("gpt_neox", vocab_size=VOCAB))


@pytest.fixture(scope="module")
def trained(gpt_neox: HookedModel, corpus: TokenizedCorpus) -> TunedLens:
    return train_tuned_lens(gpt_neox, corpus, ctx=CTX, n_contexts=12, steps=60, tokens_per_step=64, seed=0)


def random_gpt_neox(hidden_size: int = 32, max_positions: int = 64) -> HookedModel:
    """A 3-layer random GPT-NeoX of another width or context length than ``tiny_model``'s."""
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=max_positions)
    return HookedModel(transformers.GPTNeoXForCausalLM(config).eval())


def first_contexts(corpus: TokenizedCorpus, split: str, n: int) -> torch.Tensor:
    """Written here, not imported: the first CTX tokens of the first ``n`` ``split`` documents that long."""
    docs = [corpus.document_tokens(d) for d in corpus.select(split=split).tolist()]
    return torch.tensor([list(map(int, t[:CTX])) for t in docs if len(t) >= CTX][:n])


def assert_layers_close(a: list, b: list, tol: float) -> None:
    assert [x.layer for x in a] == [y.layer for y in b] and [x.positions for x in a] == [y.positions for y in b]
    for x, y in zip(a, b):
        assert abs(x.cross_entropy - y.cross_entropy) <= tol and abs(x.kl - y.kl) <= tol, (x, y)


@pytest.mark.parametrize("label", ["gpt_neox", "llama", "olmo2"])
def test_untrained_tuned_lens_is_the_logit_lens(label: str, corpus: TokenizedCorpus) -> None:
    hooked = HookedModel(tiny_model(label, vocab_size=VOCAB))
    untrained = train_tuned_lens(hooked, corpus, ctx=CTX, n_contexts=4, steps=0)
    assert untrained.n_layers == hooked.n_layers and untrained.d_model == 32
    assert not untrained.weight.any() and not untrained.bias.any()
    reference = logit_lens(hooked, corpus, ctx=CTX, n_contexts=6, batch_size=4)
    assert_layers_close(evaluate_lens(hooked, corpus, untrained, ctx=CTX, n_contexts=6, batch_size=4), reference, 1e-9)
    assert_layers_close(evaluate_lens(hooked, corpus, None, ctx=CTX, n_contexts=6, batch_size=4), reference, 1e-9)


def peaked_gpt_neox() -> torch.nn.Module:
    """A random tiny GPT-NeoX with strongly non-linear layers (matrices ×6) and a peaked output (unembedding ×10).

    On it the best affine translator is far from the identity, yet cannot match the final
    distribution exactly, so "reaches the optimum" is a test with teeth.
    """
    model = tiny_model("gpt_neox", vocab_size=VOCAB)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.ndim == 2:
                param.mul_(6)
        model.get_output_embeddings().weight.mul_(10)
    return model


def lbfgs_kl(model: torch.nn.Module, ids: torch.Tensor, layer: int, lens: TunedLens) -> tuple[float, float, float]:
    """(logit-lens KL, minimal KL, ``lens``'s KL) of ``layer`` on every scored position of ``ids``, in float64.

    The minimum is found by full-batch L-BFGS over h ↦ h + A h + b, built only from HF's
    ``output_hidden_states`` (``hidden_states[layer + 1]`` is that layer's output) and float64
    copies of the final norm and unembedding; nothing of lmscope's but ``lens.weight``/``lens.bias``.
    """
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    d_model = model.config.hidden_size
    hidden = out.hidden_states[layer + 1][:, :-1].double().reshape(-1, d_model)
    log_p = torch.log_softmax(out.logits[:, :-1].double(), -1).reshape(hidden.shape[0], -1)
    norm = copy.deepcopy(model.get_submodule("gpt_neox.final_layer_norm")).double().requires_grad_(False)
    unembed = copy.deepcopy(model.get_output_embeddings()).double().requires_grad_(False)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(unembed(norm(hidden + hidden @ a.T + b)), -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    a = torch.zeros(d_model, d_model, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(d_model, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([a, b], max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=50,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = kl(a, b)
        loss.backward()
        return loss

    optimizer.step(closure)
    zero = torch.zeros_like(b)
    with torch.no_grad():
        return kl(zero.expand_as(a), zero).item(), kl(a, b).item(), kl(lens.weight[layer].double(), lens.bias[layer].double()).item()


def test_trained_lens_reaches_the_lbfgs_optimum_on_its_training_data(corpus: TokenizedCorpus) -> None:
    model = peaked_gpt_neox()
    lens = train_tuned_lens(HookedModel(model), corpus, ctx=CTX, n_contexts=12, steps=1000, tokens_per_step=256)
    ids = first_contexts(corpus, "train", 12)
    assert ids.shape == (12, CTX)
    for layer in (0, 1):
        start, optimum, ours = lbfgs_kl(model, ids, layer, lens)
        assert 0.01 * start < optimum < 0.2 * start, (layer, start, optimum)  # neither trivial nor exact
        assert abs(ours - optimum) <= 0.005 * (start - optimum), (layer, start, optimum, ours)


@pytest.mark.parametrize(("label", "max_ratio"), [("gpt_neox", 0.05), ("llama", 0.9)])
def test_trained_lens_beats_the_logit_lens_on_heldout_contexts(label: str, max_ratio: float, corpus: TokenizedCorpus) -> None:
    hooked = HookedModel(tiny_model(label, vocab_size=VOCAB))
    params_before = [p.detach().clone() for p in hooked.model.parameters()]
    lens = train_tuned_lens(hooked, corpus, ctx=32, n_contexts=16, steps=200)
    assert all(torch.equal(p, q) and p.grad is None for p, q in zip(hooked.model.parameters(), params_before))
    logit = logit_lens(hooked, corpus, ctx=CTX, n_contexts=16, batch_size=4)
    tuned = evaluate_lens(hooked, corpus, lens, ctx=CTX, n_contexts=16, batch_size=4)
    for t, g in zip(tuned[:-1], logit[:-1]):
        assert t.kl < max_ratio * g.kl, (t, g)
    assert tuned[-1] == logit[-1] and abs(tuned[-1].kl) <= 1e-9  # the last layer is read untranslated


def test_training_is_deterministic_and_evaluation_is_batch_size_invariant(
    gpt_neox: HookedModel, corpus: TokenizedCorpus, trained: TunedLens
) -> None:
    again = train_tuned_lens(gpt_neox, corpus, ctx=CTX, n_contexts=12, steps=60, tokens_per_step=64, seed=0)
    assert torch.equal(again.weight, trained.weight) and torch.equal(again.bias, trained.bias)
    other_seed = train_tuned_lens(gpt_neox, corpus, ctx=CTX, n_contexts=12, steps=60, tokens_per_step=64, seed=1)
    assert not torch.equal(other_seed.weight, trained.weight)
    one = evaluate_lens(gpt_neox, corpus, trained, ctx=CTX, n_contexts=6, batch_size=1)
    six = evaluate_lens(gpt_neox, corpus, trained, ctx=CTX, n_contexts=6, batch_size=6)
    assert_layers_close(one, six, 1e-5)


def test_training_reads_only_the_train_split(
    gpt_neox: HookedModel, corpus: TokenizedCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str | None] = []
    select = corpus.select
    monkeypatch.setattr(corpus, "select", lambda split=None, domain=None: asked.append(split) or select(split, domain))
    train_tuned_lens(gpt_neox, corpus, ctx=CTX, n_contexts=4, steps=2)
    assert asked == ["train"]


def test_progress_reports_every_step(gpt_neox: HookedModel, corpus: TokenizedCorpus) -> None:
    calls: list[tuple] = []
    train_tuned_lens(gpt_neox, corpus, ctx=CTX, n_contexts=4, steps=5, tokens_per_step=16,
                     progress=lambda task, advance=0, total=None, **fields: calls.append((task, advance, total)))
    steps = [c for c in calls if c[0] == "train tuned lens"]
    assert sum(c[1] for c in steps) == 5 and {c[2] for c in steps} == {5}


def test_save_load_round_trip_and_width_mismatch(
    gpt_neox: HookedModel, corpus: TokenizedCorpus, trained: TunedLens, tmp_path: Path
) -> None:
    path = trained.save(tmp_path / "lens.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["lens.safetensors"]  # no temporary file left behind
    loaded = TunedLens.load(path)
    assert torch.equal(loaded.weight, trained.weight) and torch.equal(loaded.bias, trained.bias)
    assert loaded.training == trained.training and loaded.training["steps"] == 60 and loaded.training["split"] == "train"
    assert loaded.model["d_model"] == 32 and loaded.model["n_layers"] == 3 and loaded.model["model_type"] == "gpt_neox"
    before = evaluate_lens(gpt_neox, corpus, trained, ctx=CTX, n_contexts=6, batch_size=3)
    assert evaluate_lens(gpt_neox, corpus, loaded, ctx=CTX, n_contexts=6, batch_size=3) == before

    wider = random_gpt_neox(hidden_size=48)
    with pytest.raises(LmscopeError, match="d_model=32 and 3 layers, but the model has d_model=48 and 3 layers"):
        evaluate_lens(wider, corpus, loaded, ctx=CTX, n_contexts=2)
    two_layer_lens = TunedLens(loaded.weight[:1], loaded.bias[:1])
    with pytest.raises(LmscopeError, match="d_model=32 and 2 layers, but the model has d_model=32 and 3 layers"):
        evaluate_lens(gpt_neox, corpus, two_layer_lens, ctx=CTX, n_contexts=2)


def test_result_rows_are_tuned_lens_rows(trained: TunedLens, gpt_neox: HookedModel, corpus: TokenizedCorpus) -> None:
    layers = evaluate_lens(gpt_neox, corpus, trained, ctx=CTX, n_contexts=4)
    rows = result_rows(layers, model="tiny", step=0)
    assert len(rows) == 2 * gpt_neox.n_layers and {r["lens"] for r in rows} == {"tuned"}
    assert {r["metric"] for r in rows} == {"lens_cross_entropy", "lens_kl"}
    table = results_table(rows)
    assert {"layer", "lens", "positions"} <= set(table.column_names) and table.num_rows == len(rows)


def test_bad_input(gpt_neox: HookedModel, corpus: TokenizedCorpus, tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="ctx=1: .* pass ctx >= 2"):
        train_tuned_lens(gpt_neox, corpus, ctx=1)
    with pytest.raises(LmscopeError, match="ctx=65 is longer than the model's context of 64 tokens; pass ctx <= 64"):
        train_tuned_lens(gpt_neox, corpus, ctx=65)
    with pytest.raises(LmscopeError, match="ctx=65 is longer than the model's context of 64 tokens"):
        evaluate_lens(gpt_neox, corpus, None, ctx=65)
    with pytest.raises(LmscopeError, match="no train document has 1000 tokens; pass a smaller ctx"):
        train_tuned_lens(random_gpt_neox(max_positions=1024), corpus, ctx=1000)
    with pytest.raises(LmscopeError, match="steps=-1: pass steps >= 0"):
        train_tuned_lens(gpt_neox, corpus, ctx=CTX, steps=-1)
    with pytest.raises(LmscopeError, match="lr=0.0: pass a positive"):
        train_tuned_lens(gpt_neox, corpus, ctx=CTX, lr=0.0)
    with pytest.raises(LmscopeError, match="tokens_per_step=0: pass a positive tokens_per_step"):
        train_tuned_lens(gpt_neox, corpus, ctx=CTX, tokens_per_step=0)
    with pytest.raises(LmscopeError, match="ctx=1, n_contexts=4, batch_size=4: need ctx >= 2"):
        evaluate_lens(gpt_neox, corpus, None, ctx=1, n_contexts=4)
    with pytest.raises(LmscopeError, match="does not exist; train one"):
        TunedLens.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 4, 4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LmscopeError, match="is not a tuned lens"):
        TunedLens.load(tmp_path / "other.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LmscopeError, match="is not a readable tuned-lens file"):
        TunedLens.load(tmp_path / "garbage.safetensors")
    with pytest.raises(LmscopeError, match="do not fit together"):
        TunedLens(torch.zeros(2, 4, 4), torch.zeros(2, 5))
