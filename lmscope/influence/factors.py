r"""Curvature for influence functions: identity, diagonal, K-FAC and EK-FAC factors of the Fisher, per linear layer.

For one layer with per-sequence gradient :math:`G_n = \sum_t g_{n,t} \bar a_{n,t}^\top` (``[d_out, d_in+1]``,
see :mod:`lmscope.influence.taps`), the curvature block is approximated as (conventions as kronfluence's,
so that scores agree with it):

- ``identity``: no curvature; scores are gradient dot products.
- ``diagonal``: :math:`\mathrm{diag}(F)` with :math:`F_{ij} = \frac1N \sum_n (G_n)_{ij}^2`, the exact diagonal
  of the per-sequence Fisher.
- ``kfac``: :math:`F \approx A \otimes S` with :math:`A = \frac1{T_{tot}} \sum_{n,t} \bar a \bar a^\top` and
  :math:`S = \frac1{T_{tot}} \sum_{n,t} g g^\top` (means over all tokens), eigendecomposed in float64:
  :math:`A = Q_A \Lambda_A Q_A^\top`, :math:`S = Q_S \Lambda_S Q_S^\top`; eigenvalues :math:`\Lambda_S \otimes \Lambda_A`.
- ``ekfac`` (George et al. 2018; Grosse et al. 2023): the same eigenbasis with eigenvalues refitted on the
  data, :math:`\Lambda_{ij} = \frac1N \sum_n (Q_S^\top G_n Q_A)_{ij}^2` — the diagonal, in that basis, closest
  in Frobenius norm to the per-sequence Fisher :math:`\frac1N \sum_n \mathrm{vec}(G_n)\mathrm{vec}(G_n)^\top`.

``g`` is the gradient of the summed next-token loss with targets *sampled* from the model (the true
Fisher) or, with ``fisher="empirical"``, the data's own targets. Fitting reads rows in order, in batches;
with a checkpoint path it saves its sums every few batches and a killed fit resumes where it stopped,
ending with the same factors (targets are drawn from one seeded generator whose state is saved too).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_write_json, atomic_write_with
from lmscope.influence.objectives import activation_gradients_only, logits_of, sampled_targets, token_losses, training_batch
from lmscope.influence.taps import MODULE_SELECTIONS, LinearTaps, tracked_linears
from lmscope.progress import Progress, no_progress

Strategy = Literal["identity", "diagonal", "kfac", "ekfac"]
STRATEGIES: tuple[str, ...] = ("identity", "diagonal", "kfac", "ekfac")
FISHERS: tuple[str, ...] = ("sampled", "empirical")
FACTORS_FORMAT = "lmscope-influence-factors"
FACTORS_VERSION = 1
FACTORS_FILE = "factors.safetensors"
FACTORS_JSON = "factors.json"


@dataclass
class FactorSettings:
    """How curvature factors are fitted."""

    strategy: str = "ekfac"
    """``identity``, ``diagonal``, ``kfac`` or ``ekfac``."""
    modules: str = "blocks"
    """Which linear layers: ``blocks`` (attention and MLP of every decoder layer), ``mlp``, ``attention`` or ``all``."""
    fisher: str = "sampled"
    """``sampled``: targets drawn from the model (true Fisher, as Grosse et al. and kronfluence); ``empirical``: the data's targets."""
    batch_size: int = 8
    """Rows per forward/backward pass."""
    seed: int = 0
    """Seed of the generator the sampled targets are drawn from."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise LmscopeError(f"influence strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}.")
        if self.modules not in MODULE_SELECTIONS:
            raise LmscopeError(f"module selection {self.modules!r} is unknown; choose one of {', '.join(MODULE_SELECTIONS)}.")
        if self.fisher not in FISHERS:
            raise LmscopeError(f"fisher {self.fisher!r} is unknown; choose sampled (the true Fisher) or empirical.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise LmscopeError(f"batch size {self.batch_size!r} must be a positive integer.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerFactors:
    """One layer's factors; which are set depends on the strategy.

    Attributes:
        activation_eigenvectors: ``[I, I]`` float64 :math:`Q_A` (columns), ``I = d_in (+1 with a bias)``.
        activation_eigenvalues: ``[I]`` float64.
        gradient_eigenvectors: ``[O, O]`` float64 :math:`Q_S`.
        gradient_eigenvalues: ``[O]`` float64.
        lambda_matrix: ``[O, I]`` float64: EK-FAC's corrected eigenvalues, or the diagonal Fisher.
        activation_covariance, gradient_covariance: ``A`` ``[I, I]`` and ``S`` ``[O, O]`` (means over tokens).
    """

    activation_covariance: Tensor | None = None
    gradient_covariance: Tensor | None = None
    activation_eigenvectors: Tensor | None = None
    activation_eigenvalues: Tensor | None = None
    gradient_eigenvectors: Tensor | None = None
    gradient_eigenvalues: Tensor | None = None
    lambda_matrix: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {key: value for key, value in vars(self).items() if value is not None}


@dataclass
class Factors:
    """Fitted factors of every tracked layer, with what they were fitted on."""

    settings: FactorSettings
    layers: dict[str, LayerFactors]
    shapes: dict[str, tuple[int, int]]
    """``[d_out, d_in(+1)]`` of each layer's gradient."""
    n_sequences: int = 0
    n_tokens: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    """What they were fitted on (model, data, rows); written to ``factors.json``."""

    def save(self, directory: str | os.PathLike[str]) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        flat = {f"{name}::{key}": value.contiguous() for name, layer in self.layers.items() for key, value in layer.tensors().items()}
        atomic_write_with(directory / FACTORS_FILE, lambda path: save_file(flat, str(path)))
        atomic_write_json(directory / FACTORS_JSON, {
            "format": FACTORS_FORMAT,
            "version": FACTORS_VERSION,
            "settings": self.settings.to_dict(),
            "layers": {name: list(shape) for name, shape in self.shapes.items()},
            "n_sequences": self.n_sequences,
            "n_tokens": self.n_tokens,
            "source": self.source,
        })
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Factors":
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / FACTORS_JSON
        if not meta_path.is_file():
            raise LmscopeError(f"{str(directory)!r} holds no influence factors ({FACTORS_JSON} is missing); fit them with `lmscope influence fit`.")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise LmscopeError(f"{meta_path} is not valid JSON ({err}); fit the factors again.") from None
        if meta.get("format") != FACTORS_FORMAT:
            raise LmscopeError(f"{meta_path} is not an lmscope factors file; fit the factors with `lmscope influence fit`.")
        settings = FactorSettings(**meta["settings"])
        layers = {name: LayerFactors() for name in meta["layers"]}
        if settings.strategy != "identity":
            try:
                flat = load_file(str(directory / FACTORS_FILE))
            except Exception as err:  # safetensors raises several kinds on corrupt files
                raise LmscopeError(f"{directory / FACTORS_FILE} could not be read ({err}); fit the factors again.") from None
            for key, value in flat.items():
                name, attr = key.split("::", 1)
                setattr(layers[name], attr, value)
        return cls(settings, layers, {k: tuple(v) for k, v in meta["layers"].items()}, meta["n_sequences"], meta["n_tokens"], meta.get("source", {}))


def layer_shapes(modules: dict[str, nn.Linear]) -> dict[str, tuple[int, int]]:
    """``[d_out, d_in(+1)]`` of each layer's gradient (the bias as one more input column)."""
    return {name: (m.out_features, m.in_features + (m.bias is not None)) for name, m in modules.items()}


# -- accumulation ----------------------------------------------------------------------------------


def _backward(model: nn.Module, taps: LinearTaps, rows: Tensor, fisher: str, generator: torch.Generator) -> int:
    """One forward and backward pass of the (sampled or data) next-token loss of ``rows``; returns tokens counted."""
    batch = training_batch(rows).to(next(model.parameters()).device)
    taps.clear()
    logits = logits_of(model, batch.inputs)
    targets = sampled_targets(logits, generator) if fisher == "sampled" else batch.targets
    loss = token_losses(logits, targets, batch.mask).sum()
    loss.backward()
    taps.check_complete()
    return int(batch.mask.sum())


class _Accumulators:
    """Running sums of one pass (covariances, or lambda/diagonal) for every layer; a dict of tensors, so it can be saved."""

    def __init__(self, kind: str, shapes: dict[str, tuple[int, int]], bases: dict[str, tuple[Tensor, Tensor]] | None = None) -> None:
        self.kind = kind  # "covariance" or "lambda"
        self.bases = bases
        self.sums: dict[str, Tensor] = {}
        for name, (o, i) in shapes.items():
            if kind == "covariance":
                self.sums[f"{name}::A"] = torch.zeros(i, i, dtype=torch.float64)
                self.sums[f"{name}::S"] = torch.zeros(o, o, dtype=torch.float64)
            else:
                self.sums[f"{name}::L"] = torch.zeros(o, i, dtype=torch.float64)
        self.sequences = 0
        self.tokens = 0

    def update(self, taps: LinearTaps, n_rows: int, n_tokens: int) -> None:
        """Add one batch: products in float32 (as kronfluence), sums kept in float64."""
        for name in taps.modules:
            a, g = taps.activations[name], taps.output_grads[name]
            if self.kind == "covariance":
                fa, fg = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
                self.sums[f"{name}::A"] += (fa.T @ fa).double()
                self.sums[f"{name}::S"] += (fg.T @ fg).double()
            else:
                if self.bases is not None:
                    q_s, q_a = self.bases[name]
                    t, o, i = a.shape[1], g.shape[-1], a.shape[-1]
                    if t * (i * i + o * o) < o * i * (o + i):  # rotate the tokens' vectors, or the row gradients: the cheaper
                        per_sequence = torch.einsum("bto,bti->boi", g @ q_s, a @ q_a)
                    else:
                        per_sequence = q_s.T @ torch.einsum("bto,bti->boi", g, a) @ q_a
                else:
                    per_sequence = torch.einsum("bto,bti->boi", g, a)
                self.sums[f"{name}::L"] += per_sequence.square().sum(dim=0).double()
        self.sequences += n_rows
        self.tokens += n_tokens

    def state(self) -> dict[str, Tensor]:
        return {**self.sums, "__counts__": torch.tensor([self.sequences, self.tokens], dtype=torch.int64)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        for key in self.sums:
            self.sums[key] = state[key].double()
        self.sequences, self.tokens = (int(v) for v in state["__counts__"].tolist())


def _symmetric(matrix: Tensor) -> Tensor:
    """``(M + Mᵀ) / 2``: float32 products leave covariances asymmetric by rounding."""
    return 0.5 * (matrix + matrix.T)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, in float64."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return values.contiguous(), vectors.contiguous()  # contiguous, as when read back from a checkpoint: same kernels, same bits


def _passes(strategy: str) -> list[str]:
    return {"identity": [], "diagonal": ["lambda"], "kfac": ["covariance"], "ekfac": ["covariance", "lambda"]}[strategy]


# -- fitting ---------------------------------------------------------------------------------------


@dataclass
class FitState:
    """Where a fit stands: the pass, the next batch, the sums so far and the generator's state."""

    pass_index: int
    next_batch: int
    sums: dict[str, Tensor]
    generator: Tensor
    finished: dict[str, Tensor]
    """Results of finished passes (eigendecompositions), needed by the next."""


def fit_factors(
    model: nn.Module,
    rows: Any,
    settings: FactorSettings,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_seconds: float = 60.0,
    source: dict[str, Any] | None = None,
    progress: Progress = no_progress,
) -> Factors:
    """Fit ``settings.strategy``'s factors of ``model`` on training ``rows``.

    Args:
        model: a ``transformers`` causal LM (its parameters are not changed; gradients are).
        rows: ``[N, L]`` token ids (array, memmap or tensor), read in order in batches of ``settings.batch_size``.
        settings: strategy, layers, Fisher and seed.
        checkpoint: a file where the running sums are saved every ``checkpoint_seconds`` and at the end of
            each pass; a fit started again with the same file resumes from it. Removed when the fit ends.
        source: provenance recorded with the factors.
    """
    modules = tracked_linears(model, settings.modules)
    shapes = layer_shapes(modules)
    n_rows = int(rows.shape[0])
    if n_rows < 1:
        raise LmscopeError("no training rows to fit influence factors on; give at least one row.")
    passes = _passes(settings.strategy)
    n_batches = math.ceil(n_rows / settings.batch_size)
    generator = torch.Generator().manual_seed(settings.seed)
    state = FitState(0, 0, {}, generator.get_state(), {})
    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    if checkpoint_path is not None and checkpoint_path.is_file():
        state = _load_checkpoint(checkpoint_path, settings, n_rows)
        generator.set_state(state.generator)
    layers = {name: LayerFactors() for name in modules}
    tokens_seen = 0
    was_training = model.training
    model.eval()
    try:
        with activation_gradients_only(model):
            for pass_index, kind in enumerate(passes):
                if pass_index < state.pass_index:
                    continue
                bases = _bases(state.finished, modules) if kind == "lambda" and settings.strategy == "ekfac" else None
                acc = _Accumulators(kind, shapes, bases)
                if state.sums and pass_index == state.pass_index:
                    acc.load_state(state.sums)
                start = state.next_batch if pass_index == state.pass_index else 0
                last_save = time.monotonic()
                task = f"influence factors: {'covariances' if kind == 'covariance' else ('eigenvalue correction' if bases else 'diagonal')}"
                progress(task, start, n_batches)
                with LinearTaps(modules) as taps:
                    for b in range(start, n_batches):
                        chunk = torch.as_tensor(np.asarray(rows[b * settings.batch_size : (b + 1) * settings.batch_size]).astype(np.int64))
                        n_tok = _backward(model, taps, chunk, settings.fisher, generator)
                        acc.update(taps, chunk.shape[0], n_tok)
                        progress(task, 1, n_batches)
                        if checkpoint_path is not None and time.monotonic() - last_save > checkpoint_seconds and b + 1 < n_batches:
                            _save_checkpoint(checkpoint_path, FitState(pass_index, b + 1, acc.state(), generator.get_state(), state.finished), settings, n_rows)
                            last_save = time.monotonic()
                if kind == "covariance":
                    tokens_seen = acc.tokens
                    for name in modules:
                        a_cov = _symmetric(acc.sums[f"{name}::A"] / acc.tokens)
                        s_cov = _symmetric(acc.sums[f"{name}::S"] / acc.tokens)
                        a_val, a_vec = _eigh(a_cov)
                        s_val, s_vec = _eigh(s_cov)
                        state.finished.update({f"{name}::A": a_cov, f"{name}::S": s_cov, f"{name}::QA": a_vec, f"{name}::EA": a_val,
                                               f"{name}::QS": s_vec, f"{name}::ES": s_val})
                else:
                    tokens_seen = tokens_seen or acc.tokens
                    for name in modules:
                        state.finished[f"{name}::L"] = acc.sums[f"{name}::L"] / acc.sequences
                state = FitState(pass_index + 1, 0, {}, generator.get_state(), state.finished)
                if checkpoint_path is not None and pass_index + 1 < len(passes):
                    _save_checkpoint(checkpoint_path, state, settings, n_rows)
    finally:
        model.train(was_training)
    for name in modules:
        f = state.finished
        layer = layers[name]
        if f"{name}::A" in f:
            layer.activation_covariance, layer.gradient_covariance = f[f"{name}::A"], f[f"{name}::S"]
            layer.activation_eigenvectors, layer.activation_eigenvalues = f[f"{name}::QA"], f[f"{name}::EA"]
            layer.gradient_eigenvectors, layer.gradient_eigenvalues = f[f"{name}::QS"], f[f"{name}::ES"]
        if f"{name}::L" in f:
            layer.lambda_matrix = f[f"{name}::L"]
    if checkpoint_path is not None and checkpoint_path.exists():
        checkpoint_path.unlink()
    return Factors(settings, layers, shapes, n_rows if passes else 0, tokens_seen, dict(source or {}, rows=n_rows))


def _bases(finished: dict[str, Tensor], modules: dict[str, nn.Linear]) -> dict[str, tuple[Tensor, Tensor]]:
    """Each layer's eigenbases in float32, for rotating per-token activations and gradients."""
    return {name: (finished[f"{name}::QS"].float().contiguous(), finished[f"{name}::QA"].float().contiguous()) for name in modules}


def _save_checkpoint(path: Path, state: FitState, settings: FactorSettings, n_rows: int) -> None:
    from safetensors.torch import save_file

    tensors = {f"sums/{k}": v.contiguous() for k, v in state.sums.items()}
    tensors.update({f"finished/{k}": v.contiguous() for k, v in state.finished.items()})
    tensors["generator"] = state.generator
    meta = {"settings": json.dumps(settings.to_dict(), sort_keys=True), "n_rows": str(n_rows),
            "pass_index": str(state.pass_index), "next_batch": str(state.next_batch)}
    atomic_write_with(path, lambda p: save_file(tensors, str(p), metadata=meta))


def _load_checkpoint(path: Path, settings: FactorSettings, n_rows: int) -> FitState:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # own, aligned memory
    except Exception as err:  # a torn file cannot happen (atomic writes), but a foreign one can
        raise LmscopeError(f"the fit checkpoint {str(path)!r} could not be read ({err}); delete it to start the fit afresh.") from None
    if meta.get("settings") != json.dumps(settings.to_dict(), sort_keys=True) or meta.get("n_rows") != str(n_rows):
        raise LmscopeError(f"the fit checkpoint {str(path)!r} is of another fit (other settings or rows); delete it or fit into another directory.")
    return FitState(
        int(meta["pass_index"]), int(meta["next_batch"]),
        {k[len("sums/"):]: v for k, v in tensors.items() if k.startswith("sums/")},
        tensors["generator"],
        {k[len("finished/"):]: v for k, v in tensors.items() if k.startswith("finished/")},
    )
