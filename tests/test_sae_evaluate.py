"""SAE evaluation against independent truths.

- Reconstruction statistics against a brute-force numpy computation on a hand-made toy, and on a
  real activation store against the same brute force on rows picked by their stored positions.
- Splicing against closed forms — an SAE built to reconstruct exactly (ReLU(x) − ReLU(−x) = x)
  changes nothing; one that outputs zeros is the zero ablation; one that outputs the mean (computed
  here from HF hidden states) is the mean ablation — and against HF itself: the same SAE or
  transcoder spliced with a plain PyTorch forward hook on the HF module, scored with HF's own loss.
  A sign-flipped exact SAE must change the loss, so a splice that never fired cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_fixtures import tiny_tokenized_corpus
from lmscope.activations import ActivationStore, iter_contexts, write_activations
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.models.hooks import HookedModel
from lmscope.results.schema import results_table
from lmscope.sae.evaluate import DENSITY_EDGES, SplicedMetrics, reconstruction_metrics, result_rows, spliced_metrics
from lmscope.sae.model import SaeShape, SparseAutoencoder, fold_scales
from tiny_models import tiny_model

VOCAB, D_MODEL, CTX, N_CONTEXTS = 400, 32, 16, 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """This module runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> TokenizedCorpus:
    root = tmp_path_factory.mktemp("sae_eval")
    return tiny_tokenized_corpus(root, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {label: tiny_model(label, vocab_size=VOCAB) for label in ("gpt_neox", "llama")}


def _contexts(corpus: TokenizedCorpus, ctx: int = CTX, n: int = N_CONTEXTS) -> torch.Tensor:
    """The evaluated contexts, picked independently: first ``ctx`` tokens of held-out documents that long."""
    docs = [corpus.document_tokens(d) for d in corpus.select(split="heldout").tolist()]
    return torch.tensor([list(map(int, doc[:ctx])) for doc in docs if len(doc) >= ctx][:n])


def _exact_sae(d: int, hook: str, *, out_hook: str | None = None, scale: float = 1.0, sign: float = 1.0) -> SparseAutoencoder:
    """A ReLU SAE of width 2d with W_enc = [I, -I], W_dec = [I; -I], zero biases: ReLU(x) - ReLU(-x) = x exactly."""
    sae = SparseAutoencoder(SaeShape(d_in=d, width=2 * d, arch="relu", hook=hook, out_hook=out_hook))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(sign * torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.input_scale.fill_(scale)  # a power of two keeps the round trip exact
        sae.output_scale.fill_(scale)
    return sae


def _random_sae(shape: SaeShape, seed: int, scale: float = 1.0) -> SparseAutoencoder:
    sae = SparseAutoencoder(shape, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(shape.width, generator=generator))
        sae.b_dec.copy_(0.1 * torch.randn(shape.output_dim, generator=generator))
        sae.input_scale.fill_(scale)
        sae.output_scale.fill_(scale if not shape.transcoder else 2 * scale)
    return sae


@contextmanager
def _hf_replace(module: torch.nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """A plain PyTorch forward hook on an HF module: its output becomes ``fn(module_input, module_output)``."""

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        x = args[0] if args else kwargs["hidden_states"]
        out = output if isinstance(output, torch.Tensor) else output[0]
        new = fn(x, out)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _keep_first(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def wrapped(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        new = fn(x, out).clone()
        new[:, 0] = out[:, 0]
        return new

    return wrapped


def _ce(logits: torch.Tensor, ids: torch.Tensor, first: int) -> float:
    """Mean next-token cross-entropy of the predictions made at positions ``first … ctx-2``."""
    return F.cross_entropy(logits[:, first:-1].double().reshape(-1, logits.shape[-1]), ids[:, first + 1 :].reshape(-1)).item()


def _kl(clean: torch.Tensor, other: torch.Tensor, first: int) -> float:
    p, q = (torch.log_softmax(t[:, first:-1].double(), -1) for t in (clean, other))
    return (p.exp() * (p - q)).sum(-1).mean().item()


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers


# -- reconstruction ------------------------------------------------------------------------------

TOY_X = np.array([[1, 2, -1], [2, -1, -1], [3, 1, -2], [1, -1, 1], [2, 2, -1], [1, -3, -1]], dtype=np.float64)


def _toy_sae() -> SparseAutoencoder:
    """Feature i < 3 reads x_i; feature 3 never fires (bias -100). Densities 1, 1/2, 1/6, 0."""
    sae = SparseAutoencoder(SaeShape(d_in=3, width=4, arch="relu"), dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0, 0, -100]))
        sae.W_dec.copy_(torch.tensor([[0.9, 0.1, 0], [0, 1.1, 0], [0.2, 0, 0.7], [1, 1, 1]]))
        sae.b_dec.zero_()
    return sae


def test_toy_statistics_match_a_numpy_brute_force() -> None:
    sae = _toy_sae()
    f = np.maximum(TOY_X @ sae.W_enc.detach().numpy() + sae.b_enc.detach().numpy(), 0)
    x_hat = f @ sae.W_dec.detach().numpy()
    sse = ((TOY_X - x_hat) ** 2).sum()
    fired = f > 0
    density = fired.mean(0)
    assert density.tolist() == pytest.approx([1, 0.5, 1 / 6, 0])  # the toy is what its docstring says
    x = torch.from_numpy(TOY_X)
    for batches, batch_size in (([x], 4096), ([x[:2], x[2:]], 4096), ([x], 1), (x, 4)):
        m = reconstruction_metrics(sae, batches, batch_size=batch_size)
        assert m.rows == 6
        assert m.mse == pytest.approx(sse / 6, rel=1e-12)
        assert m.fvu == pytest.approx(sse / ((TOY_X - TOY_X.mean(0)) ** 2).sum(), rel=1e-12)
        assert m.l0 == pytest.approx(fired.sum() / 6, rel=1e-12)
        assert m.firing_counts.tolist() == fired.sum(0).tolist()
        assert np.allclose(m.density, density)
        assert m.dead_features == 1 and m.dead_fraction == 0.25
        assert m.dense_features == 3  # density > 0.1
    # Dense threshold, dead window and max_rows, by hand.
    assert reconstruction_metrics(sae, [x], dense_threshold=0.5).dense_features == 1  # only density 1 (0.5 is not > 0.5)
    # Feature 2 last fired on row 3, two rows before the end; feature 1 on row 4.
    for batch_size in (1, 4, 4096):
        assert reconstruction_metrics(sae, [x], dead_window=2, batch_size=batch_size).dead_features == 2
        assert reconstruction_metrics(sae, [x], dead_window=3, batch_size=batch_size).dead_features == 1
        assert reconstruction_metrics(sae, [x], dead_window=100, batch_size=batch_size).dead_features == 1  # longer than the rows
    head = reconstruction_metrics(sae, [x[:2], x[2:]], max_rows=3)
    assert head.rows == 3 and head.firing_counts.tolist() == fired[:3].sum(0).tolist()
    # Histogram: each feature that fired sits in the bin whose edges hold its log10 density; the dead one is nowhere.
    m = reconstruction_metrics(sae, [x])
    expected = np.zeros(len(DENSITY_EDGES) - 1, dtype=np.int64)
    for value in np.log10(density[density > 0]):
        expected[min(int(np.searchsorted(DENSITY_EDGES, value, side="right")) - 1, len(expected) - 1)] += 1
    assert m.histogram_counts.tolist() == expected.tolist() and expected.sum() == 3 and expected[-1] == 1
    summary = m.to_dict()
    assert summary["dead_features"] == 1 and summary["density_histogram"]["counts"] == expected.tolist()
    assert "firing_counts" not in summary and m.to_dict(per_feature=True)["firing_counts"] == [6, 3, 1, 0]


def test_topk_l0_is_exactly_k_when_every_pre_activation_is_positive(corpus: TokenizedCorpus, models: dict) -> None:
    sae = SparseAutoencoder(SaeShape(d_in=D_MODEL, width=48, arch="topk", k=5, hook="blocks.0.hook_resid_post"), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)
    x = torch.randn(200, D_MODEL, generator=torch.Generator().manual_seed(0))
    assert bool((sae.pre_acts(x) > 0).all())
    assert reconstruction_metrics(sae, [x], batch_size=64).l0 == 5.0
    spliced = spliced_metrics(HookedModel(models["gpt_neox"]), sae, corpus, ctx=CTX, n_contexts=2)
    assert spliced.l0 == 5.0


def test_scales_are_applied_like_folding_them_into_the_weights() -> None:
    sae = _random_sae(SaeShape(d_in=D_MODEL, width=64, arch="relu"), seed=4, scale=0.37)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # thresholds make the input scale matter for which features fire
    x = torch.randn(300, D_MODEL, generator=torch.Generator().manual_seed(1)) * 3
    scaled = reconstruction_metrics(sae, [x])
    folded = reconstruction_metrics(fold_scales(sae), [x])
    assert scaled.firing_counts.tolist() == folded.firing_counts.tolist()
    assert scaled.mse == pytest.approx(folded.mse, rel=1e-5) and scaled.fvu == pytest.approx(folded.fvu, rel=1e-5)
    with torch.no_grad():
        sae.input_scale.fill_(1.0)
        sae.output_scale.fill_(1.0)
    assert reconstruction_metrics(sae, [x]).l0 != scaled.l0  # anti-tautology: ignoring the scale would show


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    """Rows of two made-up hooks: 'resid' (6 values) and a transcoder target 'mlp' (4 values); every context opens with BOS."""
    table = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mix = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))

    def capture(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        resid = table[ids] + torch.arange(ids.shape[1], dtype=torch.float32)[None, :, None]
        return {"blocks.0.hook_resid_pre": resid, "blocks.0.hook_mlp_out": torch.tanh(resid @ mix)}

    rng = np.random.default_rng(3)
    documents = [(i, rng.integers(2, 50, size=int(rng.integers(3, 30)))) for i in range(60)]
    out = tmp_path_factory.mktemp("store") / "store"
    contexts = iter_contexts(documents, 8, 400, bos_token_id=1)
    write_activations(capture, contexts, ["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out"], out, batch_size=5, shard_tokens=64)
    return ActivationStore.open(out)


def test_store_rows_skip_context_openers_and_match_brute_force(store: ActivationStore) -> None:
    x_all = store.rows("blocks.0.hook_resid_pre", slice(None)).double()
    y_all = store.rows("blocks.0.hook_mlp_out", slice(None)).double()
    not_bos = store.metadata["position"] != -1  # every context opens with BOS, so this picks the same rows
    assert 0 < (~not_bos).sum() < len(not_bos)
    sae = _random_sae(SaeShape(d_in=6, width=20, arch="relu", hook="blocks.0.hook_resid_pre"), seed=5).double()
    transcoder = _random_sae(SaeShape(d_in=6, width=20, arch="topk", k=3, hook="blocks.0.hook_resid_pre",
                                      out_hook="blocks.0.hook_mlp_out", d_out=4), seed=6, scale=0.5).double()
    for model, targets in ((sae, x_all), (transcoder, y_all)):
        for include_first, mask in ((False, not_bos), (True, np.ones_like(not_bos))):
            rows = torch.from_numpy(mask)
            x, y = x_all[rows], targets[rows]
            with torch.no_grad():
                y_hat = model.forward_raw(x)
                fired = model.encode(x * model.input_scale) > 0
            sse = (y - y_hat).pow(2).sum().item()
            for batch_size in (7, 4096):
                m = reconstruction_metrics(model, store, batch_size=batch_size, include_first=include_first)
                assert m.rows == int(mask.sum()) and m.include_first is include_first
                assert m.mse == pytest.approx(sse / len(x), rel=1e-9)
                assert m.fvu == pytest.approx(sse / (y - y.mean(0)).pow(2).sum().item(), rel=1e-9)
                assert m.firing_counts.tolist() == fired.sum(0).tolist()
                assert m.hook == "blocks.0.hook_resid_pre" and m.out_hook == model.shape.out_hook
        head = reconstruction_metrics(model, store, max_rows=50, batch_size=16)
        with torch.no_grad():
            first50 = torch.from_numpy(np.nonzero(not_bos)[0][:50])
            assert head.rows == 50
            assert head.mse == pytest.approx((targets[first50] - model.forward_raw(x_all[first50])).pow(2).sum().item() / 50, rel=1e-9)


# -- splicing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "hook"), [("gpt_neox", "blocks.0.hook_resid_post"), ("llama", "blocks.1.hook_mlp_out"),
                                             ("llama", "blocks.0.attn.hook_z")])
def test_exactly_reconstructing_sae_changes_nothing(label: str, hook: str, corpus: TokenizedCorpus, models: dict) -> None:
    hooked = HookedModel(models[label])
    sae = _exact_sae(D_MODEL, hook, scale=4.0)
    m = spliced_metrics(hooked, sae, corpus, ctx=CTX, n_contexts=N_CONTEXTS, batch_size=2)
    ids = _contexts(corpus)
    with torch.no_grad():
        clean_logits = models[label](ids).logits
    assert m.contexts == N_CONTEXTS and m.predictions == N_CONTEXTS * (CTX - 2)
    assert m.ce_clean == pytest.approx(_ce(clean_logits, ids, 1), rel=1e-6)
    assert abs(m.ce_spliced - m.ce_clean) <= 1e-6 and abs(m.delta_ce) <= 1e-6
    assert abs(m.ce_recovered_zero - 1) <= 1e-6 and abs(m.ce_recovered_mean - 1) <= 1e-5
    assert abs(m.kl) <= 1e-9
    assert abs(m.ce_zero - m.ce_clean) > 1e-5  # the ablation really ablates (a random model may even improve)
    # The same SAE on the hook's rows reconstructs them exactly.
    _, cache = hooked.run_with_cache(ids, [hook], need_logits=False)
    rows = cache[hook].reshape(-1, D_MODEL)
    r = reconstruction_metrics(sae, [rows])
    assert r.mse <= 1e-12 and r.fvu <= 1e-12 and r.l0 == D_MODEL  # x_i > 0 fires feature i, x_i < 0 feature d + i
    assert (r.firing_counts[:D_MODEL] + r.firing_counts[D_MODEL:]).tolist() == [r.rows] * D_MODEL
    # Anti-tautology: the sign-flipped SAE (output -x) must move the loss, so the splice did fire.
    flipped = spliced_metrics(hooked, _exact_sae(D_MODEL, hook, sign=-1.0), corpus, ctx=CTX, n_contexts=N_CONTEXTS)
    assert abs(flipped.ce_spliced - flipped.ce_clean) > 1e-5 and flipped.kl > 1e-6  # the exact SAE's KL is 0


def test_zero_output_sae_is_zero_ablation_and_mean_output_sae_is_mean_ablation(corpus: TokenizedCorpus, models: dict) -> None:
    model = models["gpt_neox"]
    hooked = HookedModel(model)
    hook = "blocks.0.hook_resid_post"
    zero_sae = _random_sae(SaeShape(d_in=D_MODEL, width=64, arch="relu", hook=hook), seed=7)
    with torch.no_grad():
        zero_sae.W_dec.zero_()
        zero_sae.b_dec.zero_()
    m = spliced_metrics(hooked, zero_sae, corpus, ctx=CTX, n_contexts=N_CONTEXTS)
    assert m.ce_spliced == pytest.approx(m.ce_zero, abs=1e-9) and m.ce_recovered_zero == pytest.approx(0.0, abs=1e-9)
    assert m.kl > 1e-4
    # The mean of the hook over positions 1..ctx-1, from HF's hidden states (layer 0's output).
    ids = _contexts(corpus)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
    mean = hidden[:, 1:].double().reshape(-1, D_MODEL).mean(0)
    mean_sae = _random_sae(SaeShape(d_in=D_MODEL, width=64, arch="relu", hook=hook), seed=8)
    with torch.no_grad():
        mean_sae.W_dec.zero_()
        mean_sae.b_dec.copy_(mean.float())
    m = spliced_metrics(hooked, mean_sae, corpus, ctx=CTX, n_contexts=N_CONTEXTS)
    assert m.ce_spliced == pytest.approx(m.ce_mean, abs=1e-5) and abs(m.ce_recovered_mean) <= 1e-3
    given = spliced_metrics(hooked, mean_sae, corpus, ctx=CTX, n_contexts=N_CONTEXTS, mean_activation=mean.float())
    assert given.ce_mean == pytest.approx(m.ce_mean, abs=1e-6)
    zeros = spliced_metrics(hooked, mean_sae, corpus, ctx=CTX, n_contexts=N_CONTEXTS, mean_activation=torch.zeros(D_MODEL))
    assert zeros.ce_mean == pytest.approx(zeros.ce_zero, abs=1e-9)


@pytest.mark.parametrize(("label", "module_path", "hook"), [("gpt_neox", "gpt_neox.layers.1", "blocks.1.hook_resid_post"),
                                                            ("llama", "model.layers.0.mlp", "blocks.0.hook_mlp_out")])
def test_spliced_loss_matches_a_plain_forward_hook_and_hf_loss(label: str, module_path: str, hook: str,
                                                                corpus: TokenizedCorpus, models: dict) -> None:
    model = models[label]
    hooked = HookedModel(model)
    sae = _random_sae(SaeShape(d_in=D_MODEL, width=64, arch="topk", k=8, hook=hook), seed=9, scale=0.7)
    module = model.get_submodule(module_path)
    ids = _contexts(corpus)
    splice = lambda x, out: sae.forward_raw(out)  # noqa: E731
    zero = lambda x, out: torch.zeros_like(out)  # noqa: E731
    with torch.no_grad():
        clean = model(ids, labels=ids)
        with _hf_replace(module, splice):
            everywhere = model(ids, labels=ids)
        with _hf_replace(module, zero):
            zeroed = model(ids, labels=ids)
        with _hf_replace(module, _keep_first(splice)):
            after_first = model(ids).logits
        with _hf_replace(module, _keep_first(zero)):
            zeroed_after_first = model(ids).logits
    full = spliced_metrics(hooked, sae, corpus, ctx=CTX, n_contexts=N_CONTEXTS, include_first=True)
    assert full.predictions == N_CONTEXTS * (CTX - 1)
    assert full.ce_clean == pytest.approx(clean.loss.item(), rel=1e-6)
    assert full.ce_spliced == pytest.approx(everywhere.loss.item(), rel=1e-6)
    assert full.ce_zero == pytest.approx(zeroed.loss.item(), rel=1e-6)
    assert full.kl == pytest.approx(_kl(clean.logits, everywhere.logits, 0), rel=1e-5)
    assert abs(full.ce_spliced - full.ce_clean) > 1e-3  # a splice that did nothing would fail here
    default = spliced_metrics(hooked, sae, corpus, ctx=CTX, n_contexts=N_CONTEXTS)
    assert default.ce_clean == pytest.approx(_ce(clean.logits, ids, 1), rel=1e-6)
    assert default.ce_spliced == pytest.approx(_ce(after_first, ids, 1), rel=1e-6)
    assert default.ce_zero == pytest.approx(_ce(zeroed_after_first, ids, 1), rel=1e-6)
    assert default.kl == pytest.approx(_kl(clean.logits, after_first, 1), rel=1e-5)
    gap = default.ce_zero - default.ce_clean
    assert default.ce_recovered_zero == pytest.approx((default.ce_zero - default.ce_spliced) / gap, rel=1e-12)


def test_transcoder_splices_its_prediction_into_the_later_hook(corpus: TokenizedCorpus, models: dict) -> None:
    """A transcoder reading layer 1's input and predicting its output replaces the whole layer: check with an HF hook
    that computes ``forward_raw(layer input)`` as the layer's output. A zero transcoder is the zero ablation of out_hook."""
    model = models["llama"]
    hooked = HookedModel(model)
    transcoder = _random_sae(SaeShape(d_in=D_MODEL, width=64, arch="relu", hook="blocks.1.hook_resid_pre",
                                      out_hook="blocks.1.hook_resid_post"), seed=10, scale=0.5)
    layer = model.get_submodule("model.layers.1")
    ids = _contexts(corpus)
    predict = lambda x, out: transcoder.forward_raw(x)  # noqa: E731
    with torch.no_grad():
        clean = model(ids).logits
        with _hf_replace(layer, predict):
            everywhere = model(ids, labels=ids)
        with _hf_replace(layer, _keep_first(predict)):
            after_first = model(ids).logits
    full = spliced_metrics(hooked, transcoder, corpus, ctx=CTX, n_contexts=N_CONTEXTS, include_first=True, batch_size=3)
    assert full.out_hook == "blocks.1.hook_resid_post"
    assert full.ce_spliced == pytest.approx(everywhere.loss.item(), rel=1e-6)
    assert full.kl == pytest.approx(_kl(clean, everywhere.logits, 0), rel=1e-5) and full.kl > 1e-3
    default = spliced_metrics(hooked, transcoder, corpus, ctx=CTX, n_contexts=N_CONTEXTS, batch_size=3)
    assert default.ce_spliced == pytest.approx(_ce(after_first, ids, 1), rel=1e-6)

    zero = _random_sae(SaeShape(d_in=D_MODEL, width=64, arch="relu", hook="blocks.1.hook_resid_mid",
                                out_hook="blocks.1.hook_mlp_out"), seed=11)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    m = spliced_metrics(hooked, zero, corpus, ctx=CTX, n_contexts=N_CONTEXTS)
    assert m.ce_spliced == pytest.approx(m.ce_zero, abs=1e-9) and m.ce_recovered_zero == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        mlp_zeroed = model.get_submodule("model.layers.1.mlp")
        with _hf_replace(mlp_zeroed, _keep_first(lambda x, out: torch.zeros_like(out))):
            assert m.ce_zero == pytest.approx(_ce(model(ids).logits, ids, 1), rel=1e-6)


def test_batch_size_invariance_determinism_and_rows(corpus: TokenizedCorpus, models: dict) -> None:
    hooked = HookedModel(models["llama"])
    sae = _random_sae(SaeShape(d_in=D_MODEL, width=64, arch="jumprelu", hook="blocks.0.hook_resid_post"), seed=12)
    runs = [spliced_metrics(hooked, sae, corpus, ctx=CTX, n_contexts=N_CONTEXTS, batch_size=b) for b in (1, 5, 5)]
    assert runs[1] == runs[2]  # deterministic
    for name in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "delta_ce", "ce_recovered_zero", "ce_recovered_mean", "kl", "l0"):
        assert abs(getattr(runs[0], name) - getattr(runs[1], name)) <= 1e-5, name
    rec = reconstruction_metrics(sae, [torch.randn(50, D_MODEL, generator=torch.Generator().manual_seed(2))])
    rows = result_rows([rec, runs[0]], model="tiny", step=100, revision="step100")
    assert {r["metric"] for r in rows} == {
        "sae_mse", "sae_fvu", "sae_l0", "sae_dead_fraction", "sae_dense_fraction", "sae_ce_clean", "sae_ce_spliced",
        "sae_ce_zero", "sae_ce_mean", "sae_delta_ce", "sae_ce_recovered_zero", "sae_ce_recovered_mean", "sae_kl", "sae_spliced_l0"}
    assert all(r["hook"] == "blocks.0.hook_resid_post" and r["arch"] == "jumprelu" and r["width"] == 64 and r["k"] is None
               and r["step"] == 100 for r in rows)
    table = results_table(rows)
    assert table.num_rows == 14 and {"hook", "arch", "width", "k", "out_hook"} <= set(table.column_names)
    assert runs[0].to_dict()["kl"] == runs[0].kl
    undefined = SplicedMetrics(**{**runs[0].to_dict(), "ce_recovered_zero": None})
    assert "sae_ce_recovered_zero" not in {r["metric"] for r in result_rows(undefined, model="tiny")}


class _ShortCorpus:
    def select(self, split: str | None = None) -> np.ndarray:
        return np.arange(3)

    def document_tokens(self, index: int) -> np.ndarray:
        return np.arange(3, 13)


def test_bad_inputs_raise_one_sentence(corpus: TokenizedCorpus, models: dict, store: ActivationStore) -> None:
    hooked = HookedModel(models["llama"])
    good = SaeShape(d_in=D_MODEL, width=64, arch="relu", hook="blocks.0.hook_resid_post")

    def sae(**changes: object) -> SparseAutoencoder:
        return SparseAutoencoder(SaeShape(**{**good.to_dict(), **changes}))

    cases = [
        (lambda: spliced_metrics(hooked, sae(hook="blocks.9.hook_resid_post"), corpus, ctx=CTX), "unknown hook"),
        (lambda: spliced_metrics(hooked, sae(d_in=16), corpus, ctx=CTX), "has 32 values per position but the SAE's d_in is 16"),
        (lambda: spliced_metrics(hooked, sae(out_hook="blocks.1.hook_mlp_out", d_out=16), corpus, ctx=CTX), "d_out is 16"),
        (lambda: spliced_metrics(hooked, sae(), corpus, ctx=1000), "longer than the model's 64 positions"),
        (lambda: spliced_metrics(hooked, sae(), corpus, ctx=2), "need ctx >= 3"),
        (lambda: spliced_metrics(hooked, sae(), _ShortCorpus(), ctx=CTX), "no heldout document has 16 tokens"),
        (lambda: spliced_metrics(hooked, sae(hook=""), corpus, ctx=CTX), "names no hook"),
        (lambda: spliced_metrics(hooked, sae(hook="blocks.0.attn.hook_pattern"), corpus, ctx=CTX), "attention pattern"),
        (lambda: spliced_metrics(hooked, sae(hook="blocks.1.hook_resid_pre", out_hook="blocks.0.hook_mlp_out"), corpus, ctx=CTX),
         "does not come after"),
        (lambda: spliced_metrics(hooked, sae(), corpus, ctx=CTX, mean_activation=torch.zeros(5)), "mean_activation has 5 values"),
        (lambda: reconstruction_metrics(sae(hook="blocks.2.hook_mlp_out"), store), "not in the activation store"),
        (lambda: reconstruction_metrics(sae(hook="blocks.0.hook_resid_pre"), store), "6 values per row but the SAE's d_in is 32"),
        (lambda: reconstruction_metrics(sae(), store, hook="blocks.0.hook_resid_pre", out_hook="blocks.0.hook_mlp_out"),
         "not a transcoder"),
        (lambda: reconstruction_metrics(sae(out_hook="blocks.0.hook_mlp_out"), [torch.zeros(3, D_MODEL)]), "needs \\(input, target\\) pairs"),
        (lambda: reconstruction_metrics(sae(), [torch.zeros(3, 16)]), "does not fit the SAE's d_in 32"),
        (lambda: reconstruction_metrics(sae(), [(torch.zeros(3, D_MODEL), torch.zeros(2, D_MODEL))]), "does not match 3 rows"),
        (lambda: reconstruction_metrics(sae(), []), "no activation rows"),
        (lambda: reconstruction_metrics(sae(), [torch.zeros(3, D_MODEL)], max_rows=0), "max_rows=0"),
        (lambda: reconstruction_metrics(sae(), [torch.zeros(3, D_MODEL)], dense_threshold=2.0), "must lie in \\[0, 1\\]"),
        (lambda: reconstruction_metrics(sae(), 5), "cannot read activation rows from a int"),
        (lambda: result_rows(["nope"]), "takes ReconstructionMetrics or SplicedMetrics"),
    ]
    for call, message in cases:
        with pytest.raises(LmscopeError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
