"""The gradient store checked against independent truth: brute-force autograd gradients, projected densely here.

Truth for the stored vectors is ``P_out G P_in^T`` with ``G`` from one autograd call per row
(:func:`test_influence.train_gradients`, never lmscope's hooks) and the projection matrices redrawn here
from the documented seed rule; truth for the scores is a dense numpy computation on those vectors.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmscope.errors import LmscopeError
from lmscope.influence.objectives import query_batch
from lmscope.influence.store import STORE_JSON, GradientStore
from lmscope.influence.taps import tracked_linears
from test_influence import QUERIES, VOCAB, query_gradients, rows_of, tiny_neox, train_gradients


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    pass


class Killed(Exception):
    pass


class DiesAfter:
    """Rows that raise :class:`Killed` on the read after ``reads`` reads (``None``: never), counting every read."""

    def __init__(self, data: np.ndarray, reads: int | None = None) -> None:
        self.data, self.reads, self.shape, self.count = data, reads, data.shape, 0

    def __getitem__(self, index: slice) -> np.ndarray:
        if self.reads is not None and self.count >= self.reads:
            raise Killed
        self.count += 1
        return self.data[index]


def documented_projections(seed: int, name: str, shape: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of the module docstring, written out again: sha256 seed, CPU generator, P_out then P_in, N(0, 1/k)."""
    layer_seed = int.from_bytes(hashlib.sha256(f"lmscope-gradient-store-v1:{seed}:{name}".encode()).digest()[:8], "big") >> 1
    generator = torch.Generator().manual_seed(layer_seed)
    p_out = torch.randn(k, shape[0], generator=generator) / math.sqrt(k)
    p_in = torch.randn(k, shape[1], generator=generator) / math.sqrt(k)
    return p_out, p_in


def dense_projection(gradients: dict[str, torch.Tensor], store: GradientStore, k: int) -> np.ndarray:
    """``[N, D]``: ``vec(P_out G P_in^T)`` of each layer in float64, concatenated in the store's layer order."""
    parts = []
    for name, layer in store.layers.items():
        p_out, p_in = (p.double() for p in documented_projections(store.seed, name, layer.shape, k))
        parts.append(torch.einsum("ko,noi,ji->nkj", p_out, gradients[name], p_in).reshape(gradients[name].shape[0], -1))
    return torch.cat(parts, dim=1).numpy()


def exact_dot_products(model: torch.nn.Module, modules: dict, rows: np.ndarray) -> np.ndarray:
    g_train, g_query = train_gradients(model, modules, rows), query_gradients(model, modules, QUERIES)
    return sum(torch.einsum("qoi,noi->qn", g_query[n], g_train[n]) for n in modules).numpy()


# -- tests -----------------------------------------------------------------------------------------


def test_stored_vectors_are_projected_brute_force_gradients(tmp_path) -> None:
    model, rows = tiny_neox(), rows_of(12)
    modules = tracked_linears(model)
    store = GradientStore.build(model, modules, rows, tmp_path / "store", dim_per_layer=16, seed=5, batch_size=5)
    assert store.dim == 16 * len(modules) and store.n_rows == 12 and store.gradients.shape == (12, store.dim)
    assert [layer.offset for layer in store.layers.values()] == [16 * i for i in range(len(modules))]
    for name, layer in store.layers.items():  # the store's matrices are the documented ones, bit for bit
        for ours, truth in zip(store.projections()[name], documented_projections(5, name, layer.shape, 4)):
            torch.testing.assert_close(ours, truth, rtol=0, atol=0)
    g_train = train_gradients(model, modules, rows)
    truth = dense_projection(g_train, store, 4)
    stored = np.asarray(store.gradients, dtype=np.float64)
    np.testing.assert_allclose(stored, truth, rtol=1e-4, atol=1e-6 * np.abs(truth).max())  # float32 sums over tokens
    # each layer's block on its own, so errors in two layers cannot compensate
    for layer in store.layers.values():
        block = slice(layer.offset, layer.offset + layer.size)
        np.testing.assert_allclose(stored[:, block], truth[:, block], rtol=1e-4, atol=1e-6 * np.abs(truth[:, block]).max())
    # projecting full gradients agrees (the query path for precomputed gradients)
    np.testing.assert_allclose(store.project_gradients(g_train).numpy(), truth, rtol=1e-10, atol=1e-12 * np.abs(truth).max())
    # queries projected from hooks (no [O, I] formed) equal brute-force query gradients projected densely
    projected, measurements = store.project_batch(model, modules, query_batch(QUERIES))
    q_truth = dense_projection(query_gradients(model, modules, QUERIES), store, 4)
    np.testing.assert_allclose(projected.numpy(), q_truth, rtol=1e-4, atol=1e-6 * np.abs(q_truth).max())
    batch = query_batch(QUERIES)
    nll = (F.cross_entropy(model(input_ids=batch.inputs).logits.float().transpose(1, 2), batch.targets, reduction="none") * batch.mask).sum(1)
    torch.testing.assert_close(measurements, nll.detach(), rtol=1e-6, atol=1e-6)
    # identity scores are the projected dot products
    np.testing.assert_allclose(store.scores(projected), projected.double().numpy() @ stored.T, rtol=1e-12, atol=0)
    # the entries are N(0, 1/k): at k = 64 their standard deviation × √k is 1 to within sampling error
    wide = GradientStore.build(model, modules, rows[:2], tmp_path / "wide", dim_per_layer=64 * 64)
    for p_out, p_in in wide.projections().values():
        for p in (p_out, p_in):
            assert abs(float(p.std()) * 8 - 1) < 6 / math.sqrt(p.numel())


def test_projected_identity_scores_approach_exact_dot_products(tmp_path) -> None:
    """Johnson–Lindenstrauss: unbiased projected dot products whose error shrinks as k grows (k_o = k_i = √dim_per_layer)."""
    model, rows = tiny_neox(), rows_of(24)
    modules = tracked_linears(model)
    exact = exact_dot_products(model, modules, rows)
    g_query = query_gradients(model, modules, QUERIES)

    def projected_scores(dim_per_layer: int, seed: int) -> np.ndarray:
        store = GradientStore.build(model, modules, rows, tmp_path / f"{dim_per_layer}-{seed}", dim_per_layer=dim_per_layer, seed=seed, batch_size=8)
        return store.scores(store.project_gradients(g_query))

    moderate = projected_scores(256, 0)  # k = 16; the layers' gradients have 72 to 288 entries
    assert min(np.corrcoef(moderate[q], exact[q])[0, 1] for q in range(len(QUERIES))) > 0.9
    errors = {}
    for dim in (4, 64, 1024):  # k = 2, 8, 32; the expected error falls like 1/√k
        errors[dim] = np.mean([np.linalg.norm(projected_scores(dim, seed) - exact) / np.linalg.norm(exact) for seed in range(3)])
    assert errors[4] > errors[64] > errors[1024]
    assert errors[1024] < 0.35 and errors[4] > 2 * errors[1024]


def test_fisher_scores_equal_a_dense_computation(tmp_path) -> None:
    model, rows = tiny_neox(), rows_of(40)
    modules = tracked_linears(model)
    store = GradientStore.build(model, modules, rows, tmp_path, dim_per_layer=4, seed=1, batch_size=8)  # D = 32 < N: F̂ has full rank
    queries = store.project_batch(model, modules, query_batch(QUERIES))[0].double().numpy()
    phi = np.asarray(store.gradients, dtype=np.float64)
    fisher = phi.T @ phi / phi.shape[0]
    heuristic = 0.1 * float(np.linalg.eigvalsh(fisher).mean())
    assert store.damping("heuristic") == pytest.approx(heuristic, rel=1e-10)
    for damping, lam in (("heuristic", heuristic), (1e-3, 1e-3), (0.0, 0.0)):
        truth = queries @ np.linalg.solve(fisher + lam * np.eye(store.dim), phi.T)
        ours = store.scores(queries, strategy="fisher", damping=damping)
        np.testing.assert_allclose(ours, truth, rtol=1e-7, atol=1e-9 * np.abs(truth).max())
    # preconditioning changes the ranking (it is not a rescaled identity score) and tends to it as λ grows
    identity = store.scores(queries)
    assert min(np.corrcoef(store.scores(queries, strategy="fisher")[q], identity[q])[0, 1] for q in range(len(QUERIES))) < 0.99
    np.testing.assert_allclose(store.scores(queries, strategy="fisher", damping=1e6) * 1e6, identity, rtol=1e-3, atol=1e-3 * np.abs(identity).max())
    # caches: F̂ and one Cholesky factor (of the last λ), reused by a reopened store
    np.testing.assert_allclose(np.load(tmp_path / "fisher.npy"), fisher, rtol=1e-12, atol=1e-15 * np.abs(fisher).max())
    assert [p.name for p in tmp_path.glob("fisher-cholesky-*.npy")] == ["fisher-cholesky-1000000.0.npy"]
    reopened = GradientStore.open(tmp_path)
    np.testing.assert_array_equal(reopened.scores(queries, strategy="fisher", damping=1e6), store.scores(queries, strategy="fisher", damping=1e6))
    # with fewer rows than dimensions F̂ is singular: zero damping is refused, any positive damping works
    few = GradientStore.build(model, modules, rows[:8], tmp_path / "few", dim_per_layer=4)
    with pytest.raises(LmscopeError, match="is not positive definite .* give a positive damping"):
        few.scores(queries, strategy="fisher", damping=0.0)
    assert np.isfinite(few.scores(queries, strategy="fisher")).all()


def test_build_resumes_after_a_kill_byte_identical(tmp_path) -> None:
    model, rows = tiny_neox(), rows_of(20)
    modules = tracked_linears(model)
    settings = dict(dim_per_layer=16, seed=7, batch_size=3, model_identity={"model": "tiny-neox", "step": 0})
    whole = GradientStore.build(model, modules, rows, tmp_path / "whole", **settings)
    out = tmp_path / "killed"
    # one read hashes the rows, then one per batch of 3; the marker is written after every batch (checkpoint_seconds=0)
    with pytest.raises(Killed):
        GradientStore.build(model, modules, DiesAfter(rows, 1 + 3), out, checkpoint_seconds=0, **settings)
    marker = json.loads((out / STORE_JSON).read_text())
    assert (marker["rows_done"], marker["complete"]) == (9, False)
    with pytest.raises(LmscopeError, match=r"is unfinished \(9 of 20 rows\); run the build again"):
        GradientStore.open(out)
    with pytest.raises(LmscopeError, match="holds a gradient store of other settings"):
        GradientStore.build(model, modules, rows, out, **{**settings, "seed": 8})
    with pytest.raises(LmscopeError, match="holds a gradient store of other rows"):
        GradientStore.build(model, modules, rows[::-1].copy(), out, **settings)
    with pytest.raises(LmscopeError, match="holds a gradient store of other model"):
        GradientStore.build(model, modules, rows, out, **{**settings, "model_identity": {"model": "tiny-neox", "step": 1}})
    with pytest.raises(Killed):  # killed again, after two more batches
        GradientStore.build(model, modules, DiesAfter(rows, 1 + 2), out, checkpoint_seconds=0, **settings)
    assert json.loads((out / STORE_JSON).read_text())["rows_done"] == 15
    counting = DiesAfter(rows)
    resumed = GradientStore.build(model, modules, counting, out, checkpoint_seconds=0, **settings)
    assert counting.count == 1 + 2  # only rows 15–19 were computed
    for name in ("gradients.f32", STORE_JSON):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert resumed.model == {"model": "tiny-neox", "step": 0}
    # a finished store is reused, not rebuilt; reopening gives the same view
    counting = DiesAfter(rows)
    GradientStore.build(model, modules, counting, out, **settings)
    assert counting.count == 1
    reopened = GradientStore.open(out)
    np.testing.assert_array_equal(reopened.gradients, whole.gradients)
    assert reopened.layers == whole.layers and reopened.meta == whole.meta


def test_same_seed_same_projections(tmp_path) -> None:
    model, rows = tiny_neox(), rows_of(6)
    modules = tracked_linears(model)
    a = GradientStore.build(model, modules, rows, tmp_path / "a", dim_per_layer=9, seed=3)
    b = GradientStore.build(model, modules, rows, tmp_path / "b", dim_per_layer=9, seed=3, batch_size=2)
    c = GradientStore.build(model, modules, rows, tmp_path / "c", dim_per_layer=9, seed=4)
    for name in modules:
        for pa, pb, pc in zip(a.projections()[name], b.projections()[name], c.projections()[name]):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)
            assert not torch.equal(pa, pc)
    assert a.meta["projection"]["sha256"] == b.meta["projection"]["sha256"] != c.meta["projection"]["sha256"]
    np.testing.assert_allclose(a.gradients, b.gradients, rtol=1e-5, atol=1e-6 * np.abs(a.gradients).max())  # other batches, same rows
    first = list(modules)[0]  # layers get independent matrices
    assert not torch.equal(a.projections()[first][1], a.projections()[list(modules)[4]][1])


def test_float16_storage(tmp_path) -> None:
    model, rows = tiny_neox(), rows_of(6)
    modules = tracked_linears(model)
    full = GradientStore.build(model, modules, rows, tmp_path / "f32", dim_per_layer=16)
    half = GradientStore.build(model, modules, rows, tmp_path / "f16", dim_per_layer=16, dtype="float16")
    assert (tmp_path / "f16" / "gradients.f16").stat().st_size == 6 * half.dim * 2
    np.testing.assert_array_equal(GradientStore.open(tmp_path / "f16").gradients, np.asarray(full.gradients).astype(np.float16))


def test_bad_input_is_refused(tmp_path) -> None:
    model, rows = tiny_neox(), rows_of(4)
    modules = tracked_linears(model)
    with pytest.raises(LmscopeError, match="dim-per-layer -4 must be a positive perfect square"):
        GradientStore.build(model, modules, rows, tmp_path / "x", dim_per_layer=-4)
    with pytest.raises(LmscopeError, match="dim-per-layer 200 must be a positive perfect square .* such as 196 or 225"):
        GradientStore.build(model, modules, rows, tmp_path / "x", dim_per_layer=200)
    with pytest.raises(LmscopeError, match="store dtype 'int8' is unknown"):
        GradientStore.build(model, modules, rows, tmp_path / "x", dtype="int8")
    with pytest.raises(LmscopeError, match="training rows must be a"):
        GradientStore.build(model, modules, rows[0], tmp_path / "x")
    with pytest.raises(LmscopeError, match="outside the model's vocabulary"):
        GradientStore.build(model, modules, rows + VOCAB, tmp_path / "x")
    with pytest.raises(LmscopeError, match="no layers given"):
        GradientStore.build(model, {}, rows, tmp_path / "x")
    with pytest.raises(LmscopeError, match="holds no gradient store"):
        GradientStore.open(tmp_path / "missing")

    store = GradientStore.build(model, modules, rows, tmp_path / "store", dim_per_layer=4)
    g = train_gradients(model, modules, rows)
    with pytest.raises(LmscopeError, match="query gradient of layer .* has shape \\(4, 9, 24\\); the store needs \\[queries, 24, 9\\]"):
        store.project_gradients({**g, first(modules): g[first(modules)].transpose(1, 2)})
    with pytest.raises(LmscopeError, match="holds 2 queries but earlier layers hold 4"):
        store.project_gradients({name: t[:2] if i == 3 else t for i, (name, t) in enumerate(g.items())})
    other = tiny_neox(hidden=16)  # another model: same layer names, other shapes
    with pytest.raises(LmscopeError, match="has shape .* the store needs"):
        store.project_gradients(train_gradients(other, tracked_linears(other), rows))
    with pytest.raises(LmscopeError, match="this is another model's layer"):
        store.project_batch(other, tracked_linears(other), query_batch(QUERIES))
    with pytest.raises(LmscopeError, match="query gradients lack the store's layer"):
        store.project_gradients({n: t for n, t in g.items() if ".mlp." in n})
    with pytest.raises(LmscopeError, match="'lm_head', which is not in the store"):
        store.project_gradients(train_gradients(model, tracked_linears(model, "all"), rows))
    with pytest.raises(LmscopeError, match="the given layers are not the store's"):
        store.project_batch(model, tracked_linears(model, "mlp"), query_batch(QUERIES))
    with pytest.raises(LmscopeError, match=r"projected queries have shape \(3, 31\); the store needs \[queries, 32\]"):
        store.scores(np.zeros((3, 31)))
    with pytest.raises(LmscopeError, match="store scoring strategy 'kfac' is unknown"):
        store.scores(np.zeros((3, 32)), strategy="kfac")
    with pytest.raises(LmscopeError, match="damping 'lots' is neither a number nor 'heuristic'"):
        store.scores(np.zeros((3, 32)), strategy="fisher", damping="lots")

    (tmp_path / "store" / "gradients.f32").write_bytes(b"\0" * 10)
    with pytest.raises(LmscopeError, match="is missing or not 512 bytes long; build the gradient store again"):
        GradientStore.open(tmp_path / "store")
    (tmp_path / "store" / STORE_JSON).write_text("{")
    with pytest.raises(LmscopeError, match="is not valid JSON"):
        GradientStore.open(tmp_path / "store")


def first(modules: dict) -> str:
    return next(iter(modules))
