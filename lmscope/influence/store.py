r"""A gradient store: every training row's gradient, randomly projected to a fixed dimension, kept on disk.

Scoring a query against ``N`` training rows with :mod:`lmscope.influence.scores` costs one forward and
backward pass per row batch, for every new query. A store pays that cost once (as TRAK, Park et al. 2023,
and LoGra, Choe et al. 2024, do): each row's gradient is projected to ``D`` numbers and written to a
memmap; a query is then one projection and one matrix product against the ``[N, D]`` matrix.

**Projection (LoGra's, per layer).** For a tracked linear layer ``l`` with per-row gradient
:math:`G = \sum_t g_t \bar a_t^\top` (``[O, I]``, see :mod:`lmscope.influence.taps`), two seeded Gaussian
matrices :math:`P_{out} \in \mathbb R^{k_o \times O}`, :math:`P_{in} \in \mathbb R^{k_i \times I}` with entries
:math:`\mathcal N(0, 1/k_o)` and :math:`\mathcal N(0, 1/k_i)` give

.. math::  \phi_l = \mathrm{vec}(P_{out}\, G\, P_{in}^\top) = \mathrm{vec}\Big(\sum_t (P_{out} g_t)(P_{in} \bar a_t)^\top\Big)
           \in \mathbb R^{k_o k_i}

(row-major vec), computed from the layer's inputs and output gradients so that no ``[O, I]`` gradient
is formed per row. Since :math:`\mathbb E[P^\top P] = I` for both, :math:`\mathbb E\,\langle \phi_l(G), \phi_l(H)\rangle
= \langle G, H\rangle`: projected dot products are unbiased estimates of gradient dot products, with a
relative spread that shrinks like :math:`1/\sqrt{k}` (Johnson–Lindenstrauss). A row's vector
:math:`\phi \in \mathbb R^D` is the layers' :math:`\phi_l` concatenated in model order, :math:`D = \sum_l k_o k_i`.

**Dimension rule.** ``dim_per_layer = d`` must be a perfect square; every layer gets
:math:`k_o = k_i = \sqrt d` (``64`` → 8 × 8, ``256`` → 16 × 16), so :math:`D = d \times` the number of layers.
``k`` is not capped at the layer's size: the estimate stays unbiased and only gets sharper.

**Seeds.** Layer ``l``'s matrices are drawn from a CPU :class:`torch.Generator` seeded with the first
63 bits of ``sha256("lmscope-gradient-store-v1:{seed}:{layer name}")`` (``P_out`` first, then ``P_in``):
the same on every machine; store.json records their sha256, so a torch that drew others is detected.

**Scores.** ``identity``: :math:`s_{qn} = \phi_q^\top \phi_n`, the projected gradient dot product.
``fisher``: TRAK's and LoGra's preconditioning in the projected space,

.. math::  s_{qn} = \phi_q^\top (\hat F + \lambda I)^{-1} \phi_n, \qquad \hat F = \frac1N \sum_n \phi_n \phi_n^\top \;(D \times D)

the (empirical, per-row) Fisher of the stored vectors — exact in the projected space, with no
Kronecker or block-diagonal approximation. Damping :math:`\lambda` is a number or ``heuristic``:
0.1 × the mean eigenvalue of :math:`\hat F` (:math:`0.1\,\mathrm{tr}\hat F / D`), as
:mod:`lmscope.influence.precondition`. :math:`\hat F` and the Cholesky factor of :math:`\hat F + \lambda I` are
cached beside the store. All score arithmetic is float64 (stored vectors are widened chunk by chunk).

**Files** (``out_dir``)::

    store.json          format, version, layers (shape, k_o, k_i, offset), seed, N, D, dtype,
                        model identity (given by the caller), rows digest, progress (rows_done, complete)
    gradients.f32       raw float32 [N, D] row-major (gradients.f16 with dtype float16), np.memmap
    fisher.npy          cached F̂, float64 [D, D]
    fisher-cholesky-λ.npy  cached lower Cholesky factor of F̂ + λI, float64 [D, D] (the last λ used)

Building writes rows in order and records ``rows_done`` in store.json (atomically, after flushing the
memmap) every ``checkpoint_seconds``; a killed build started again with the same settings and rows
resumes there and ends byte-identical to an uninterrupted one (the batches are the same, so are their
floating-point sums).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path, atomic_write_json, directory_lock
from lmscope.influence.factors import layer_shapes
from lmscope.influence.objectives import TokenBatch, activation_gradients_only, logits_of, token_losses, training_batch
from lmscope.influence.precondition import HEURISTIC_SCALE, parse_damping
from lmscope.influence.taps import LinearTaps
from lmscope.progress import Progress, no_progress

STORE_FORMAT = "lmscope-gradient-store"
STORE_VERSION = 1
STORE_JSON = "store.json"
FISHER_FILE = "fisher.npy"
CHOLESKY_PREFIX = "fisher-cholesky-"
STORE_DTYPES: dict[str, str] = {"float32": "gradients.f32", "float16": "gradients.f16"}
STORE_STRATEGIES: tuple[str, ...] = ("identity", "fisher")
DEFAULT_DIM_PER_LAYER = 64
MAX_FISHER_DIM = 16384
"""Largest ``D`` the ``fisher`` strategy accepts: ``D × D`` float64 is 2 GiB there."""
DIGEST_CHUNK_ROWS = 4096
SCORE_CHUNK_BYTES = 1 << 27
"""Stored rows widened to float64 per matrix product when scoring (128 MiB)."""

StoreStrategy = Literal["identity", "fisher"]


@dataclass(frozen=True)
class StoreLayer:
    """One tracked layer's place in the store.

    Attributes:
        shape: ``(O, I)`` of the layer's gradient (``I`` counts the bias column).
        k_out, k_in: rows of ``P_out`` (``[k_out, O]``) and ``P_in`` (``[k_in, I]``).
        offset: where the layer's ``k_out·k_in`` numbers start in a row's ``D``-vector.
    """

    name: str
    shape: tuple[int, int]
    k_out: int
    k_in: int
    offset: int

    @property
    def size(self) -> int:
        return self.k_out * self.k_in


# -- projections -----------------------------------------------------------------------------------


def projection_sides(dim_per_layer: int) -> int:
    """``k = √dim_per_layer`` (``k_o = k_i = k``); refuses anything but a positive perfect square."""
    if isinstance(dim_per_layer, bool) or not isinstance(dim_per_layer, (int, np.integer)) or dim_per_layer < 1 \
            or math.isqrt(int(dim_per_layer)) ** 2 != dim_per_layer:
        hint = ""
        if isinstance(dim_per_layer, (int, np.integer)) and not isinstance(dim_per_layer, bool) and dim_per_layer > 1:
            k = math.isqrt(int(dim_per_layer))
            hint = f" such as {k * k} or {(k + 1) ** 2}"
        raise LmscopeError(f"dim-per-layer {dim_per_layer!r} must be a positive perfect square (k_out = k_in = its square root){hint}.")
    return math.isqrt(int(dim_per_layer))


def layer_seed(seed: int, name: str) -> int:
    """The generator seed of layer ``name``'s projections: 63 bits of ``sha256("lmscope-gradient-store-v1:{seed}:{name}")``."""
    digest = hashlib.sha256(f"lmscope-gradient-store-v1:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_projections(seed: int, name: str, shape: tuple[int, int], k_out: int, k_in: int) -> tuple[Tensor, Tensor]:
    """``P_out [k_out, O]`` and ``P_in [k_in, I]``, float32 on the CPU, entries ``N(0, 1/k_out)`` and ``N(0, 1/k_in)``."""
    generator = torch.Generator().manual_seed(layer_seed(seed, name))
    p_out = torch.randn(k_out, shape[0], generator=generator, dtype=torch.float32) * (1.0 / math.sqrt(k_out))
    p_in = torch.randn(k_in, shape[1], generator=generator, dtype=torch.float32) * (1.0 / math.sqrt(k_in))
    return p_out, p_in


def _projections_sha256(projections: dict[str, tuple[Tensor, Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, (p_out, p_in) in projections.items():
        digest.update(name.encode())
        digest.update(p_out.contiguous().numpy().astype("<f4").tobytes())
        digest.update(p_in.contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def project_batch(model: nn.Module, modules: dict[str, nn.Linear], projections: dict[str, tuple[Tensor, Tensor]],
                  batch: TokenBatch) -> tuple[Tensor, Tensor]:
    r"""Projected gradients ``[B, D]`` (float32, CPU) of each row's summed masked loss, and the losses ``[B]``.

    Per layer :math:`\mathrm{vec}\sum_t (P_{out} g_t)(P_{in} \bar a_t)^\top` from one forward and backward pass;
    ``projections`` maps each of ``modules`` (in order) to its ``(P_out, P_in)``.
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    parts = []
    with LinearTaps(modules) as taps, activation_gradients_only(model):
        logits = logits_of(model, batch.inputs)
        losses = token_losses(logits, batch.targets, batch.mask).sum(dim=1)
        losses.sum().backward()
        taps.check_complete()
        for name in modules:
            p_out, p_in = (p.to(device) for p in projections[name])
            out_side = taps.output_grads[name] @ p_out.T  # [B, T, k_o]
            in_side = taps.activations[name] @ p_in.T  # [B, T, k_i]
            parts.append(torch.einsum("bto,bti->boi", out_side, in_side).reshape(out_side.shape[0], -1))
    return torch.cat(parts, dim=1).cpu(), losses.detach().cpu()


# -- rows ------------------------------------------------------------------------------------------


def _rows_digest(rows: Any, vocab_size: int | None) -> dict[str, Any]:
    """``{"shape", "sha256"}`` of the rows' token ids as little-endian int64, read in chunks; refuses ids outside the vocabulary."""
    n, length = int(rows.shape[0]), int(rows.shape[1])
    digest = hashlib.sha256(f"{n}x{length}".encode())
    for start in range(0, n, DIGEST_CHUNK_ROWS):
        block = np.ascontiguousarray(np.asarray(rows[start : start + DIGEST_CHUNK_ROWS]), dtype="<i8")
        if block.size and (int(block.min()) < 0 or (vocab_size is not None and int(block.max()) >= vocab_size)):
            raise LmscopeError(f"training rows {start}–{start + len(block) - 1} hold token ids outside the model's vocabulary "
                               f"[0, {vocab_size}); give rows tokenized for this model.")
        digest.update(block.tobytes())
    return {"shape": [n, length], "sha256": digest.hexdigest()}


def _vocab_size(model: nn.Module) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError):
        return None


# -- the store -------------------------------------------------------------------------------------


class GradientStore:
    """A built store: its layers, the ``[N, D]`` memmap of projected row gradients, and scoring against it.

    Make one with :meth:`build`, open one with :meth:`open`.
    """

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        self.layers: dict[str, StoreLayer] = {
            name: StoreLayer(name, tuple(spec["shape"]), spec["k_out"], spec["k_in"], spec["offset"]) for name, spec in meta["layers"].items()
        }
        self.n_rows: int = meta["n_rows"]
        self.dim: int = meta["dim"]
        self.seed: int = meta["settings"]["seed"]
        self.dtype: str = meta["settings"]["dtype"]
        path = directory / meta["file"]
        expected = self.n_rows * self.dim * np.dtype(self.dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise LmscopeError(f"{str(path)!r} is missing or not {expected} bytes long; build the gradient store again.")
        self.gradients: np.memmap = np.memmap(path, dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r", shape=(self.n_rows, self.dim))
        """``[N, D]`` projected gradients of the training rows, read-only."""
        self._projections: dict[str, tuple[Tensor, Tensor]] | None = None

    @property
    def model(self) -> dict[str, Any]:
        """The model identity the caller recorded at build time."""
        return self.meta["model"]

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        modules: dict[str, nn.Linear],
        rows: Any,
        out_dir: str | os.PathLike[str],
        *,
        dim_per_layer: int = DEFAULT_DIM_PER_LAYER,
        seed: int = 0,
        batch_size: int = 8,
        dtype: str = "float32",
        model_identity: dict[str, Any] | None = None,
        checkpoint_seconds: float = 30.0,
        progress: Progress = no_progress,
    ) -> "GradientStore":
        """Project every training row's gradient into ``out_dir``; resume a killed build; reuse a finished one.

        Args:
            model: a ``transformers`` causal LM (parameters unchanged; their ``.grad`` is cleared).
            modules: ``{name: nn.Linear}`` the gradients are taken over, in model order
                (:func:`lmscope.influence.taps.tracked_linears`).
            rows: ``[N, L]`` token ids (array, memmap or tensor): the model reads ``rows[:, :-1]`` and the
                loss is the summed NLL of ``rows[:, 1:]`` (:func:`lmscope.influence.objectives.training_batch`).
            out_dir: the store's directory (created).
            dim_per_layer: ``k_o·k_i`` per layer, a perfect square (``k_o = k_i = √dim_per_layer``).
            seed: the projections' seed.
            batch_size: rows per forward/backward pass (part of the settings: a resume must use the same).
            dtype: ``float32`` or ``float16`` storage.
            model_identity: JSON-able description of the weights (e.g. spec and step); a resume or a
                reuse must match it.
            checkpoint_seconds: how often the progress marker is written.
        """
        out = Path(out_dir)
        k = projection_sides(dim_per_layer)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise LmscopeError(f"store seed {seed!r} must be an integer.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise LmscopeError(f"batch size {batch_size!r} must be a positive integer.")
        if dtype not in STORE_DTYPES:
            raise LmscopeError(f"store dtype {dtype!r} is unknown; choose float32 or float16.")
        _check_modules_are_linear(modules)
        shape = getattr(rows, "shape", None)
        if shape is None or len(shape) != 2 or int(shape[0]) < 1 or int(shape[1]) < 2:
            raise LmscopeError(f"training rows must be a [rows ≥ 1, length ≥ 2] array of token ids; got shape {None if shape is None else tuple(shape)}.")
        try:
            identity = json.loads(json.dumps(model_identity or {}))
        except (TypeError, ValueError) as err:
            raise LmscopeError(f"the model identity must be JSON-serialisable ({err}); give strings and numbers.") from None

        projections, layers, offset = {}, {}, 0
        for name, layer_shape in layer_shapes(modules).items():
            projections[name] = draw_projections(int(seed), name, layer_shape, k, k)
            layers[name] = {"shape": list(layer_shape), "k_out": k, "k_in": k, "offset": offset}
            offset += k * k
        n_rows = int(shape[0])
        header = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "settings": {"dim_per_layer": int(dim_per_layer), "seed": int(seed), "batch_size": int(batch_size), "dtype": dtype},
            "objective": "summed next-token NLL of rows[:, 1:] given rows[:, :-1]",
            "projection": {"kind": "gaussian, entries N(0, 1/k), P_out then P_in per layer",
                           "layer_seed": "first 63 bits of sha256('lmscope-gradient-store-v1:{seed}:{layer}')",
                           "sha256": _projections_sha256(projections)},
            "layers": layers,
            "n_rows": n_rows,
            "dim": offset,
            "file": STORE_DTYPES[dtype],
            "model": identity,
        }
        with directory_lock(out):
            header["rows"] = _rows_digest(rows, _vocab_size(model))
            done = _resume_point(out, header)
            if done == n_rows:
                return cls(out, {**header, "rows_done": n_rows, "complete": True})
            _build_rows(model, modules, projections, rows, out, header, done, int(batch_size), np.dtype(dtype).newbyteorder("<"),
                        checkpoint_seconds, progress)
        store = cls(out, {**header, "rows_done": n_rows, "complete": True})
        store._projections = projections
        return store

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> "GradientStore":
        """The finished store in ``directory`` (its gradients memory-mapped read-only)."""
        directory = Path(directory)
        meta = _read_meta(directory)
        if meta is None:
            raise LmscopeError(f"{str(directory)!r} holds no gradient store ({STORE_JSON} is missing); build one with GradientStore.build.")
        if not meta.get("complete"):
            raise LmscopeError(f"the gradient store in {str(directory)!r} is unfinished ({meta.get('rows_done', 0)} of {meta.get('n_rows')} rows); "
                               "run the build again with the same settings to finish it.")
        return cls(directory, meta)

    # -- projecting queries --------------------------------------------------------------------

    def projections(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (P_out [k_o, O], P_in [k_i, I])}``, float32 CPU, redrawn from the seed and checked against store.json."""
        if self._projections is None:
            drawn = {name: draw_projections(self.seed, name, layer.shape, layer.k_out, layer.k_in) for name, layer in self.layers.items()}
            if _projections_sha256(drawn) != self.meta["projection"]["sha256"]:
                raise LmscopeError(f"torch {torch.__version__} draws other projection matrices than the ones the store in "
                                   f"{str(self.directory)!r} was built with; rebuild the store with this torch.")
            self._projections = drawn
        return self._projections

    def check_modules(self, modules: dict[str, nn.Linear]) -> None:
        """Refuse ``modules`` unless they are the store's layers (names, order and gradient shapes)."""
        _check_modules_are_linear(modules)
        shapes = layer_shapes(modules)
        if list(shapes) != list(self.layers):
            missing = [n for n in self.layers if n not in shapes]
            extra = [n for n in shapes if n not in self.layers]
            what = f"lacks {', '.join(missing[:3])}" if missing else (f"has {', '.join(extra[:3])} that the store does not" if extra else "orders them differently")
            raise LmscopeError(f"the given layers are not the store's (the selection {what}); use the layers the store was built over.")
        for name, shape in shapes.items():
            if shape != self.layers[name].shape:
                raise LmscopeError(f"layer {name!r} has gradient shape {list(shape)} but the store's is {list(self.layers[name].shape)}; "
                                   "this is another model's layer, use the model the store was built from.")

    def project_batch(self, model: nn.Module, modules: dict[str, nn.Linear], batch: TokenBatch) -> tuple[Tensor, Tensor]:
        """Projected gradients ``[B, D]`` (float32) of each row of ``batch`` (e.g. a :func:`~lmscope.influence.objectives.query_batch`),
        and its losses ``[B]`` (for queries: the measurement :math:`-\\log p(c \\mid p)`)."""
        self.check_modules(modules)
        was_training = model.training
        model.eval()
        try:
            return project_batch(model, modules, self.projections(), batch)
        finally:
            model.train(was_training)

    def project_gradients(self, gradients: dict[str, Tensor]) -> Tensor:
        """``{layer: [Q, O, I]}`` full gradients → ``[Q, D]`` float64 :math:`\\mathrm{vec}(P_{out} G P_{in}^\\top)` per layer, concatenated."""
        if not isinstance(gradients, dict) or not gradients:
            raise LmscopeError("query gradients must be a non-empty dict of layer name → [queries, d_out, d_in] tensors.")
        missing = [n for n in self.layers if n not in gradients]
        extra = [n for n in gradients if n not in self.layers]
        if extra:
            raise LmscopeError(f"query gradients have layer {extra[0]!r}, which is not in the store; compute them over the store's layers "
                               "(another model's or another selection's layers cannot be projected).")
        if missing:
            raise LmscopeError(f"query gradients lack the store's layer {missing[0]!r}; compute them over all {len(self.layers)} layers of the store.")
        n_queries = None
        parts = []
        for name, layer in self.layers.items():
            g = gradients[name]
            if not isinstance(g, Tensor) or g.ndim != 3 or tuple(g.shape[1:]) != layer.shape:
                got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise LmscopeError(f"query gradient of layer {name!r} has shape {got}; the store needs [queries, {layer.shape[0]}, {layer.shape[1]}].")
            if n_queries is None:
                n_queries = g.shape[0]
            elif g.shape[0] != n_queries:
                raise LmscopeError(f"query gradient of layer {name!r} holds {g.shape[0]} queries but earlier layers hold {n_queries}; "
                                   "give every layer the same queries.")
            p_out, p_in = (p.double() for p in self.projections()[name])
            parts.append((p_out @ g.detach().cpu().double() @ p_in.T).reshape(g.shape[0], -1))
        return torch.cat(parts, dim=1)

    # -- curvature -----------------------------------------------------------------------------

    def fisher(self, progress: Progress = no_progress) -> np.ndarray:
        """``[D, D]`` float64 :math:`\\hat F = \\frac1N \\sum_n \\phi_n \\phi_n^\\top`, cached in ``fisher.npy``."""
        self._check_fisher_dim()
        path = self.directory / FISHER_FILE
        if path.is_file():
            cached = np.load(path)
            if cached.shape == (self.dim, self.dim) and cached.dtype == np.float64:
                return cached
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for start, chunk in self._chunks():
            total += chunk.T @ chunk
            progress("gradient store: Fisher", chunk.shape[0], self.n_rows)
        fisher = (total / self.n_rows).numpy()
        _save_npy(path, fisher)
        return fisher

    def damping(self, damping: float | str = "heuristic") -> float:
        """The λ a damping setting means for this store: the number, or ``heuristic`` = 0.1 × mean eigenvalue of F̂ (0.1 · tr F̂ / D)."""
        value = parse_damping(damping)
        if value == "heuristic":
            return HEURISTIC_SCALE * float(np.trace(self.fisher())) / self.dim
        return float(value)

    def cholesky(self, damping: float | str = "heuristic") -> np.ndarray:
        """``[D, D]`` float64 lower Cholesky factor of :math:`\\hat F + \\lambda I`, cached (the last λ used)."""
        lam = self.damping(damping)
        path = self.directory / f"{CHOLESKY_PREFIX}{lam!r}.npy"
        if path.is_file():
            cached = np.load(path)
            if cached.shape == (self.dim, self.dim) and cached.dtype == np.float64:
                return cached
        damped = torch.from_numpy(self.fisher()).clone()
        damped.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            raise LmscopeError(f"the store's Fisher plus damping {lam:g} is not positive definite (the store has {self.n_rows} rows for "
                               f"{self.dim} dimensions); give a positive damping, e.g. heuristic.")
        factor_np = factor.numpy()
        _save_npy(path, factor_np)
        for stale in self.directory.glob(f"{CHOLESKY_PREFIX}*.npy"):
            if stale != path:
                stale.unlink(missing_ok=True)
        return factor_np

    def _check_fisher_dim(self) -> None:
        if self.dim > MAX_FISHER_DIM:
            raise LmscopeError(f"the store's dimension {self.dim} is too large for the fisher strategy (at most {MAX_FISHER_DIM}: a D × D "
                               "matrix is formed); build a store with a smaller dim-per-layer or score with identity.")

    # -- scoring -------------------------------------------------------------------------------

    def scores(self, queries: Tensor | np.ndarray, *, strategy: str = "identity", damping: float | str = "heuristic",
               progress: Progress = no_progress) -> np.ndarray:
        """Scores ``[Q, N]`` float64 of every stored row for projected queries ``[Q, D]``.

        ``identity``: :math:`\\phi_q^\\top \\phi_n`; ``fisher``: :math:`\\phi_q^\\top (\\hat F + \\lambda I)^{-1} \\phi_n`
        (the queries are preconditioned once with the cached Cholesky factor). float64 throughout.
        """
        if strategy not in STORE_STRATEGIES:
            raise LmscopeError(f"store scoring strategy {strategy!r} is unknown; choose identity or fisher.")
        q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, Tensor) else queries.detach().cpu()).double()
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise LmscopeError(f"projected queries have shape {tuple(q.shape)}; the store needs [queries, {self.dim}] "
                               "(project them with this store's project_batch or project_gradients).")
        if strategy == "fisher":
            self._check_fisher_dim()
            factor = torch.from_numpy(self.cholesky(damping))
            q = torch.cholesky_solve(q.T.contiguous(), factor).T
        out = np.empty((q.shape[0], self.n_rows), dtype=np.float64)
        for start, chunk in self._chunks():
            out[:, start : start + chunk.shape[0]] = (q @ chunk.T).numpy()
            progress("gradient store: scores", chunk.shape[0], self.n_rows)
        return out

    def _chunks(self):  # noqa: ANN202 - a generator of (start, [rows, D] float64)
        rows = max(1, SCORE_CHUNK_BYTES // (8 * self.dim))
        for start in range(0, self.n_rows, rows):
            yield start, torch.from_numpy(np.asarray(self.gradients[start : start + rows], dtype=np.float64))


# -- building, in pieces ---------------------------------------------------------------------------


def _check_modules_are_linear(modules: dict[str, nn.Linear]) -> None:
    if not isinstance(modules, dict) or not modules:
        raise LmscopeError("no layers given; pass the tracked linear layers, e.g. tracked_linears(model).")
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            raise LmscopeError(f"layer {name!r} is a {type(module).__name__}, not an nn.Linear; pass tracked_linears(model).")


def _read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / STORE_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise LmscopeError(f"{path} is not valid JSON ({err}); delete the store directory and build it again.") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise LmscopeError(f"{path} is not an lmscope gradient store; build one with GradientStore.build into an empty directory.")
    if meta.get("version") != STORE_VERSION:
        raise LmscopeError(f"the gradient store in {str(directory)!r} has format version {meta.get('version')!r}, this lmscope reads "
                           f"{STORE_VERSION}; build it again.")
    return meta


def _resume_point(out: Path, header: dict[str, Any]) -> int:
    """Rows already written by an earlier build with the same header (0 for a new store); refuses another store's directory."""
    meta = _read_meta(out)
    data = out / header["file"]
    size = header["n_rows"] * header["dim"] * np.dtype(header["settings"]["dtype"]).itemsize
    if meta is not None:
        differ = [key for key in header if meta.get(key) != header[key]]
        if differ:
            raise LmscopeError(f"{str(out)!r} holds a gradient store of other {', '.join(differ)}; delete it or build into another directory.")
        if data.is_file() and data.stat().st_size == size:
            return int(meta["rows_done"])
    for stale in [out / FISHER_FILE, *out.glob(f"{CHOLESKY_PREFIX}*.npy")]:
        stale.unlink(missing_ok=True)
    with open(data, "wb") as handle:  # zeros, sparse where the filesystem allows
        handle.truncate(size)
    atomic_write_json(out / STORE_JSON, {**header, "rows_done": 0, "complete": False})
    return 0


def _build_rows(model: nn.Module, modules: dict[str, nn.Linear], projections: dict[str, tuple[Tensor, Tensor]], rows: Any, out: Path,
                header: dict[str, Any], done: int, batch_size: int, dtype: np.dtype, checkpoint_seconds: float, progress: Progress) -> None:
    n_rows, dim = header["n_rows"], header["dim"]
    memmap = np.memmap(out / header["file"], dtype=dtype, mode="r+", shape=(n_rows, dim))
    device = next(model.parameters()).device
    projections = {name: (p_out.to(device), p_in.to(device)) for name, (p_out, p_in) in projections.items()}
    task = "gradient store"
    progress(task, done, n_rows)
    last_save = time.monotonic()
    was_training = model.training
    model.eval()
    try:
        for start in range(done, n_rows, batch_size):  # ``done`` is always a multiple of batch_size
            chunk = torch.as_tensor(np.asarray(rows[start : start + batch_size]).astype(np.int64))
            projected, _ = project_batch(model, modules, projections, training_batch(chunk))
            values = projected.numpy().astype(dtype)
            bad = ~np.isfinite(values).all(axis=1)
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                cause = "overflows float16; build with dtype float32" if np.isfinite(projected.numpy()[bad]).all() else \
                    "is not finite (the model's loss is NaN or infinite there); check the model's weights and the row"
                raise LmscopeError(f"training row {row}'s projected gradient {cause}.")
            memmap[start : start + chunk.shape[0]] = values
            progress(task, chunk.shape[0], n_rows)
            end = start + chunk.shape[0]
            if end < n_rows and time.monotonic() - last_save >= checkpoint_seconds:
                memmap.flush()
                atomic_write_json(out / STORE_JSON, {**header, "rows_done": end, "complete": False})
                last_save = time.monotonic()
        memmap.flush()
    finally:
        model.train(was_training)
        del memmap
    atomic_write_json(out / STORE_JSON, {**header, "rows_done": n_rows, "complete": True})


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
