"""Influence functions checked against independent truth: closed-form Fisher blocks, brute-force gradients, kronfluence.

The model is a tiny random GPT-NeoX (hidden 8) so that every layer's exact Fisher block fits in a dense
matrix. Truth is computed here with plain autograd on the layers' parameters (one backward pass per row,
or per row, position and label), never through lmscope's hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from influence_reference import kronfluence_scores
from lmscope.errors import LmscopeError
from lmscope.influence.factors import Factors, FactorSettings, fit_factors
from lmscope.influence.objectives import query_batch
from lmscope.influence.precondition import Preconditioner, parse_damping
from lmscope.influence.scores import prepare_queries, score_batch, score_rows
from lmscope.influence.taps import tracked_linears

VOCAB = 16
QUERIES = [([1, 2, 3, 4], [5, 6, 7]), ([9, 8, 7], [6, 5]), ([3], [3, 3, 12, 1])]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    pass


def tiny_neox(hidden: int = 8, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                        intermediate_size=4 * hidden, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def rows_of(n: int, length: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, length))


# -- brute force -----------------------------------------------------------------------------------


def layer_gradient(module: torch.nn.Linear, grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[O, I(+1)]`` from autograd's weight (and bias) gradient."""
    weight = grads[0]
    return torch.cat([weight, grads[1][:, None]], dim=1).double() if module.bias is not None else weight.double()


def brute_gradients(model: torch.nn.Module, modules: dict, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row ``{layer: [N, O, I]}`` gradients of each row's summed masked NLL, one autograd call per row."""
    out = {name: [] for name in modules}
    for n in range(inputs.shape[0]):
        logits = model(input_ids=inputs[n : n + 1]).logits.float()[0]
        loss = (F.cross_entropy(logits, targets[n], reduction="none") * mask[n]).sum()
        params = [p for m in modules.values() for p in ([m.weight, m.bias] if m.bias is not None else [m.weight])]
        grads = list(torch.autograd.grad(loss, params))
        for name, module in modules.items():
            k = 2 if module.bias is not None else 1
            out[name].append(layer_gradient(module, tuple(grads[:k])))
            grads = grads[k:]
    return {name: torch.stack(g) for name, g in out.items()}


def train_gradients(model: torch.nn.Module, modules: dict, rows: np.ndarray) -> dict[str, torch.Tensor]:
    t = torch.as_tensor(rows).long()
    return brute_gradients(model, modules, t[:, :-1], t[:, 1:], torch.ones(t.shape[0], t.shape[1] - 1))


def query_gradients(model: torch.nn.Module, modules: dict, queries: list) -> dict[str, torch.Tensor]:
    batch = query_batch(queries)
    return brute_gradients(model, modules, batch.inputs, batch.targets, batch.mask.float())


def linear_inputs_and_output_grads(model: torch.nn.Module, modules: dict, rows: torch.Tensor) -> tuple[dict, dict]:
    """Each layer's input and its output (with ``.grad``: the gradient of the rows' summed loss), by plain hooks and ``retain_grad``."""
    inputs, outputs = {}, {}

    def keep(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
            output.retain_grad()
            outputs[name] = output
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    logits = model(input_ids=rows[:, :-1]).logits.float()
    F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="sum").backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    return inputs, outputs


def block_fisher(grads: torch.Tensor) -> torch.Tensor:
    """``[O·I, O·I]``: the per-sequence Fisher ``mean_n vec(G_n) vec(G_n)^T`` (row-major vec)."""
    flat = grads.reshape(grads.shape[0], -1)
    return flat.T @ flat / grads.shape[0]


def approximate_fisher(factors: Factors, name: str) -> torch.Tensor:
    """The strategy's ``F̂`` as a dense matrix, built from the stored factors by Kronecker products (not by lmscope's rotation code)."""
    layer = factors.layers[name]
    strategy = factors.settings.strategy
    if strategy == "diagonal":
        return torch.diag(layer.lambda_matrix.reshape(-1))
    q = torch.kron(layer.gradient_eigenvectors, layer.activation_eigenvectors)  # row-major vec: S-side ⊗ A-side
    if strategy == "kfac":
        values = torch.outer(layer.gradient_eigenvalues, layer.activation_eigenvalues)
    else:
        values = layer.lambda_matrix
    return q @ torch.diag(values.reshape(-1)) @ q.T


# -- tests -----------------------------------------------------------------------------------------


def test_tracked_linears_by_selection() -> None:
    model = tiny_neox()
    blocks = tracked_linears(model, "blocks")
    assert list(blocks) == [f"gpt_neox.layers.{i}.{m}" for i in range(2) for m in
                            ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
    assert list(tracked_linears(model, "mlp")) == [n for n in blocks if ".mlp." in n]
    assert list(tracked_linears(model, "attention")) == [n for n in blocks if ".attention." in n]
    assert list(tracked_linears(model, "all")) == list(blocks) + ["lm_head"]
    with pytest.raises(LmscopeError, match="module selection 'heads' is unknown"):
        tracked_linears(model, "heads")


def test_identity_scores_are_exact_gradient_dot_products() -> None:
    model, rows = tiny_neox(), rows_of(12)
    modules = tracked_linears(model)
    factors = fit_factors(model, rows, FactorSettings(strategy="identity"))
    prepared = prepare_queries(model, modules, query_batch(QUERIES), Preconditioner(factors))
    ours = score_rows(model, modules, prepared, rows, batch_size=5)
    g_train, g_query = train_gradients(model, modules, rows), query_gradients(model, modules, QUERIES)
    truth = sum(torch.einsum("qoi,noi->qn", g_query[n], g_train[n]) for n in modules).numpy()
    np.testing.assert_allclose(ours, truth, rtol=1e-5, atol=1e-6 * np.abs(truth).max())
    # the measurement is the completion's loss −log p(c | p)
    batch = query_batch(QUERIES)
    logits = model(input_ids=batch.inputs).logits.float()
    nll = (F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none") * batch.mask).sum(1)
    torch.testing.assert_close(prepared.measurements.cpu(), nll.detach(), rtol=1e-6, atol=1e-6)


def test_factors_equal_their_closed_forms_on_the_same_targets() -> None:
    """Empirical Fisher (data targets): covariances, EK-FAC's eigenvalues and the diagonal, against brute force."""
    model, rows = tiny_neox(), rows_of(10)
    modules = tracked_linears(model)
    g = train_gradients(model, modules, rows)
    ekfac = fit_factors(model, rows, FactorSettings(strategy="ekfac", fisher="empirical", batch_size=3))
    diagonal = fit_factors(model, rows, FactorSettings(strategy="diagonal", fisher="empirical", batch_size=4))
    assert ekfac.n_sequences == 10 and ekfac.n_tokens == 10 * 8
    # covariances: inputs and output gradients captured here with plain hooks and retain_grad
    t = torch.as_tensor(rows).long()
    inputs, outputs = linear_inputs_and_output_grads(model, modules, t)
    for name in modules:
        a = torch.cat([inputs[name], torch.ones(*inputs[name].shape[:-1], 1)], -1).reshape(-1, inputs[name].shape[-1] + 1).double()
        s = outputs[name].grad.reshape(-1, outputs[name].shape[-1]).double()
        layer = ekfac.layers[name]
        torch.testing.assert_close(layer.activation_covariance, a.T @ a / a.shape[0], rtol=1e-5, atol=1e-6 * float((a.T @ a).abs().max() / a.shape[0]))
        torch.testing.assert_close(layer.gradient_covariance, s.T @ s / s.shape[0], rtol=1e-5, atol=1e-7 * float((s.T @ s).abs().max() / s.shape[0]))
        q_a, q_s = layer.activation_eigenvectors, layer.gradient_eigenvectors
        torch.testing.assert_close(q_a @ torch.diag(layer.activation_eigenvalues) @ q_a.T, layer.activation_covariance, rtol=1e-9, atol=1e-12)
        rotated = q_s.T @ g[name] @ q_a
        close = dict(rtol=1e-4, atol=1e-6 * float(g[name].square().mean(0).max()))  # float32 gradients
        torch.testing.assert_close(layer.lambda_matrix, rotated.square().mean(0), **close)
        torch.testing.assert_close(diagonal.layers[name].lambda_matrix, g[name].square().mean(0), **close)
        # EK-FAC's eigenvalues are the best diagonal in its basis: closer to the block Fisher than K-FAC's (Frobenius)
        fisher = block_fisher(g[name])
        kfac_values = torch.outer(layer.gradient_eigenvalues, layer.activation_eigenvalues) * 8
        q = torch.kron(q_s, q_a)
        err_ekfac = torch.linalg.norm(fisher - q @ torch.diag(layer.lambda_matrix.reshape(-1)) @ q.T)
        err_kfac = torch.linalg.norm(fisher - q @ torch.diag(kfac_values.reshape(-1)) @ q.T)
        assert err_ekfac <= err_kfac * (1 + 1e-9)
        torch.testing.assert_close(layer.lambda_matrix.reshape(-1), torch.diagonal(q.T @ fisher @ q), **close)


def test_sampled_fisher_converges_to_the_expected_fisher() -> None:
    """The true Fisher in closed form, Σ_t Σ_y p_t(y) vec(∇ −log p_t(y)) vec(·)^T, against targets sampled by the fit."""
    model = tiny_neox(hidden=4, layers=1)
    modules = tracked_linears(model, "mlp")
    base = rows_of(2, length=5, seed=3)
    t = torch.as_tensor(base).long()
    exact = {name: 0.0 for name in modules}
    for n in range(t.shape[0]):
        probs = torch.softmax(model(input_ids=t[n : n + 1, :-1]).logits.float()[0], -1).detach()
        for pos in range(t.shape[1] - 1):
            for y in range(VOCAB):
                logits = model(input_ids=t[n : n + 1, :-1]).logits.float()[0]
                loss = F.cross_entropy(logits[pos : pos + 1], torch.tensor([y]))
                for name, module in modules.items():
                    grad = layer_gradient(module, torch.autograd.grad(loss, [module.weight, module.bias], retain_graph=True)).reshape(-1)
                    exact[name] = exact[name] + probs[pos, y].double() * torch.outer(grad, grad)
    repeats = 300
    sampled = fit_factors(model, np.repeat(base, repeats, axis=0), FactorSettings(strategy="diagonal", fisher="sampled", batch_size=60, seed=1))
    for name in modules:
        truth = torch.diagonal(exact[name] / t.shape[0])
        got = sampled.layers[name].lambda_matrix.reshape(-1)
        rel = float(torch.linalg.norm(got - truth) / torch.linalg.norm(truth))
        assert rel < 0.12, (name, rel)  # Monte Carlo error of 600 draws per position (deterministic seed)
    empirical = fit_factors(model, np.repeat(base, repeats, axis=0), FactorSettings(strategy="diagonal", fisher="empirical", batch_size=60))
    assert float(torch.linalg.norm(empirical.layers[name].lambda_matrix.reshape(-1) - truth) / torch.linalg.norm(truth)) > 0.2


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_scores_against_exact_block_diagonal_influence(strategy: str) -> None:
    r"""Exact damped block-diagonal influence Σ_l v_l^T (F_l + λ_l I)^{-1} G_l, with F_l the per-sequence Fisher, dense
    (for K-FAC, whose factors are per-token means as kronfluence's, the per-token Fisher F_l / T̄, T̄ = 8 targets per row).

    Bound, per layer (F, F̂ positive semi-definite, so ‖(F+λ)^{-1}‖ ≤ 1/λ):
    |s − ŝ| ≤ Σ_l ‖v_l‖ ‖G_l‖ ‖F_l − F̂_l‖₂ / λ_l².  The preconditioner itself must equal (F̂ + λ)^{-1} to rounding.
    """
    model, rows = tiny_neox(), rows_of(16)
    modules = tracked_linears(model)
    factors = fit_factors(model, rows, FactorSettings(strategy=strategy, fisher="empirical", batch_size=8))
    precond = Preconditioner(factors, "heuristic")
    prepared = prepare_queries(model, modules, query_batch(QUERIES), precond)
    ours = score_rows(model, modules, prepared, rows)
    g_train, g_query = train_gradients(model, modules, rows), query_gradients(model, modules, QUERIES)
    exact = np.zeros_like(ours)
    bound = np.zeros_like(ours)
    for name in modules:
        fisher = block_fisher(g_train[name]) / (rows.shape[1] - 1 if strategy == "kfac" else 1)
        f_hat = approximate_fisher(factors, name)
        lam = precond.damping_used[name]
        eye = torch.eye(fisher.shape[0], dtype=torch.float64)
        torch.testing.assert_close(precond.dense_inverse(name), torch.linalg.inv(f_hat + lam * eye), rtol=1e-6, atol=1e-6 / lam)
        v = g_query[name].reshape(len(QUERIES), -1)
        g = g_train[name].reshape(rows.shape[0], -1)
        exact += (v @ torch.linalg.solve(fisher + lam * eye, g.T)).numpy()
        spectral = float(torch.linalg.matrix_norm(fisher - f_hat, ord=2))
        bound += np.outer(v.norm(dim=1).numpy(), g.norm(dim=1).numpy()) * spectral / lam**2
    assert np.all(np.abs(ours - exact) <= bound * (1 + 1e-6) + 1e-9)
    # and the approximation is useful here, not just bounded
    assert min(np.corrcoef(ours[q], exact[q])[0, 1] for q in range(len(QUERIES))) > 0.5


def test_low_rank_queries_and_per_token_scores() -> None:
    model, rows = tiny_neox(), rows_of(8)
    modules = tracked_linears(model)
    factors = fit_factors(model, rows, FactorSettings(strategy="ekfac", fisher="empirical"))
    precond = Preconditioner(factors, "heuristic")
    dense = prepare_queries(model, modules, query_batch(QUERIES), precond)
    full = score_rows(model, modules, dense, rows)
    max_rank = max(min(shape) for shape in factors.shapes.values())
    np.testing.assert_allclose(score_rows(model, modules, prepare_queries(model, modules, query_batch(QUERIES), precond, rank=max_rank), rows),
                               full, rtol=1e-4, atol=1e-6 * np.abs(full).max())
    rank = 2
    low = score_rows(model, modules, prepare_queries(model, modules, query_batch(QUERIES), precond, rank=rank), rows)
    g_train = train_gradients(model, modules, rows)
    bound = np.zeros_like(full)  # |s − s_r| ≤ Σ_l ‖PV_l − (PV_l)_r‖_F ‖G_l‖_F (Eckart–Young, Cauchy–Schwarz)
    for name in modules:
        sigma = torch.linalg.svdvals(dense.dense[name].double())
        tail = sigma[:, rank:].square().sum(1).sqrt().numpy()
        bound += np.outer(tail, g_train[name].reshape(rows.shape[0], -1).norm(dim=1).numpy())
    assert np.all(np.abs(low - full) <= bound * (1 + 1e-4) + 1e-7)
    assert np.any(np.abs(low - full) > 1e-6 * np.abs(full).max())  # rank 2 is a real approximation here
    # per-token scores: sum to the sequence scores; each equals Σ_l g_t^T (P v) ā_t from autograd's per-position output gradients
    t = torch.as_tensor(rows).long()
    seq, tok = score_batch(model, modules, dense, t, per_token=True)
    np.testing.assert_allclose(tok.sum(2).numpy(), seq.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(seq.numpy(), full, rtol=1e-5, atol=1e-6 * np.abs(full).max())  # float32 sums in another order
    inputs, outputs = linear_inputs_and_output_grads(model, modules, t)
    truth = 0
    for name in modules:
        a = torch.cat([inputs[name], torch.ones(*inputs[name].shape[:-1], 1)], -1).double()
        truth = truth + torch.einsum("qoi,bto,bti->qbt", dense.dense[name].double(), outputs[name].grad.double(), a)
    np.testing.assert_allclose(tok.numpy(), truth.numpy(), rtol=1e-4, atol=1e-6 * float(truth.abs().max()))


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_scores_agree_with_kronfluence(strategy: str) -> None:
    """Same model, rows, queries, Fisher and damping as kronfluence 1.0.1: Pearson ≥ 0.99 (in fact ≈ 1)."""
    model, rows = tiny_neox(hidden=16), rows_of(24, length=13, seed=5)
    modules = tracked_linears(model)
    factors = fit_factors(model, rows, FactorSettings(strategy=strategy, fisher="empirical", batch_size=8))
    for damping in (1e-8, "heuristic"):
        ours = score_rows(model, modules, prepare_queries(model, modules, query_batch(QUERIES), Preconditioner(factors, damping)), rows)
        ref = kronfluence_scores(model, rows, QUERIES, list(modules), strategy=strategy, damping=None if damping == "heuristic" else damping,
                                 empirical_fisher=True)
        for q in range(len(QUERIES)):
            assert np.corrcoef(ours[q], ref[q])[0, 1] >= 0.99
        np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_fit_resumes_after_a_kill_with_identical_factors(tmp_path) -> None:
    model, rows = tiny_neox(), rows_of(20)
    settings = FactorSettings(strategy="ekfac", fisher="sampled", batch_size=3, seed=7)
    whole = fit_factors(model, rows, settings)

    class Killed(Exception):
        pass

    class DiesAfter:
        def __init__(self, data: np.ndarray, reads: int) -> None:
            self.data, self.reads, self.shape = data, reads, data.shape

        def __getitem__(self, index: slice) -> np.ndarray:
            self.reads -= 1
            if self.reads < 0:
                raise Killed
            return self.data[index]

    checkpoint = tmp_path / "fit.ckpt"
    for reads in (4, 9):  # killed in the first pass, then in the second
        with pytest.raises(Killed):
            fit_factors(model, DiesAfter(rows, reads), settings, checkpoint=checkpoint, checkpoint_seconds=0)
        assert checkpoint.is_file()
    resumed = fit_factors(model, rows, settings, checkpoint=checkpoint, checkpoint_seconds=0)
    assert not checkpoint.exists()
    for name, layer in whole.layers.items():
        for key, value in layer.tensors().items():
            torch.testing.assert_close(getattr(resumed.layers[name], key), value, rtol=0, atol=0)
    whole.save(tmp_path / "factors")
    loaded = Factors.load(tmp_path / "factors")
    assert loaded.settings == settings and loaded.n_tokens == whole.n_tokens and loaded.shapes == whole.shapes
    for name, layer in whole.layers.items():
        for key, value in layer.tensors().items():
            torch.testing.assert_close(getattr(loaded.layers[name], key), value, rtol=0, atol=0)
    with pytest.raises(Killed):  # a checkpoint left by a killed fit is not used by a fit with other settings
        fit_factors(model, DiesAfter(rows, 2), settings, checkpoint=checkpoint, checkpoint_seconds=0)
    with pytest.raises(LmscopeError, match="is of another fit"):
        fit_factors(model, rows, FactorSettings(strategy="kfac"), checkpoint=checkpoint)


def test_bad_input_is_refused(tmp_path) -> None:
    model = tiny_neox()
    with pytest.raises(LmscopeError, match="influence strategy 'lissa' is unknown"):
        FactorSettings(strategy="lissa")
    with pytest.raises(LmscopeError, match="fisher 'true' is unknown"):
        FactorSettings(fisher="true")
    with pytest.raises(LmscopeError, match="neither a number nor 'heuristic'"):
        parse_damping("lots")
    with pytest.raises(LmscopeError, match="must be a non-negative number"):
        parse_damping(-1.0)
    with pytest.raises(LmscopeError, match="completion is empty"):
        query_batch([([1, 2], [])])
    with pytest.raises(LmscopeError, match="prompt is empty"):
        query_batch([([], [1])])
    with pytest.raises(LmscopeError, match="no training rows"):
        fit_factors(model, np.zeros((0, 5), dtype=np.int64), FactorSettings())
    with pytest.raises(LmscopeError, match="holds no influence factors"):
        Factors.load(tmp_path)
    factors = fit_factors(model, rows_of(4), FactorSettings(strategy="diagonal", fisher="empirical"))
    with pytest.raises(LmscopeError, match="query rank 0 must be a positive integer"):
        prepare_queries(model, tracked_linears(model), query_batch(QUERIES), Preconditioner(factors), rank=0)
    with pytest.raises(LmscopeError, match="damping is 0"):
        zero = fit_factors(model, np.zeros((2, 5), dtype=np.int64), FactorSettings(strategy="diagonal", fisher="empirical"))
        zero.layers[next(iter(zero.layers))].lambda_matrix[0, 0] = 0.0
        Preconditioner(zero, 0.0)
