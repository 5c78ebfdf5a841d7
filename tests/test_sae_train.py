"""SAE training against independent truths: a toy sparse generative model, hand-computed losses, STE calculus, resume.

The activation store holds a known sparse code: every token's ``resid`` row is
``Σ_{3 of 48} a_j · d_j + 0.3`` for unit ground-truth directions ``d_j`` and magnitudes
``a_j ∈ [0.5, 1.5)``, and ``out = resid @ M`` for a fixed matrix ``M`` (a transcoder target).
A TopK SAE must find the ``d_j``; everything else is checked against formulas computed here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lmscope.activations import ActivationStore, iter_contexts, write_activations
from lmscope.errors import LmscopeError
from lmscope.sae import losses
from lmscope.sae.model import SaeShape, SparseAutoencoder
from lmscope.sae.train import (
    CHECKPOINT_FILE,
    TRAIN_LOG_FILE,
    SaeTrainConfig,
    TrainPlan,
    batch_topk_pattern,
    fit_encoder_scale,
    learning_rate,
    per_row_pattern,
    plan_training,
    resample_dead_latents,
    sparse_decode,
    sparse_to_dense,
    step_losses,
    topk_pattern,
    trained_parameters,
    train_sae,
    _Run,
    _store_source,
)

D, N_TRUE, ACTIVE, VOCAB, ROWS, CTX, D_OUT = 32, 48, 3, 8192, 16384, 64, 12
_g = torch.Generator().manual_seed(0)
TRUE = torch.randn(N_TRUE, D, generator=_g)
TRUE /= TRUE.norm(dim=1, keepdim=True)
_codes = torch.zeros(VOCAB, N_TRUE).scatter_(
    1, torch.stack([torch.randperm(N_TRUE, generator=_g)[:ACTIVE] for _ in range(VOCAB)]),
    torch.rand(VOCAB, ACTIVE, generator=_g) + 0.5)
TABLE = _codes @ TRUE + 0.3
M = torch.randn(D, D_OUT, generator=_g) / D**0.5


def _capture(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    resid = TABLE[ids]
    return {"resid": resid, "out": resid @ M}


def _capture_out(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"out": TABLE[ids] @ M}


def _contexts():
    rng = np.random.default_rng(0)
    return iter_contexts([(i, rng.integers(0, VOCAB, size=CTX)) for i in range(ROWS // CTX)], CTX, ROWS)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """This module runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sae_train") / "store"
    write_activations(_capture, _contexts(), ["resid", "out"], out, batch_size=32, shard_tokens=2048)
    return out


@pytest.fixture(scope="module")
def store(store_dir: Path) -> ActivationStore:
    return ActivationStore.open(store_dir)


def _config(**overrides) -> SaeTrainConfig:
    base = dict(hook="resid", arch="topk", k=ACTIVE, width=96, batch_size=512, total_tokens=512 * 400, checkpoint_every=10_000)
    return SaeTrainConfig(**{**base, **overrides})


def _fvu(sae: SparseAutoencoder, store: ActivationStore, out_hook: str | None = None) -> float:
    """FVU of the returned (folded) SAE on every raw row of the store, computed here from the definition."""
    x = store.rows("resid", slice(None))
    y = x if out_hook is None else store.rows(out_hook, slice(None))
    with torch.no_grad():
        y_hat = sae(x)
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def _log(out_dir: Path) -> dict[str, list]:
    return pq.read_table(out_dir / TRAIN_LOG_FILE).to_pydict()


def _assert_same_weights(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# -- losses against hand computations -------------------------------------------------------------


def test_reconstruction_losses_are_the_formulas() -> None:
    y = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    y_hat = torch.tensor([[1.0, 1.0], [2.0, 6.0]])
    assert float(losses.reconstruction_mse(y_hat, y)) == pytest.approx((1 + 1) / 2)
    # mean row (2, 4): deviations (-1,-2), (1,2) → total variance 10
    assert float(losses.fvu(y_hat, y)) == pytest.approx(2 / 10)
    f = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    w_dec = torch.tensor([[2.0, 0.0], [3.0, 4.0], [0.0, 0.5]])  # row norms 2, 5, 0.5
    assert float(losses.l1_penalty(f, w_dec)) == pytest.approx(((1 * 2 + 2 * 0.5) + 3 * 5) / 2)


def test_auxk_is_zero_without_dead_latents_and_the_hand_value_with_them() -> None:
    pre = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.5, 4.0, -2.0, 1.5]], requires_grad=True)
    w_dec = torch.tensor([[5.0, 5.0], [7.0, -7.0], [1.0, 1.0], [0.0, 1.0]])
    e = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    none_dead = torch.zeros(4, dtype=torch.bool)
    assert float(losses.auxk_loss_dense(pre, none_dead, e, w_dec, k_aux=2)) == 0.0
    dead = torch.tensor([False, False, True, True])
    # row 0: dead pre-acts (2, -1) → latent 2 at 2 → ê = (2, 2); row 1: (-2, 1.5) → latent 3 at 1.5 → ê = (0, 1.5)
    # Σ‖e − ê‖² = 1 + 2.25; ē = (1, 2), Σ‖e − ē‖² = 4
    for k_aux in (1, 2, 5):  # the second choice is a negative pre-activation, ReLU'd to nothing
        loss = losses.auxk_loss_dense(pre, dead, e, w_dec, k_aux=k_aux)
        assert float(loss.detach()) == pytest.approx(3.25 / 4)
    loss.backward()
    # only the chosen dead latents learn: ∂L/∂pre = −2 (e − ê)·W_dec,i / 4
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, -0.75]]))
    assert losses.aux_latents(pre.detach(), dead, 1).tolist() == [[2], [3]]


def test_jumprelu_ste_gradients_match_the_hand_formula() -> None:
    eps = 0.1
    theta = torch.tensor([0.5, 1.0, 0.2], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.52, 0.3, 0.24], [0.46, 1.04, 0.1], [0.7, 0.96, 0.151]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 1.5, -1.0], [2.0, 1.0, 4.0]], dtype=torch.float64)
    (losses.jumprelu(x, theta, eps) * w).sum().backward()
    inside = ((x - theta).abs() < eps / 2).double()  # K((x − θ)/ε)
    assert torch.equal(x.grad, (x > theta).double() * w)
    torch.testing.assert_close(theta.grad, (-(theta / eps) * inside * w).sum(0).detach())
    # by hand: column 0 has rows 0 and 1 inside the window, column 1 rows 1 and 2, column 2 rows 0 and 2
    torch.testing.assert_close(theta.grad, torch.tensor([-5 * (1 + 0.5), -10 * (1.5 + 1), -2 * (3 + 4)], dtype=torch.float64))
    assert torch.equal(losses.jumprelu(x, theta, eps), x * (x > theta))

    theta.grad = None
    x.grad = None
    l0 = losses.jumprelu_l0(x, theta, eps)
    assert float(l0.detach()) == pytest.approx(float((x > theta).sum()) / 3)
    l0.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    torch.testing.assert_close(theta.grad, (-(1 / eps) * inside).sum(0).detach() / 3)


def test_heaviside_ste_is_the_derivative_of_the_box_smoothed_step() -> None:
    """Finite differences of Σ clamp((x − θ)/ε + ½, 0, 1), the step convolved with the rectangle kernel."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(500, 4, generator=gen, dtype=torch.float64) * 2
    theta = torch.tensor([0.3, 0.8, 1.1, 1.7], dtype=torch.float64, requires_grad=True)
    eps, h = 0.05, 1e-7
    losses.HeavisideSTE.apply(x, theta, eps).sum().backward()

    def smoothed(t: torch.Tensor) -> torch.Tensor:
        return ((x - t) / eps + 0.5).clamp(0, 1).sum(0)

    basis = torch.eye(4, dtype=torch.float64)
    finite = torch.stack([(smoothed(theta.detach() + h * basis[i]) - smoothed(theta.detach() - h * basis[i]))[i] / (2 * h)
                          for i in range(4)])
    torch.testing.assert_close(theta.grad, finite, rtol=1e-6, atol=1e-6)
    assert (theta.grad < 0).all()


def test_ste_threshold_gradients_estimate_the_density_derivative() -> None:
    """For x ~ N(0, 1): d/dθ P(x > θ) = −φ(θ) and d/dθ E[x·1(x > θ)] = −θ φ(θ) (Monte Carlo, 200k draws)."""
    x = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for value in (0.5, 1.2):
        phi = math.exp(-value**2 / 2) / math.sqrt(2 * math.pi)
        theta = torch.tensor([value], dtype=torch.float64, requires_grad=True)
        losses.jumprelu_l0(x, theta, 0.05).backward()
        assert float(theta.grad) == pytest.approx(-phi, rel=0.06)
        theta.grad = None
        losses.jumprelu(x, theta, 0.05).mean().backward()
        assert float(theta.grad) == pytest.approx(-value * phi, rel=0.06)


# -- the sparse top-k path -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_path_equals_the_dense_one(arch: str) -> None:
    torch.manual_seed(3)
    shape = SaeShape(d_in=16, width=128, arch=arch, k=4)
    x = torch.randn(64, 16) * 2
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True
    results = {}
    for sparse in (True, False):
        sae = SparseAutoencoder(shape, seed=4)
        with torch.no_grad():
            sae.b_enc.normal_(generator=torch.Generator().manual_seed(5))
            sae.b_dec.normal_(generator=torch.Generator().manual_seed(6))
        out = step_losses(sae, x, x, dead=dead, aux_k=8, aux_coefficient=1 / 32, sparsity_coefficient=0.0,
                          bandwidth=1e-3, sparse=sparse)
        out.loss.backward()
        assert float(out.aux.detach()) > 0  # the AuxK branch ran
        results[sparse] = (out, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (sparse_out, sparse_grads), (dense_out, dense_grads) = results[True], results[False]
    for a, b in [(sparse_out.loss, dense_out.loss), (sparse_out.aux, dense_out.aux), (sparse_out.y_hat, dense_out.y_hat)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse_out.fired, dense_out.fired) and sparse_out.l0 == dense_out.l0
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_sparse_decode_equals_the_dense_product() -> None:
    gen = torch.Generator().manual_seed(7)
    pre = torch.randn(50, 200, generator=gen)
    w_dec = torch.randn(200, 24, generator=gen)
    active = topk_pattern(pre, 6)
    values = torch.relu(pre[active.rows, active.cols])
    dense = sparse_to_dense(values, active)
    assert torch.equal((dense != 0).sum(-1) <= 6, torch.ones(50, dtype=torch.bool))
    torch.testing.assert_close(sparse_decode(values, active, w_dec), dense @ w_dec, rtol=1e-5, atol=1e-5)
    assert per_row_pattern(torch.tensor([[3, 1], [0, 2]]), 4).cols.tolist() == [1, 3, 0, 2]


def test_batch_topk_pattern_is_the_brute_force_selection() -> None:
    for trial in range(6):
        pre = torch.randn(64, 300, generator=torch.Generator().manual_seed(trial))
        if trial % 2:
            pre[3] += 5.0  # one row owns more than its 4k candidates: the exact fallback
        active = batch_topk_pattern(pre, 4)
        assert torch.equal(active.rows * 300 + active.cols, pre.reshape(-1).topk(4 * 64).indices.sort().values)
        assert torch.equal(active.crow[1:] - active.crow[:-1], torch.bincount(active.rows, minlength=64))
        assert torch.equal(active.cols[active.perm], active.cols.sort(stable=True).values)


def test_sparse_step_is_faster_for_wide_saes() -> None:
    """Width 16·d_in, k = 8: decoding and back-propagating through the active rows only beats dense matmuls."""
    shape = SaeShape(d_in=64, width=1024, arch="topk", k=8)
    sae = SparseAutoencoder(shape, seed=0)
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(8))
    no_dead = torch.zeros(1024, dtype=torch.bool)

    def seconds(sparse: bool) -> float:
        best = math.inf
        for _ in range(4):
            start = time.perf_counter()
            step_losses(sae, x, x, dead=no_dead, aux_k=0, aux_coefficient=0.0, sparsity_coefficient=0.0,
                        bandwidth=1e-3, sparse=sparse).loss.backward()
            best = min(best, time.perf_counter() - start)
        return best

    seconds(True), seconds(False)  # warm up both
    assert seconds(True) < seconds(False)


# -- training on the toy store ---------------------------------------------------------------------


def test_topk_recovers_the_ground_truth_directions(store: ActivationStore, tmp_path: Path) -> None:
    calls: list[tuple] = []
    sae = train_sae(_config(), store, tmp_path, progress=lambda task, advance=0, total=None, **f: calls.append((task, advance, total, f)))
    # recovery: most true directions have a decoder row within cos > 0.9
    cosine = (TRUE @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert float((cosine > 0.9).float().mean()) >= 0.9
    assert _fvu(sae, store) < 0.1
    # exactly k features per token, on raw activations (the normalisation is folded in)
    f = sae.encode(store.rows("resid", slice(None)))
    assert torch.equal((f > 0).sum(-1), torch.full((ROWS,), ACTIVE))
    assert float(sae.input_scale) == float(sae.output_scale) == 1.0
    assert sae.shape == SaeShape(d_in=D, width=96, arch="topk", k=ACTIVE, hook="resid")
    # progress: one call per step, the fields the CLI shows, tokens adding up
    assert len(calls) == 400 and {c[0] for c in calls} == {"train sae"} and {c[2] for c in calls} == {512 * 400}
    assert sum(c[1] for c in calls) == 512 * 400 and set(calls[-1][3]) == {"l0", "fvu", "dead"}
    log = _log(tmp_path)
    assert log["step"] == list(range(10, 401, 10)) and log["tokens"][-1] == 512 * 400
    assert set(log) == {"step", "tokens", "loss", "mse", "aux_loss", "fvu", "l0", "dead_fraction", "lr", "resampled"}
    assert max(log["aux_loss"]) > 0  # latents beyond the 48 true ones die, and AuxK then feeds them
    assert log["lr"][-1] < log["lr"][len(log["lr"]) // 2]  # decaying


@pytest.mark.parametrize("arch, extra", [
    ("batchtopk", {}),
    ("relu", {"k": None, "l1_coefficient": 0.5}),
    ("jumprelu", {"k": None, "l0_coefficient": 1.0, "jumprelu_bandwidth": 0.05}),
])
def test_every_architecture_lowers_the_fvu(arch: str, extra: dict, store: ActivationStore, tmp_path: Path) -> None:
    sae = train_sae(_config(arch=arch, total_tokens=512 * 300, log_every=1, **extra), store, tmp_path)
    log = _log(tmp_path)
    fvu = _fvu(sae, store)
    assert fvu < 0.2 and fvu < 0.5 * log["fvu"][0], (fvu, log["fvu"][0])
    l0 = float((sae.encode(store.rows("resid", slice(None))) > 0).float().sum(-1).mean())
    if arch == "batchtopk":
        assert 0.9 * ACTIVE <= log["l0"][-1] <= ACTIVE  # training keeps k·N per batch
        assert torch.all(sae.log_threshold == sae.log_threshold[0]) and math.isfinite(float(sae.log_threshold[0]))
        assert ACTIVE / 1.5 <= l0 <= ACTIVE * 1.5  # the inference threshold gives about k
    else:
        assert l0 < 0.5 * 96  # sparse, not every latent on
    if arch == "jumprelu":
        assert float(sae.threshold.detach().mean()) > 0.1  # the thresholds learned through the STE rose from their start


def test_relu_resampling_revives_forced_dead_latents() -> None:
    sae = SparseAutoencoder(SaeShape(d_in=8, width=20, arch="relu"), seed=0)
    with torch.no_grad():
        sae.b_enc[:5] = -1e4  # latents 0-4 can never fire
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    (sae(x) - x).pow(2).sum().backward()
    optimizer.step()
    before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in (sae.W_enc, sae.W_dec, sae.b_enc)}
    alive_norm = float(sae.W_enc[:, 5:].detach().norm(dim=0).mean())
    dead = torch.zeros(20, dtype=torch.bool)
    dead[:5] = True
    assert not (sae.encode(x)[:, :5] > 0).any()
    row_loss = torch.zeros(32)
    row_loss[[3, 9, 17, 20, 28, 30]] = torch.tensor([1.0, 2.0, 3.0, 1.0, 5.0, 4.0])  # only these can be drawn

    count = resample_dead_latents(sae, optimizer, dead, x, x, row_loss, torch.Generator().manual_seed(0))

    assert count == 5
    with torch.no_grad():
        f = sae.encode(x)
        directions = (x - sae.b_dec) / (x - sae.b_dec).norm(dim=1, keepdim=True)
    for i in range(5):
        # the decoder row is one high-loss input's direction, the encoder the same at 0.2 × the alive norm
        match = (directions @ sae.W_dec[i]).argmax()
        assert int(match) in {3, 9, 17, 20, 28, 30}
        torch.testing.assert_close(sae.W_dec[i].detach(), directions[match])
        torch.testing.assert_close(sae.W_enc[:, i].norm(), torch.tensor(0.2 * alive_norm))
        assert float(sae.b_enc[i].detach()) == 0.0 and f[match, i] > 0  # revived: it fires on its input
    for param, state in before.items():
        for key in ("exp_avg", "exp_avg_sq"):
            new = optimizer.state[param][key]
            reset = new[:, :5] if param is sae.W_enc else new[:5]
            kept, old = (new[:, 5:], state[key][:, 5:]) if param is sae.W_enc else (new[5:], state[key][5:])
            assert torch.all(reset == 0) and torch.equal(kept, old)


def test_relu_training_resamples(store: ActivationStore, tmp_path: Path) -> None:
    # a penalty this strong silences most latents within a few steps
    config = _config(arch="relu", k=None, l1_coefficient=20.0, sparsity_warmup=0.0, lr=3e-2, total_tokens=512 * 60, resample_every=20,
                     dead_tokens=2048)
    train_sae(config, store, tmp_path)
    assert _log(tmp_path)["resampled"][-1] > 0


def test_transcoder_learns_the_linear_map(store: ActivationStore, tmp_path: Path) -> None:
    sae = train_sae(_config(out_hook="out", log_every=1), store, tmp_path)
    assert sae.shape.out_hook == "out" and sae.shape.output_dim == D_OUT
    fvu = _fvu(sae, store, "out")
    assert fvu < 0.3 and fvu < 0.5 * _log(tmp_path)["fvu"][0]


def test_transcoder_target_from_a_second_store_is_the_same_training(store: ActivationStore, tmp_path: Path) -> None:
    out_dir = tmp_path / "out_store"
    write_activations(_capture_out, _contexts(), ["out"], out_dir, batch_size=32, shard_tokens=2048)
    config = _config(out_hook="out", total_tokens=512 * 40)
    one = train_sae(config, store, tmp_path / "one")
    two = train_sae(config, store, tmp_path / "two", out_store=ActivationStore.open(out_dir))
    _assert_same_weights(one, two)

    other = tmp_path / "other_layout"
    write_activations(_capture_out, _contexts(), ["out"], other, batch_size=32, shard_tokens=4096)
    with pytest.raises(LmscopeError, match="does not hold the same rows"):
        train_sae(config, store, tmp_path / "three", out_store=ActivationStore.open(other))


# -- determinism and resume ------------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_different(store: ActivationStore, tmp_path: Path) -> None:
    config = _config(total_tokens=512 * 30)
    a = train_sae(config, store, tmp_path / "a")
    b = train_sae(config, store, tmp_path / "b")
    c = train_sae(_config(total_tokens=512 * 30, seed=1), store, tmp_path / "c")
    _assert_same_weights(a, b)
    assert not torch.equal(a.W_dec, c.W_dec)


def test_init_starts_every_latent_where_the_previous_run_left_it(store: ActivationStore, tmp_path: Path) -> None:
    """With a vanishing learning rate, a run initialised from another ends where that one ended."""
    first = train_sae(_config(), store, tmp_path / "first")
    params = trained_parameters(tmp_path / "first")
    assert set(params) == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
    frozen = _config(total_tokens=512 * 3, lr=1e-12, seed=7)
    warm = train_sae(frozen, store, tmp_path / "warm", init=params)
    cold = train_sae(frozen, store, tmp_path / "cold")
    for name in ("W_enc", "W_dec", "b_dec"):  # the store is the same, so the scales are too: folded weights agree
        assert torch.allclose(getattr(warm, name), getattr(first, name), atol=1e-5), name
    assert not torch.allclose(cold.W_dec, first.W_dec, atol=1e-2)
    assert _fvu(warm, store) == pytest.approx(_fvu(first, store), rel=1e-4)
    assert _fvu(cold, store) > 2 * _fvu(first, store)
    # resuming the warm run needs the same init; another one is refused
    other = {name: value.clone() for name, value in params.items()}
    other["W_dec"] = other["W_dec"].flip(0)
    with pytest.raises(LmscopeError, match="different initial SAE"):
        train_sae(frozen, store, tmp_path / "warm", init=other)
    train_sae(frozen, store, tmp_path / "warm", init=params)  # the same init: finds the run finished


def test_bad_init_is_refused_with_a_clear_sentence(store: ActivationStore, tmp_path: Path) -> None:
    train_sae(_config(total_tokens=512 * 2), store, tmp_path / "first")
    params = trained_parameters(tmp_path / "first")
    with pytest.raises(LmscopeError, match="same width"):
        train_sae(_config(total_tokens=512 * 2, width=64), store, tmp_path / "narrow", init=params)
    with pytest.raises(LmscopeError, match="same architecture"):
        train_sae(_config(total_tokens=512 * 2), store, tmp_path / "partial", init={"W_enc": params["W_enc"]})
    with pytest.raises(LmscopeError, match="does not exist"):
        trained_parameters(tmp_path / "nowhere")


class _Killed(Exception):
    pass


def _kill_after(steps: int):
    calls = [0]

    def progress(task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
        calls[0] += 1
        if calls[0] == steps:
            raise _Killed

    return progress


RESUME_CASES = {
    "topk": dict(dead_tokens=1024),  # latents die within a step or two: AuxK and the dead counters are exercised
    "batchtopk": {},  # the threshold statistics
    "relu": dict(k=None, l1_coefficient=20.0, sparsity_warmup=0.0, lr=3e-2, resample_every=5, dead_tokens=1024),  # resampling
}


@pytest.mark.parametrize("arch", list(RESUME_CASES))
def test_resume_after_interruption_is_bitwise_identical(arch: str, store: ActivationStore, tmp_path: Path) -> None:
    # 16 steps per epoch; killed after step 19 (mid epoch 1), last checkpoint at step 18
    config = _config(arch=arch, batch_size=1024, total_tokens=1024 * 24, checkpoint_every=6, log_every=1, **RESUME_CASES[arch])
    whole = train_sae(config, store, tmp_path / "whole")
    with pytest.raises(_Killed):
        train_sae(config, store, tmp_path / "cut", progress=_kill_after(19))
    assert torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)["step"] == 18
    resumed = train_sae(config, store, tmp_path / "cut")
    _assert_same_weights(whole, resumed)
    assert _log(tmp_path / "whole") == _log(tmp_path / "cut")
    if arch == "relu":
        assert _log(tmp_path / "whole")["resampled"][-1] > 0
    # a finished run returns at once, reporting its tokens as done
    calls: list[int] = []
    again = train_sae(config, store, tmp_path / "cut", progress=lambda task, advance=0, total=None, **f: calls.append(advance))
    _assert_same_weights(whole, again)
    assert calls == [1024 * 24]


_KILLED_RUN = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from lmscope.activations import ActivationStore
from lmscope.sae.train import SaeTrainConfig, train_sae
calls = 0
def progress(task, advance=0, total=None, **fields):
    global calls
    calls += 1
    if calls == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
train_sae(SaeTrainConfig.from_dict(json.loads(sys.argv[1])), ActivationStore.open(sys.argv[2]), sys.argv[3],
          progress=progress, device="cpu")
"""


def test_a_sigkilled_run_resumes_bitwise_identical(store: ActivationStore, store_dir: Path, tmp_path: Path) -> None:
    config = _config(batch_size=1024, total_tokens=1024 * 20, checkpoint_every=4, dead_tokens=1024)
    whole = train_sae(config, store, tmp_path / "whole")
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(config.to_dict()), str(store_dir),
                             str(tmp_path / "cut"), "11"], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr
    assert torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)["step"] == 8
    _assert_same_weights(whole, train_sae(config, store, tmp_path / "cut"))


# -- schedule, plan and refusals -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fitted_encoder_scale_is_the_least_squares_scale(arch: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=g, dtype=torch.float64) * 2.0 + 0.5
    sae = SparseAutoencoder(SaeShape(d_in=16, width=64, arch=arch, k=4), seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0).float())
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}

    def sse(scale: float) -> float:  # brute force: the dense forward pass with the encoder scaled, on the fit's chunks
        probe = SparseAutoencoder(sae.shape)
        probe.load_state_dict({**sae.state_dict(), "W_enc": before["W_enc"] * scale})
        with torch.no_grad():
            return sum(float((c.float() - probe.decode(probe.activate(probe.pre_acts(c.float()), batch_topk=True))).double()
                             .pow(2).sum()) for c in x.split(256))

    alpha = fit_encoder_scale(sae, x, chunk=256)
    assert torch.allclose(sae.W_enc, before["W_enc"] * alpha) and torch.equal(sae.W_dec, before["W_dec"])
    # the seeded encoder over-reconstructs; the fitted scale is the parabola's minimum
    assert 0 < alpha < 1 and sse(alpha) < sse(1.0)
    assert sse(alpha) <= min(sse(alpha * 0.98), sse(alpha * 1.02))
    # SSE(s) = A - 2 s B + s² C (the top-k choice does not depend on s > 0): its vertex B / C from three points
    a, b, c = sse(0.0), sse(alpha), sse(2 * alpha)
    curvature = (a - 2 * b + c) / (2 * alpha**2)
    slope = (4 * alpha**2 * curvature - (c - a)) / (4 * alpha)
    assert slope / curvature == pytest.approx(alpha, rel=1e-4)
    with pytest.raises(LmscopeError, match="needs a topk or batchtopk SAE"):
        fit_encoder_scale(SparseAutoencoder(SaeShape(d_in=16, width=64, arch="relu")), x)


def test_a_fresh_topk_run_starts_from_the_seeded_sae_with_the_fitted_encoder(store: ActivationStore) -> None:
    from lmscope.sae.train import _sample

    sample = _sample(store, "resid", 0)
    for fit in (True, False):
        config = _config(fit_encoder_scale=fit)
        run = _Run(config, plan_training(config, store), _store_source(store, None), torch.device("cpu"))
        run.initialise(sample, None)
        scale = math.sqrt(D / float(sample.pow(2).sum(-1).mean()))
        expected = SparseAutoencoder(run.sae.shape, seed=0)
        with torch.no_grad():
            expected.b_dec.copy_((sample * scale).mean(0).float())
        if fit:
            assert fit_encoder_scale(expected, sample * scale) < 1
        assert float(run.sae.input_scale) == pytest.approx(scale, rel=1e-6)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(run.sae, name), getattr(expected, name)), (fit, name)


def test_learning_rate_schedule() -> None:
    plan = TrainPlan(d_in=4, d_out=4, width=8, k=2, aux_k=2, steps=100, steps_per_epoch=10, batch_size=1, tokens=100,
                     dead_tokens=10, lr=1.0, warmup_steps=10)
    assert learning_rate(0, plan, "linear", 0.2) == pytest.approx(0.1)
    assert learning_rate(9, plan, "linear", 0.2) == pytest.approx(1.0)
    assert learning_rate(50, plan, "linear", 0.2) == 1.0
    assert learning_rate(90, plan, "linear", 0.2) == pytest.approx(0.5)  # 10 of the last 20 steps remain
    assert learning_rate(99, plan, "linear", 0.2) == pytest.approx(0.05)
    assert learning_rate(10, plan, "cosine", 0.2) == pytest.approx(1.0)
    assert learning_rate(55, plan, "cosine", 0.2) == pytest.approx(0.5)
    assert learning_rate(70, plan, "constant", 0.2) == 1.0


def test_plan_resolves_the_defaults(store: ActivationStore) -> None:
    plan = plan_training(SaeTrainConfig(hook="resid"), store)
    assert (plan.width, plan.k, plan.aux_k, plan.d_out) == (16 * D, 32, D // 2, D)
    assert plan.steps == ROWS // 4096 and plan.tokens == plan.steps * 4096
    assert plan.lr == pytest.approx(2e-4 / math.sqrt(16 * D / 2**14))
    assert plan.dead_tokens == 4096  # a tenth of the tokens, at least a batch
    transcoder = plan_training(SaeTrainConfig(hook="resid", out_hook="out", arch="relu", epochs=3, batch_size=1000), store)
    assert (transcoder.d_out, transcoder.aux_k, transcoder.steps) == (D_OUT, 0, 3 * 16)


def test_bad_inputs_are_refused_with_a_clear_sentence(store: ActivationStore, tmp_path: Path) -> None:
    refusals = [
        (lambda: SaeTrainConfig(hook="resid", arch="gated"), "unknown; choose one of"),
        (lambda: SaeTrainConfig(hook="resid", k=200, width=96), "k=200 exceeds the width 96"),
        (lambda: SaeTrainConfig(hook="resid", arch="relu", k=4), "has no k"),
        (lambda: SaeTrainConfig(hook="resid", resample_every=10), "only relu SAEs resample"),
        (lambda: SaeTrainConfig(hook="resid", out_hook="resid"), "leave out_hook unset"),
        (lambda: SaeTrainConfig(hook="resid", batch_size=100, total_tokens=50), "less than one batch"),
        (lambda: SaeTrainConfig(hook="resid", decay="step"), "decay 'step' is unknown"),
        (lambda: SaeTrainConfig(hook="resid", lr=-1.0), "must be positive"),
        (lambda: SaeTrainConfig.from_dict({"hook": "resid", "widht": 3}), "unknown fields widht"),
        (lambda: plan_training(SaeTrainConfig(hook="nope"), store), "hook 'nope' is not in the activation store"),
        (lambda: plan_training(SaeTrainConfig(hook="resid", out_hook="nope"), store), "hook 'nope' is not in"),
        (lambda: plan_training(SaeTrainConfig(hook="resid", k=40, expansion_factor=1), store), "k=40 exceeds the SAE width 32"),
        (lambda: plan_training(SaeTrainConfig(hook="resid", batch_size=ROWS + 1), store), "fewer than one batch"),
        (lambda: plan_training(SaeTrainConfig(hook="resid"), store, out_store=store), "no out_hook"),
    ]
    for make, message in refusals:
        with pytest.raises(LmscopeError, match=message):
            make()
    train_sae(_config(total_tokens=512 * 2), store, tmp_path)
    with pytest.raises(LmscopeError, match=r"holds a checkpoint of a different SAE training run \(lr None → 0.001\); choose another out_dir"):
        train_sae(_config(total_tokens=512 * 2, lr=1e-3), store, tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(LmscopeError, match="unreadable"):
        train_sae(_config(total_tokens=512 * 2), store, tmp_path / "junk")
