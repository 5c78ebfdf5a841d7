r"""Train a sparse autoencoder (or transcoder) on an activation store or a model stream: deterministic, resumable, fast for top-k.

One step on a batch of ``N`` rows (``x``: ``hook``; target ``y``: ``x`` itself, or the same rows of
``out_hook`` for a transcoder), both multiplied by their normalisation scales::

    pre   = (x − b_dec·[SAE]) W_enc + b_enc                         [N, W]
    f     = activation(pre)                                          [N, W]
    ŷ     = f W_dec + b_dec                                          [N, d_out]
    loss  = ‖y − ŷ‖² (summed over dims, mean over rows) + the architecture's term:

    relu       + λ_t · Σ_i f_i ‖W_dec,i‖       norm-weighted L1; decoder unconstrained; dead latents resampled
    topk       + (1/32) · AuxK                 decoder rows unit-norm; dead latents fed the residual
    batchtopk  + (1/32) · AuxK                 as topk; plus the inference threshold (below)
    jumprelu   + λ_t · L0 (STE)                decoder rows unit-norm; threshold learned through STEs

(:mod:`lmscope.sae.losses` has the maths.) ``λ_t`` ramps linearly from 0 over the first
``sparsity_warmup`` of training (Conerly et al. 2024). Adam (β = 0.9, 0.999) on gradients clipped to a
global norm of ``grad_clip_norm`` (1, as SAELens); learning rate
warmed up linearly, then linear decay to 0 over the last ``decay_fraction`` of steps, or cosine.

**Normalisation.** Before training, a fixed seeded sample (the first up to 65 536 rows of the
epoch-0 stream) gives a scalar ``s`` with :math:`\mathbb{E}\lVert s x \rVert^2 = d_{in}` (SAELens's
``expected_average_only_in`` uses :math:`\sqrt{d}/\mathbb{E}\lVert x\rVert`, the same up to the spread of the
norms); a transcoder's target gets its own ``t`` with :math:`\mathbb{E}\lVert t y\rVert^2 = d_{out}`.
``b_dec`` starts at the mean scaled target of that sample. A ``topk``/``batchtopk`` SAE's encoder
(seeded: the transpose of the unit decoder rows) is then multiplied by the scalar that makes the
initial reconstruction of the sample least-squares optimal (:func:`fit_encoder_scale`; top-k selection
does not depend on that scale; ``fit_encoder_scale=False`` skips it). :func:`train_sae` returns the SAE with
the scales folded in (:func:`lmscope.sae.model.fold_scales`): it reads raw activations.

**Top-k speed.** For ``topk``/``batchtopk`` only the encoder's forward product is dense. The
active latents form a sparse pattern (:class:`Active`); the decoder reads only their rows
(``embedding_bag``) and every gradient is a sparse product over that pattern (:class:`GatherPreActs`,
:class:`SparseDecode`), so the rest of a step costs :math:`O(N k d)` instead of :math:`O(N W d)`
(4-5× faster per step at width 16·d_in, k = 32 on CPU). ``sparse_decode=False`` runs the same
maths densely (equal to float rounding; for checking). Adam uses the fused kernel where available.

**Dead latents.** A latent is dead once it has not fired over the last ``dead_tokens`` training
tokens (counted per latent: tokens since it last fired).

**BatchTopK threshold.** Each batch's smallest kept (positive) activation is averaged over
batches — a plain mean over the first ``H = max(1, steps // 10)`` batches, then an exponential
average of horizon ``H`` — and stored as ``log_threshold`` (one value for every latent), so
:meth:`~lmscope.sae.model.SparseAutoencoder.encode` at inference is a JumpReLU whose L0 is about ``k``.

**Checkpoints.** Every ``checkpoint_every`` steps and at the end, ``out_dir/checkpoint.pt`` is
written atomically (weights, normalisation, Adam state, step, dead counters, threshold statistics,
the log so far). The data position is a pure function of the step (``drop_last`` epochs of
``n_rows // batch_size`` batches, epoch ``e`` shuffled by ``(seed, e)``), so a run killed at any
point and restarted with the same config and store ends bitwise identical to an uninterrupted one
(on CPU, with the same number of threads; CUDA kernels such as ``index_add_`` are not
deterministic). Resuming mid-epoch re-reads that epoch's skipped batches. A second trainer on the
same ``out_dir`` waits for the first (a lock file) and then resumes or finds the run finished.
``out_dir/train_log.parquet`` (one row per ``log_every`` steps) is rewritten with every checkpoint.

**From a model stream.** :func:`train_saes_from_model` trains several configs at once on batches of
an :class:`~lmscope.sae.stream.ActivationStream` (one forward pass per batch of contexts captures
every hook; a mixing buffer shuffles the rows). Everything above holds, with two differences: the
normalisation sample is the stream's first batches, and resuming regenerates the stream up to the
checkpointed step (forward passes only) instead of re-reading a store. The checkpoint format is
the same; its data fingerprint is the stream's identity instead of the stores' hashes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from itertools import chain, islice
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmscope.activations.reader import ActivationStore
from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_write_with, directory_lock
from lmscope.progress import Progress, no_progress
from lmscope.sae import losses
from lmscope.sae.model import ARCHS, Arch, SaeShape, SparseAutoencoder, fold_scales
from lmscope.sae.stream import ActivationStream, StreamConfig

CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_LOG_FILE = "train_log.parquet"
CHECKPOINT_FORMAT = "lmscope.sae.checkpoint"
CHECKPOINT_VERSION = 1
NORM_SAMPLE_ROWS = 1 << 16
"""Rows of the seeded sample that fixes the normalisation scales and the initial ``b_dec``."""
DEFAULT_K = 32
DEFAULT_DEAD_TOKENS = 10_000_000
DECAYS = ("linear", "cosine", "constant")
TASK = "train sae"
REPLAY_TASK = "replay activation stream"

Decay = Literal["linear", "cosine", "constant"]


@dataclass
class SaeTrainConfig:
    """How to train one SAE or transcoder. Saved in every checkpoint; a resumed run must use the same one."""

    hook: str
    """Hook whose activations the SAE reads (a hook of the activation store)."""
    out_hook: str | None = None
    """Transcoder: the hook it predicts from ``hook`` (same store rows). ``None``: an ordinary SAE reconstructing ``hook``."""
    arch: Arch = "topk"
    """Activation: ``relu`` (L1), ``topk`` (Gao et al.), ``batchtopk`` (Bussmann et al.) or ``jumprelu`` (Rajamanoharan et al.)."""
    width: int | None = None
    """Number of latents. ``None``: ``expansion_factor × d_in``."""
    expansion_factor: int = 16
    """Latents per input dimension, used when ``width`` is not given."""
    k: int | None = None
    """``topk``: active latents per token; ``batchtopk``: on average. ``None``: 32. Must be unset for ``relu``/``jumprelu``."""
    l1_coefficient: float = 5.0
    """``relu``: weight λ of the norm-weighted L1 penalty (Conerly et al. use 5 at this normalisation)."""
    l0_coefficient: float = 1.0
    """``jumprelu``: weight λ of the L0 penalty (in units where E‖x‖² = d_in; raise it for fewer active latents)."""
    jumprelu_bandwidth: float = losses.DEFAULT_BANDWIDTH
    """``jumprelu``: width ε of the rectangle kernel of the straight-through estimators (Gemma Scope: 1e-3; SAELens uses 0.05)."""
    jumprelu_init_threshold: float = 0.1
    """``jumprelu``: every latent's threshold θ at the start (normalised units; Adam moves log θ by about ``lr`` per step)."""
    sparsity_warmup: float = 0.05
    """``relu``/``jumprelu``: fraction of the steps over which λ ramps linearly from 0 to its value."""
    aux_k: int | None = None
    """``topk``/``batchtopk``: dead latents per token in the AuxK loss. ``None``: ``d_out // 2`` (Gao et al.); 0 disables AuxK."""
    aux_coefficient: float = losses.DEFAULT_AUX_COEFFICIENT
    """``topk``/``batchtopk``: weight of the AuxK loss (Gao et al.: 1/32)."""
    dead_tokens: int | None = None
    """A latent is dead after not firing over this many training tokens. ``None``: min(10M, total tokens // 10), at least one batch."""
    lr: float | None = None
    """Adam learning rate. ``None``: ``2e-4 / sqrt(width / 2**14)`` (sparsify's rule, from Gao et al.'s scaling fit)."""
    warmup_steps: int | None = None
    """Steps of linear learning-rate warmup from 0. ``None``: min(1000, steps // 20)."""
    decay: Decay = "linear"
    """Learning-rate decay: ``linear`` to 0 over the last ``decay_fraction`` of steps, ``cosine`` to 0 after warmup, or ``constant``."""
    decay_fraction: float = 0.2
    """``linear`` decay: the final fraction of steps over which the learning rate falls to 0."""
    batch_size: int = 4096
    """Tokens (rows) per step."""
    total_tokens: int | None = None
    """Training tokens (rounded down to whole batches). ``None``: ``epochs`` passes over the store."""
    epochs: int = 1
    """Passes over the store, used when ``total_tokens`` is not given (each drops the last partial batch)."""
    seed: int = 0
    """Seeds the initial weights, the data order (epoch ``e`` is shuffled by ``(seed, e)``) and resampling."""
    resample_every: int | None = None
    """``relu``: every this many steps, resample dead latents toward badly reconstructed inputs (Towards Monosemanticity). ``None``: never."""
    checkpoint_every: int = 1000
    """Steps between checkpoints in ``out_dir`` (one is always written at the end)."""
    log_every: int = 10
    """Steps between rows of ``train_log.parquet`` (the last step is always logged)."""
    sparse_decode: bool = True
    """``topk``/``batchtopk``: decode and back-propagate through the active latents only (same maths as dense, much faster)."""
    fit_encoder_scale: bool = True
    """``topk``/``batchtopk`` SAEs (not transcoders, not runs started from ``init``): at the start, multiply the seeded
    encoder by the scalar that minimises the squared error of the initial reconstruction on the normalisation sample
    (:func:`fit_encoder_scale`; one forward pass). The seeded encoder, the transpose of unit decoder rows, reconstructs
    each row from its ``k`` largest projections and overshoots (about 2.5× at d_in 128, k 32): Adam moves each weight
    by about ``lr`` per step, so undoing that takes a good part of a short run (held-out FVU 0.077 → 0.059 after 160
    steps at width 2048, k 32; BENCHMARKS.md, SAE training). ``False``: keep the seeded encoder. Ignored otherwise."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this before each Adam step (SAELens does, at 1). The gradient norm falls ~10×
    early in training; without the clip Adam's second moment remembers the large early gradients and its steps
    shrink (see BENCHMARKS.md, SAE training). ``None``: no clipping."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise LmscopeError(f"SAE architecture {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}.")
        if not self.hook:
            raise LmscopeError("no hook given to train on; set hook to one of the activation store's hooks.")
        if self.out_hook == self.hook:
            raise LmscopeError(f"out_hook equals hook ({self.hook!r}); leave out_hook unset to train an ordinary SAE.")
        if self.width is not None and self.width < 1:
            raise LmscopeError(f"width={self.width} must be at least 1 (or unset, to use expansion_factor).")
        if self.expansion_factor < 1:
            raise LmscopeError(f"expansion_factor={self.expansion_factor} must be at least 1.")
        topk_like = self.arch in ("topk", "batchtopk")
        if topk_like:
            k = DEFAULT_K if self.k is None else self.k
            if k < 1:
                raise LmscopeError(f"k={self.k} must be at least 1.")
            if self.width is not None and k > self.width:
                raise LmscopeError(f"k={k} exceeds the width {self.width}; choose k ≤ width or a wider SAE.")
        else:
            if self.k is not None:
                raise LmscopeError(f"k is set ({self.k}) but a {self.arch} SAE has no k; leave it out or use arch topk.")
            if self.aux_k is not None:
                raise LmscopeError(f"aux_k is set ({self.aux_k}) but only topk/batchtopk SAEs have an AuxK loss; leave it out.")
        if self.resample_every is not None and self.arch != "relu":
            raise LmscopeError(f"resample_every is set but only relu SAEs resample dead latents (a {self.arch} SAE has "
                      f"{'AuxK' if topk_like else 'a learned threshold'}); leave it out.")
        for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise LmscopeError(f"{name}={value} must be a finite non-negative number.")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise LmscopeError(f"{name}={value} must be positive.")
        for name in ("sparsity_warmup", "decay_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise LmscopeError(f"{name}={value} must be a fraction between 0 and 1.")
        if self.aux_k is not None and self.aux_k < 0:
            raise LmscopeError(f"aux_k={self.aux_k} must be 0 (no AuxK) or more.")
        if self.grad_clip_norm is not None and not (math.isfinite(self.grad_clip_norm) and self.grad_clip_norm > 0):
            raise LmscopeError(f"grad_clip_norm={self.grad_clip_norm} must be positive (or unset for no clipping).")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise LmscopeError(f"lr={self.lr} must be positive (or unset for the width-scaled default).")
        if self.decay not in DECAYS:
            raise LmscopeError(f"decay {self.decay!r} is unknown; choose one of {', '.join(DECAYS)}.")
        if self.batch_size < 1:
            raise LmscopeError(f"batch_size={self.batch_size} must be at least 1.")
        if self.total_tokens is not None and self.total_tokens < self.batch_size:
            raise LmscopeError(f"total_tokens={self.total_tokens} is less than one batch of {self.batch_size}; "
                      "raise total_tokens or lower batch_size.")
        if self.epochs < 1:
            raise LmscopeError(f"epochs={self.epochs} must be at least 1.")
        if self.seed < 0:
            raise LmscopeError(f"seed={self.seed} must be a non-negative integer.")
        for name in ("dead_tokens", "warmup_steps", "resample_every"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup_steps" else 1):
                raise LmscopeError(f"{name}={value} must be at least {0 if name == 'warmup_steps' else 1} (or unset).")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise LmscopeError(f"{name}={getattr(self, name)} must be at least 1.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SaeTrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LmscopeError(f"SAE training config has unknown fields {', '.join(unknown)}; remove them.")
        return cls(**data)


@dataclass(frozen=True)
class TrainPlan:
    """What a config means for one store: every default resolved."""

    d_in: int
    d_out: int
    width: int
    k: int | None
    aux_k: int
    steps: int
    steps_per_epoch: int
    batch_size: int
    tokens: int
    """Training tokens, ``steps × batch_size``."""
    dead_tokens: int
    lr: float
    warmup_steps: int

    def shape(self, config: SaeTrainConfig) -> SaeShape:
        return SaeShape(d_in=self.d_in, width=self.width, arch=config.arch, k=self.k, hook=config.hook,
                        out_hook=config.out_hook, d_out=self.d_out if config.out_hook is not None else None)


def plan_training(config: SaeTrainConfig, store: ActivationStore, out_store: ActivationStore | None = None) -> TrainPlan:
    """Resolve ``config``'s defaults against ``store`` (and ``out_store``); LmscopeError if they do not fit."""
    d_in = store.d(config.hook)
    target_store = _target_store(config, store, out_store)
    d_out = target_store.d(config.out_hook) if config.out_hook is not None else d_in
    width, k = _width_and_k(config, d_in)
    n_rows = store.n_rows
    if n_rows < config.batch_size:
        raise LmscopeError(f"activation store {store.root} has {n_rows} rows, fewer than one batch of {config.batch_size}; "
                           "lower batch_size or capture more tokens.")
    steps_per_epoch = n_rows // config.batch_size
    steps = config.total_tokens // config.batch_size if config.total_tokens is not None else config.epochs * steps_per_epoch
    return _resolve_plan(config, d_in, d_out, width, k, steps, steps_per_epoch)


def plan_streamed_training(config: SaeTrainConfig, widths: dict[str, int]) -> TrainPlan:
    """Resolve ``config``'s defaults for a model stream whose hooks have ``widths`` values per row.

    A stream has no epochs: ``total_tokens`` must be set; ``steps_per_epoch`` is the whole run.
    """
    for hook in (config.hook, config.out_hook):
        if hook is not None and hook not in widths:
            raise LmscopeError(f"hook {hook!r} is not streamed; the stream holds {', '.join(widths)}.")
    if config.total_tokens is None:
        raise LmscopeError(f"the config for {_label(config)} has no total_tokens; a model stream has no epochs, "
                           "so set total_tokens (the training tokens).")
    d_in = widths[config.hook]
    d_out = widths[config.out_hook] if config.out_hook is not None else d_in
    width, k = _width_and_k(config, d_in)
    steps = config.total_tokens // config.batch_size
    return _resolve_plan(config, d_in, d_out, width, k, steps, steps)


def _width_and_k(config: SaeTrainConfig, d_in: int) -> tuple[int, int | None]:
    width = config.width if config.width is not None else config.expansion_factor * d_in
    k = None
    if config.arch in ("topk", "batchtopk"):
        k = DEFAULT_K if config.k is None else config.k
        if k > width:
            raise LmscopeError(f"k={k} exceeds the SAE width {width} (expansion factor {config.expansion_factor} × d_in {d_in}); "
                               "lower k or raise the width.")
    return width, k


def _resolve_plan(config: SaeTrainConfig, d_in: int, d_out: int, width: int, k: int | None, steps: int,
                  steps_per_epoch: int) -> TrainPlan:
    tokens = steps * config.batch_size
    aux_k = 0 if k is None else (max(1, d_out // 2) if config.aux_k is None else config.aux_k)
    dead_tokens = config.dead_tokens if config.dead_tokens is not None else max(config.batch_size, min(DEFAULT_DEAD_TOKENS, tokens // 10))
    lr = config.lr if config.lr is not None else 2e-4 / math.sqrt(width / 2**14)
    warmup = config.warmup_steps if config.warmup_steps is not None else min(1000, steps // 20)
    return TrainPlan(d_in=d_in, d_out=d_out, width=width, k=k, aux_k=aux_k, steps=steps, steps_per_epoch=steps_per_epoch,
                     batch_size=config.batch_size, tokens=tokens, dead_tokens=dead_tokens, lr=lr, warmup_steps=warmup)


def train_sae(
    config: SaeTrainConfig,
    store: ActivationStore,
    out_dir: str | os.PathLike[str],
    *,
    progress: Progress = no_progress,
    out_store: ActivationStore | None = None,
    device: str | torch.device | None = None,
    init: dict[str, Tensor] | None = None,
) -> SparseAutoencoder:
    """Train an SAE (or transcoder) on ``store`` as ``config`` says; resume from ``out_dir`` if a run stopped there.

    Args:
        config: what to train (see :class:`SaeTrainConfig`).
        store: the activation store holding ``config.hook`` (and ``config.out_hook``, unless ``out_store`` has it).
        out_dir: where ``checkpoint.pt`` and ``train_log.parquet`` go; a checkpoint there with the same
            config and store is resumed (a finished one returns at once), one with another config is refused.
        progress: called ``progress("train sae", tokens_in_step, total_tokens, l0=, fvu=, dead=)`` every step.
        out_store: transcoder only: a store with the same rows (same capture) holding ``config.out_hook``.
        device: where to train (``None``: CUDA if available, else CPU). Bitwise reproducibility holds on CPU.
        init: start from these parameters instead of the seeded initialisation: another run's
            normalised parameters (:func:`trained_parameters`), of the same shape. Only the
            normalisation scales are measured afresh on ``store``; ``W_enc``, ``b_enc``, ``W_dec``,
            ``b_dec`` (and the threshold) are copied, so each latent starts as the latent it was.
            A checkpoint in ``out_dir`` resumes only with the same ``init``.

    Returns:
        The trained SAE with its normalisation folded in: it reads and writes raw activations
        (``input_scale == output_scale == 1``). Saving it is the caller's (:mod:`lmscope.sae.io`).
    """
    plan = plan_training(config, store, out_store)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    with directory_lock(out_dir):  # a second trainer on the same out_dir waits, then resumes (or finds it done)
        run = _Run(config, plan, _store_source(store, out_store), device, init)
        checkpoint = out_dir / CHECKPOINT_FILE
        if checkpoint.exists():
            run.load(checkpoint)
            if run.step:
                progress(TASK, run.step * plan.batch_size, plan.tokens)
        else:
            y = _sample(_target_store(config, store, out_store), config.out_hook, config.seed) if config.out_hook else None
            run.initialise(_sample(store, config.hook, config.seed), y)
        if run.step < plan.steps:
            for x, y in _batches(config, plan, store, out_store, run.step, device):
                metrics = run.train_step(x, y)
                progress(TASK, plan.batch_size, plan.tokens, l0=metrics["l0"], fvu=metrics["fvu"], dead=metrics["dead_fraction"])
                if run.step % config.checkpoint_every == 0 and run.step < plan.steps:
                    run.save(out_dir)
                if run.step >= plan.steps:
                    break
        run.save(out_dir)
    return fold_scales(run.sae)


def train_saes_from_model(
    configs: Sequence[SaeTrainConfig],
    hooked: Any,
    corpus: Any,
    out_dirs: Sequence[str | os.PathLike[str]],
    *,
    stream: StreamConfig,
    seed: int | None = None,
    progress: Progress = no_progress,
    device: str | torch.device | None = None,
    init: Sequence[dict[str, Tensor] | None] | None = None,
) -> list[SparseAutoencoder]:
    """Train several SAEs/transcoders at once on activations streamed from ``hooked``; resume each from its ``out_dir``.

    One :class:`~lmscope.sae.stream.ActivationStream` over the union of the configs' hooks feeds
    every config: one forward pass per ``stream.context_batch`` contexts, and every step gives each
    config the same rows (its ``hook``, and ``out_hook`` for a transcoder). Each config trains
    exactly as it would alone on a stream of its own hooks with the same ``seed`` (bitwise on CPU).

    **Normalisation.** The sample is the first ``max(1, min(steps, 65 536 // batch_size))`` batches of
    the stream (the first batches trained on), instead of a store's seeded sample.

    **Resume.** The stream is a pure function of ``(model, corpus, stream, batch_size, seed)``, so a
    checkpoint needs no buffer: a restarted run regenerates the stream from its start and skips the
    SAE work of every step before its checkpoint. The cost is the forward passes of those steps
    again (no backward, no SAE), about the model's share of the time already spent; in exchange the
    checkpoint stays the store runs' format and size. Runs with checkpoints at different steps
    each join at their own step. Bitwise identical to an uninterrupted run on CPU.

    Args:
        configs: what to train; all with the same ``batch_size`` and ``total_tokens // batch_size``
            steps (``total_tokens`` must be set: a stream has no epochs).
        hooked: a :class:`~lmscope.models.hooks.HookedModel`.
        corpus: a :class:`~lmscope.data.tokenized.TokenizedCorpus`.
        out_dirs: one directory per config (``checkpoint.pt``, ``train_log.parquet``), all different.
        stream: contexts and mixing buffer (:class:`~lmscope.sae.stream.StreamConfig`).
        seed: seeds the stream's permutations; ``None``: the configs' ``seed`` (they must then agree).
            Each config's own ``seed`` still seeds its initial weights and resampling.
        progress: ``progress("train sae", batch_size, total_tokens, l0=, fvu=, dead=)`` per config and step
            (the task is ``"train sae <i>/<n> <hook>"`` when there are several); while a resumed run
            regenerates skipped steps, ``progress("replay activation stream", batch_size, tokens)``.
        device: where to train and buffer (``None``: CUDA if available, else CPU).
        init: per config, parameters to start from (see :func:`train_sae`), or ``None``.

    Returns:
        The trained SAEs, in the order of ``configs``, with their normalisation folded in.
    """
    configs, out_dirs = list(configs), [Path(d) for d in out_dirs]
    inits = list(init) if init is not None else [None] * len(configs)
    batch_size, steps, seed = _common_stream_settings(configs, out_dirs, inits, seed)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    hooks = list(dict.fromkeys(h for c in configs for h in (c.hook, c.out_hook) if h is not None))
    data = ActivationStream(hooked, corpus, hooks, stream, batch_size=batch_size, seed=seed, device=device)
    widths = data.widths()
    plans = [plan_streamed_training(config, widths) for config in configs]
    source = {"stream": data.identity}
    tasks = [TASK] if len(configs) == 1 else [f"{TASK} {i + 1}/{len(configs)} {_label(c)}" for i, c in enumerate(configs)]
    with ExitStack() as locks:
        for out_dir in sorted({d.resolve() for d in out_dirs}):  # one order for every trainer: no deadlock
            locks.enter_context(directory_lock(out_dir))
        runs = [_Run(config, plan, source, device, start) for config, plan, start in zip(configs, plans, inits)]
        fresh = []
        for run, out_dir, task in zip(runs, out_dirs, tasks):
            if (out_dir / CHECKPOINT_FILE).exists():
                run.load(out_dir / CHECKPOINT_FILE)
                if run.step:
                    progress(task, run.step * batch_size, run.plan.tokens)
            else:
                fresh.append(run)
        if any(run.step < steps for run in runs):
            batches = iter(data)
            head = list(islice(batches, max(1, min(steps, NORM_SAMPLE_ROWS // batch_size))))
            if fresh:
                sample = {hook: torch.cat([batch[hook] for batch in head]).to("cpu", torch.float64) for hook in hooks}
                for run in fresh:
                    run.initialise(sample[run.config.hook], sample[run.config.out_hook] if run.config.out_hook else None)
            _train_together(runs, out_dirs, tasks, chain(head, batches), steps, progress)
        for run, out_dir in zip(runs, out_dirs):
            run.save(out_dir)
    return [fold_scales(run.sae) for run in runs]


def _common_stream_settings(configs: list[SaeTrainConfig], out_dirs: list[Path], inits: list[Any],
                            seed: int | None) -> tuple[int, int, int]:
    """``(batch_size, steps, stream seed)`` shared by ``configs``; LmscopeError naming any mismatch."""
    if not configs:
        raise LmscopeError("no SAE configs were given; pass at least one SaeTrainConfig.")
    if len(out_dirs) != len(configs) or len(inits) != len(configs):
        raise LmscopeError(f"{len(configs)} configs need as many out_dirs (got {len(out_dirs)}) and inits (got {len(inits)}).")
    if len({d.resolve() for d in out_dirs}) != len(out_dirs):
        raise LmscopeError("two configs share an out_dir; give each config its own directory.")
    for config in configs:
        if config.total_tokens is None:
            raise LmscopeError(f"the config for {_label(config)} has no total_tokens; a model stream has no epochs, "
                               "so set total_tokens (the training tokens).")

    def check(what: str, value: Any, remedy: str) -> None:
        values = [value(c) for c in configs]
        if len(set(values)) > 1:
            listed = ", ".join(f"{v} for {_label(c)}" for c, v in zip(configs, values))
            raise LmscopeError(f"the configs disagree on {what} ({listed}); {remedy}.")

    same_batches = "one stream feeds every config the same batches, so make them equal"
    check("batch_size", lambda c: c.batch_size, same_batches)
    check("steps (total_tokens // batch_size)", lambda c: c.total_tokens // c.batch_size, same_batches)
    if seed is None:
        check("seed", lambda c: c.seed, "the stream shuffles with one seed, so make them equal or pass the stream's seed")
        seed = configs[0].seed
    return configs[0].batch_size, configs[0].total_tokens // configs[0].batch_size, seed


def _train_together(runs: list[_Run], out_dirs: list[Path], tasks: list[str], batches: Iterator[dict[str, Tensor]],
                    steps: int, progress: Progress) -> None:
    """Feed step ``s`` of ``batches`` to every run at step ``s``; runs ahead (resumed later) wait for their step."""
    first = min(run.step for run in runs)
    for step, batch in enumerate(batches):
        if step >= steps:
            break
        active = [i for i, run in enumerate(runs) if run.step == step]
        if not active:
            progress(REPLAY_TASK, runs[0].plan.batch_size, first * runs[0].plan.batch_size)
            continue
        for i in active:
            run, config = runs[i], runs[i].config
            y = batch[config.out_hook] if config.out_hook is not None else None
            metrics = run.train_step(batch[config.hook], y)
            progress(tasks[i], run.plan.batch_size, run.plan.tokens, l0=metrics["l0"], fvu=metrics["fvu"],
                     dead=metrics["dead_fraction"])
            if run.step % config.checkpoint_every == 0 and run.step < steps:
                run.save(out_dirs[i])


def _label(config: SaeTrainConfig) -> str:
    return config.hook if config.out_hook is None else f"{config.hook} → {config.out_hook}"


def trained_parameters(out_dir: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The normalised parameters (no scales) of the run checkpointed in ``out_dir``, for ``train_sae(init=...)``."""
    path = Path(out_dir) / CHECKPOINT_FILE
    state = _read_checkpoint(path)
    return {name: value for name, value in state["sae"].items() if name not in _SCALES}


_SCALES = ("input_scale", "output_scale")


def _digest(parameters: dict[str, Tensor] | None) -> str | None:
    if parameters is None:
        return None
    import hashlib

    h = hashlib.sha256()
    for name in sorted(parameters):
        h.update(name.encode())
        h.update(parameters[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# -- data ----------------------------------------------------------------------------------------


def _target_store(config: SaeTrainConfig, store: ActivationStore, out_store: ActivationStore | None) -> ActivationStore:
    if out_store is None:
        return store
    if config.out_hook is None:
        raise LmscopeError("out_store is given but the config has no out_hook; set out_hook to train a transcoder, or drop out_store.")
    starts = [s["row_start"] for s in store.manifest["shards"]]
    if out_store.n_rows != store.n_rows or [s["row_start"] for s in out_store.manifest["shards"]] != starts:
        raise LmscopeError(f"out_store {out_store.root} does not hold the same rows as {store.root} "
                           f"({out_store.n_rows} vs {store.n_rows} rows, or other shards); capture both hooks in one run.")
    return out_store


def _store_source(store: ActivationStore, out_store: ActivationStore | None) -> dict[str, Any]:
    """A store run's data fingerprint: each store's config hash and size."""
    stores = [store] + ([out_store] if out_store is not None else [])
    return {"stores": [{"config_sha256": s.manifest.get("config_sha256"), "n_rows": s.n_rows} for s in stores]}


def _flat(batch: Tensor, device: torch.device) -> Tensor:
    return batch.reshape(batch.shape[0], -1).to(device=device, dtype=torch.float32)


def _batches(config: SaeTrainConfig, plan: TrainPlan, store: ActivationStore, out_store: ActivationStore | None,
             start_step: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Training batches from step ``start_step`` on: ``(x, y)`` raw float32 rows, ``y`` ``None`` for an SAE.

    Step ``s`` is batch ``s mod steps_per_epoch`` of epoch ``s div steps_per_epoch``; forever.
    """
    epoch, skip = divmod(start_step, plan.steps_per_epoch)
    while True:
        transcoder = config.out_hook is not None
        xs = store.stream(config.hook, plan.batch_size, config.seed, epoch=epoch, drop_last=True, with_metadata=transcoder)
        ys = None
        if transcoder:
            ys = _target_store(config, store, out_store).stream(config.out_hook, plan.batch_size, config.seed, epoch=epoch,
                                                                 drop_last=True, with_metadata=True)
        for index, item in enumerate(xs):
            x, y = item, None
            if ys is not None:
                (x, x_meta), (y, y_meta) = item, next(ys)
                if not np.array_equal(x_meta["row"], y_meta["row"]):
                    raise LmscopeError(f"the rows streamed for {config.out_hook!r} differ from those of {config.hook!r}; "
                                       "capture both hooks into one store.")
            if index < skip:
                continue
            yield _flat(x, device), (_flat(y, device) if y is not None else None)
        epoch, skip = epoch + 1, 0


def _sample(store: ActivationStore, hook: str, seed: int) -> Tensor:
    """The normalisation sample: the first ``min(n_rows, NORM_SAMPLE_ROWS)`` rows of the epoch-0 stream."""
    n = min(store.n_rows, NORM_SAMPLE_ROWS)
    return _flat(next(iter(store.stream(hook, n, seed, epoch=0))), torch.device("cpu")).double()


def _scale(sample: Tensor, hook: str) -> float:
    r"""``s`` with :math:`\mathbb{E}\lVert s x\rVert^2 = d`: :math:`s = \sqrt{d / \overline{\lVert x\rVert^2}}`."""
    mean_square = float(sample.pow(2).sum(-1).mean())
    if not math.isfinite(mean_square) or mean_square <= 0:
        raise LmscopeError(f"the activations of hook {hook!r} are all zero or not finite in the normalisation sample; "
                           "check the capture of that hook.")
    return math.sqrt(sample.shape[1] / mean_square)


# -- sparse top-k machinery ------------------------------------------------------------------------


class Active(NamedTuple):
    """The active latents of a batch: a sparsity pattern over ``[N, W]``, indexed both by row (CSR) and by column.

    Entries are ordered row-major (columns ascending within a row); ``perm`` lists them column-major
    (stable), so the transposed matrix is a CSR over ``[W, N]`` without any sort at product time.
    """

    crow: Tensor
    """int64 ``[N + 1]``: row ``n``'s entries are ``crow[n] : crow[n+1]``."""
    rows: Tensor
    """int64 ``[nnz]``: the row of each entry."""
    cols: Tensor
    """int64 ``[nnz]``: the latent of each entry."""
    ccol: Tensor
    """int64 ``[W + 1]``: column ``i``'s entries are ``perm[ccol[i] : ccol[i+1]]``."""
    perm: Tensor
    """int64 ``[nnz]``: the entries in column-major order."""
    width: int

    @property
    def n(self) -> int:
        return self.crow.shape[0] - 1


def _pattern(crow: Tensor, rows: Tensor, cols: Tensor, width: int) -> Active:
    perm = cols.argsort(stable=True)
    ccol = torch.zeros(width + 1, dtype=torch.int64, device=cols.device)
    ccol[1:] = torch.bincount(cols, minlength=width).cumsum(0)
    return Active(crow, rows, cols, ccol, perm, width)


def per_row_pattern(index: Tensor, width: int) -> Active:
    """The pattern of ``index`` ``[N, k]`` (``k`` distinct latents per row, any order)."""
    n, k = index.shape
    cols = index.sort(dim=-1).values.reshape(-1)
    crow = torch.arange(0, n * k + 1, k, device=index.device)
    rows = torch.arange(n, device=index.device).repeat_interleave(k)
    return _pattern(crow, rows, cols, width)


def topk_pattern(pre: Tensor, k: int) -> Active:
    """Each row's ``k`` largest pre-activations (``pre``: ``[N, W]``)."""
    return per_row_pattern(pre.topk(k, dim=-1, sorted=False).indices, pre.shape[1])


def batch_topk_pattern(pre: Tensor, k: int) -> Active:
    """The ``k·N`` largest pre-activations of the whole batch (``pre``: ``[N, W]``).

    Exact, in two stages (much cheaper than one search over all ``N·W`` values): each row's ``4k``
    largest are candidates and the batch's ``k·N`` largest are taken among them. A row with all
    ``4k`` chosen might own more, so such *saturated* rows then join with every entry and the
    selection is redone; the other rows' left-out entries lie below a threshold that only rose.
    """
    n, width = pre.shape
    total = min(k * n, pre.numel())
    per_row = min(width, 4 * k)
    if per_row == width:
        flat = pre.reshape(-1).topk(total, sorted=False).indices
    else:
        values, cols = pre.topk(per_row, dim=-1, sorted=False)
        row_base = torch.arange(n, device=pre.device)[:, None] * width
        chosen = values.reshape(-1).topk(total, sorted=False).indices
        counts = torch.bincount(chosen // per_row, minlength=n)
        saturated = counts >= per_row
        if not bool(saturated.any()):
            flat = (row_base + cols).reshape(-1)[chosen]
        else:
            full = saturated.nonzero().flatten()
            pool_values = torch.cat([values[~saturated].reshape(-1), pre[full].reshape(-1)])
            pool_flat = torch.cat([(row_base[~saturated] + cols[~saturated]).reshape(-1),
                                   (full[:, None] * width + torch.arange(width, device=pre.device)).reshape(-1)])
            flat = pool_flat[pool_values.topk(total, sorted=False).indices]
    flat = flat.sort().values
    rows, cols = flat // width, flat % width
    crow = torch.zeros(n + 1, dtype=torch.int64, device=pre.device)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return _pattern(crow, rows, cols, width)


def _csr(active: Active, values: Tensor) -> Tensor:
    """``[N, W]`` sparse CSR matrix with ``values`` (row-major entry order) on the pattern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(active.crow, active.cols, values, (active.n, active.width), check_invariants=False)


def _csr_t(active: Active, values: Tensor) -> Tensor:
    """The transpose of :func:`_csr`, ``[W, N]``, as a CSR matrix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(active.ccol, active.rows[active.perm], values[active.perm], (active.width, active.n),
                                       check_invariants=False)


class GatherPreActs(torch.autograd.Function):
    r"""The active entries of ``pre = centred @ W_enc + b_enc``, with a sparse backward.

    Forward: ``centred [N, d_in]``, ``w_enc [d_in, W]``, ``b_enc [W]``, the already computed
    ``pre [N, W]`` (no grad) and an :class:`Active` pattern → ``values [nnz]``. Backward, with ``G`` the
    ``[N, W]`` sparse matrix of incoming gradients on the pattern::

        ∂centred = G W_encᵀ      ∂W_enc = (Gᵀ centred)ᵀ      ∂b_enc = Σ_n G_n

    costing :math:`O(\mathrm{nnz} \cdot d_{in})` instead of the dense :math:`O(N W d_{in})`.
    """

    @staticmethod
    def forward(ctx: Any, centred: Tensor, w_enc: Tensor, b_enc: Tensor, pre: Tensor, active: Active) -> Tensor:
        ctx.save_for_backward(centred, w_enc)
        ctx.active = active
        return pre[active.rows, active.cols]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        centred, w_enc = ctx.saved_tensors
        active: Active = ctx.active
        g = grad.contiguous()
        grad_centred = _csr(active, g) @ w_enc.T if ctx.needs_input_grad[0] else None
        grad_w_enc = (_csr_t(active, g) @ centred).T if ctx.needs_input_grad[1] else None
        grad_b_enc = torch.zeros(active.width, dtype=g.dtype, device=g.device).index_add_(0, active.cols, g) \
            if ctx.needs_input_grad[2] else None
        return grad_centred, grad_w_enc, grad_b_enc, None, None


class SparseDecode(torch.autograd.Function):
    r"""``ŷ = A W_dec`` for the sparse activations ``A`` (``values [nnz]`` on an :class:`Active` pattern), no bias.

    Forward: ``embedding_bag`` over the active decoder rows, ``[N, d_out]``. Backward, with ``G = ∂L/∂ŷ``::

        ∂values_(n,i) = G_n · W_dec,i       (a sampled dense product)
        ∂W_dec = Aᵀ G                        (transposed CSR times dense)

    both :math:`O(\mathrm{nnz} \cdot d_{out})`.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, w_dec: Tensor, active: Active) -> Tensor:
        ctx.save_for_backward(values, w_dec)
        ctx.active = active
        return F.embedding_bag(active.cols, w_dec, active.crow, mode="sum", per_sample_weights=values, include_last_offset=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        values, w_dec = ctx.saved_tensors
        active: Active = ctx.active
        g = grad.contiguous()
        grad_values = None
        if ctx.needs_input_grad[0]:
            pattern = _csr(active, torch.zeros_like(values))
            grad_values = torch.sparse.sampled_addmm(pattern, g, w_dec.T, beta=0.0).values()
        grad_w_dec = _csr_t(active, values) @ g if ctx.needs_input_grad[1] else None
        return grad_values, grad_w_dec, None


def sparse_decode(values: Tensor, active: Active, w_dec: Tensor) -> Tensor:
    r"""``[N, d_out]``: :math:`\sum_{(n,i) \in \text{active}} v_{n,i} W_{dec,i}` (no bias); see :class:`SparseDecode`.

    Equals ``sparse_to_dense(values, active) @ w_dec``; gradients touch only the active rows.
    """
    return SparseDecode.apply(values, w_dec, active)


def sparse_to_dense(values: Tensor, active: Active) -> Tensor:
    """The ``[N, W]`` dense matrix of ``values`` on ``active``."""
    out = values.new_zeros(active.n, active.width)
    out[active.rows, active.cols] = values
    return out


# -- one training step -----------------------------------------------------------------------------


class StepResult(NamedTuple):
    loss: Tensor
    mse: Tensor
    aux: Tensor
    y_hat: Tensor
    """``[N, d_out]`` the (normalised) reconstruction."""
    fired: Tensor
    """bool ``[W]``: latents positive on some row."""
    l0: float
    min_kept: float | None
    """``batchtopk``: the smallest positive kept activation of the batch."""


def step_losses(sae: SparseAutoencoder, x: Tensor, y: Tensor, *, dead: Tensor, aux_k: int, aux_coefficient: float,
                sparsity_coefficient: float, bandwidth: float, sparse: bool) -> StepResult:
    """Forward pass and loss of one batch (normalised ``x [N, d_in]``, ``y [N, d_out]``; ``dead``: bool ``[W]``)."""
    arch = sae.shape.arch
    zero = x.new_zeros(())
    if arch in ("topk", "batchtopk") and sparse:
        centred = x if sae.shape.transcoder else x - sae.b_dec
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, centred, sae.W_enc)
        active = batch_topk_pattern(pre, sae.shape.k) if arch == "batchtopk" else topk_pattern(pre, sae.shape.k)
        acts = torch.relu(GatherPreActs.apply(centred, sae.W_enc, sae.b_enc, pre, active))
        y_hat = sparse_decode(acts, active, sae.W_dec) + sae.b_dec
        mse = losses.reconstruction_mse(y_hat, y)
        aux = zero
        index = losses.aux_latents(pre, dead, aux_k)
        if index is not None:
            aux_active = per_row_pattern(index, sae.shape.width)
            aux_acts = torch.relu(GatherPreActs.apply(centred, sae.W_enc, sae.b_enc, pre, aux_active))
            aux = losses.auxk_loss(y - y_hat, sparse_decode(aux_acts, aux_active, sae.W_dec))
        positive = acts.detach() > 0
        fired = torch.zeros(sae.shape.width, dtype=torch.bool, device=x.device)
        fired[active.cols[positive]] = True
        kept = acts.detach()[positive]
        min_kept = float(kept.min()) if arch == "batchtopk" and kept.numel() else None
        return StepResult(mse + aux_coefficient * aux, mse, aux, y_hat, fired, int(positive.sum()) / x.shape[0], min_kept)

    pre = sae.pre_acts(x)
    aux = zero
    if arch == "relu":
        f = torch.relu(pre)
        y_hat = sae.decode(f)
        mse = losses.reconstruction_mse(y_hat, y)
        loss = mse + sparsity_coefficient * losses.l1_penalty(f, sae.W_dec)
    elif arch == "jumprelu":
        threshold = sae.threshold
        f = losses.jumprelu(pre, threshold, bandwidth)
        y_hat = sae.decode(f)
        mse = losses.reconstruction_mse(y_hat, y)
        loss = mse + sparsity_coefficient * losses.jumprelu_l0(pre, threshold, bandwidth)
    else:  # dense top-k, for checking the sparse path
        f = sae.activate(pre, batch_topk=True)
        y_hat = sae.decode(f)
        mse = losses.reconstruction_mse(y_hat, y)
        aux = losses.auxk_loss_dense(pre, dead, y - y_hat, sae.W_dec, aux_k)
        loss = mse + aux_coefficient * aux
    positive = f.detach() > 0
    kept = f.detach()[positive]
    min_kept = float(kept.min()) if arch == "batchtopk" and kept.numel() else None
    return StepResult(loss, mse, aux, y_hat, positive.any(0), int(positive.sum()) / x.shape[0], min_kept)


@torch.no_grad()
def remove_parallel_gradient(sae: SparseAutoencoder) -> None:
    r"""Project out of each decoder row's gradient its component along the (unit) row: :math:`g_i \leftarrow g_i - (g_i \cdot w_i) w_i`."""
    grad = sae.W_dec.grad
    if grad is not None:
        w = sae.W_dec
        grad -= (grad * w).sum(1, keepdim=True) * w


@torch.no_grad()
def resample_dead_latents(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead: Tensor, x: Tensor, y: Tensor,
                          row_loss: Tensor, generator: torch.Generator) -> int:
    r"""Towards Monosemanticity's resampling of dead latents; returns how many were resampled.

    Each dead latent ``i`` (bool ``dead [W]``) draws one row ``n`` of the batch (``x [N, d_in]``, ``y [N, d_out]``,
    normalised) with probability :math:`\propto \mathrm{loss}_n^2` (``row_loss [N]``: the row's squared
    error), without replacement when there are enough rows. Then, with :math:`u` the row's input as
    the encoder sees it (``x − b_dec`` for an SAE, ``x`` for a transcoder) and :math:`v` the target
    less the decoder bias (``y − b_dec``)::

        W_dec[i] = v / ‖v‖
        W_enc[:, i] = 0.2 · mean_{alive j} ‖W_enc[:, j]‖ · u / ‖u‖     (1 when no latent is alive)
        b_enc[i] = 0

    and Adam's moments of those entries are zeroed. ``generator`` (CPU) makes the draw reproducible.
    """
    dead_index = dead.nonzero().flatten()
    n_dead = int(dead_index.numel())
    if n_dead == 0:
        return 0
    weights = row_loss.detach().double().pow(2).cpu()
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    picks = torch.multinomial(weights, n_dead, replacement=n_dead > weights.numel(), generator=generator).to(x.device)
    u = x[picks] if sae.shape.transcoder else x[picks] - sae.b_dec
    v = y[picks] - sae.b_dec
    alive = ~dead
    enc_norms = sae.W_enc.norm(dim=0)
    scale = 0.2 * (float(enc_norms[alive].mean()) if bool(alive.any()) else 1.0)
    sae.W_dec[dead_index] = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sae.W_enc[:, dead_index] = (scale * u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
    sae.b_enc[dead_index] = 0.0
    for param, index in ((sae.W_enc, (slice(None), dead_index)), (sae.b_enc, (dead_index,)), (sae.W_dec, (dead_index,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    return n_dead


FIT_SAMPLE_ROWS = 8192
"""Rows of the normalisation sample (its first) on which :func:`fit_encoder_scale` fits the encoder's scale."""


@torch.no_grad()
def fit_encoder_scale(sae: SparseAutoencoder, x: Tensor, *, rows: int = FIT_SAMPLE_ROWS, chunk: int = 2048) -> float:
    r"""Multiply ``W_enc`` and ``b_enc`` by the :math:`\alpha` that minimises the SAE's squared error on ``x``; returns :math:`\alpha`.

    ``x``: ``[n, d_in]`` *normalised* inputs (the first ``rows`` are used, in chunks of ``chunk`` rows); ``sae``: a
    ``topk``/``batchtopk`` SAE (not a transcoder). Scaling the encoder by :math:`\alpha > 0` scales every
    pre-activation by :math:`\alpha` and leaves the top-k choice (per row, or per chunk for ``batchtopk``) unchanged,
    so the reconstruction error is :math:`c - \alpha z` with :math:`c = x - b_{dec}` and :math:`z = f W_{dec}`, least
    in squares at :math:`\alpha = \sum \langle z, c\rangle / \sum \lVert z\rVert^2`. Left unchanged (returns 1)
    if that is not a finite positive number (e.g. no latent fires).
    """
    shape = sae.shape
    if shape.arch not in ("topk", "batchtopk") or shape.transcoder:
        raise LmscopeError(f"fit_encoder_scale needs a topk or batchtopk SAE (not a transcoder); got a {shape.arch} "
                           f"{'transcoder' if shape.transcoder else 'SAE'}.")
    dot = norm = 0.0
    for part in x[:rows].split(chunk):
        centred = part.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype) - sae.b_dec
        pre = torch.addmm(sae.b_enc, centred, sae.W_enc)
        active = batch_topk_pattern(pre, shape.k) if shape.arch == "batchtopk" else topk_pattern(pre, shape.k)
        z = F.embedding_bag(active.cols, sae.W_dec, active.crow, mode="sum",
                            per_sample_weights=torch.relu(pre[active.rows, active.cols]), include_last_offset=True)
        dot += float((z.double() * centred.double()).sum())
        norm += float(z.double().pow(2).sum())
    alpha = dot / norm if norm > 0 else float("nan")
    if not (math.isfinite(alpha) and alpha > 0):
        return 1.0
    sae.W_enc.mul_(alpha)
    sae.b_enc.mul_(alpha)
    return alpha


def learning_rate(step: int, plan: TrainPlan, decay: Decay, decay_fraction: float) -> float:
    """The learning rate of 0-based step ``step``: linear warmup, then ``decay``."""
    factor = 1.0
    if plan.warmup_steps and step < plan.warmup_steps:
        factor = (step + 1) / plan.warmup_steps
    if decay == "linear" and decay_fraction > 0:
        decay_steps = decay_fraction * plan.steps
        factor = min(factor, (plan.steps - step) / decay_steps)
    elif decay == "cosine" and step >= plan.warmup_steps:
        span = max(1, plan.steps - plan.warmup_steps)
        factor = 0.5 * (1.0 + math.cos(math.pi * (step - plan.warmup_steps) / span))
    return plan.lr * factor


def _adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam (β = 0.9, 0.999, ε = 1e-8), the fused kernel where this torch has it (CPU and CUDA, torch ≥ 2.4)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


# -- the run -------------------------------------------------------------------------------------


class _Run:
    """The state of one training run: SAE, optimiser, counters; one step at a time; checkpoints."""

    def __init__(self, config: SaeTrainConfig, plan: TrainPlan, source: dict[str, Any], device: torch.device,
                 init: dict[str, Tensor] | None = None) -> None:
        self.config, self.plan, self.source, self.device = config, plan, source, device
        self.init = init
        self.sae = SparseAutoencoder(plan.shape(config), seed=config.seed, device=device)
        self.optimizer = _adam(list(self.sae.parameters()), plan.lr)
        self.step = 0
        self.since_fired = torch.zeros(plan.width, dtype=torch.int64, device=device)
        self.threshold_mean = 0.0
        self.threshold_count = 0
        self.resampled = 0
        self.log: list[dict[str, float | int]] = []

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The data source (:func:`_store_source` or a stream's identity) and the initial SAE; checked on resume."""
        source = dict(self.source)
        if self.init is not None:
            source["init_sha256"] = _digest(self.init)
        return source

    @torch.no_grad()
    def initialise(self, x: Tensor, y: Tensor | None) -> None:
        """Normalisation scales and ``b_dec`` from the sample: raw rows ``x [n, d_in]``, ``y [n, d_out]`` (transcoder), float64."""
        s = _scale(x, self.config.hook)
        if y is None:
            t, target = s, x * s
        else:
            t = _scale(y, self.config.out_hook)
            target = y * t
        self.sae.input_scale.fill_(s)
        self.sae.output_scale.fill_(t)
        self.sae.b_dec.copy_(target.mean(0).to(self.sae.b_dec))
        if self.config.arch == "jumprelu":
            self.sae.log_threshold.fill_(math.log(self.config.jumprelu_init_threshold))
        if self.init is not None:
            self._copy_init(self.init)
        elif self.config.fit_encoder_scale and self.config.arch in ("topk", "batchtopk") and y is None:
            fit_encoder_scale(self.sae, target)

    @torch.no_grad()
    def _copy_init(self, init: dict[str, Tensor]) -> None:
        own = {name: value for name, value in self.sae.state_dict().items() if name not in _SCALES}
        if set(init) != set(own):
            raise LmscopeError(f"the initial SAE has parameters {', '.join(sorted(init))}, this run needs "
                               f"{', '.join(sorted(own))}; initialise from an SAE of the same architecture.")
        for name, value in init.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise LmscopeError(f"the initial SAE's {name} has shape {tuple(value.shape)}, this run needs "
                                   f"{tuple(own[name].shape)}; initialise from an SAE of the same width and hook size.")
            own[name].copy_(value.to(own[name]))
        if self.config.arch == "batchtopk":  # the threshold is re-estimated from this run's batches
            self.sae.log_threshold.fill_(float("-inf"))

    def train_step(self, x_raw: Tensor, y_raw: Tensor | None) -> dict[str, float]:
        config, plan, sae = self.config, self.plan, self.sae
        x = x_raw * sae.input_scale
        y = x if y_raw is None else y_raw * sae.output_scale
        lr = learning_rate(self.step, plan, config.decay, config.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        warm = config.sparsity_warmup * plan.steps
        sparsity = config.l1_coefficient if config.arch == "relu" else config.l0_coefficient
        if warm > 0:
            sparsity *= min(1.0, (self.step + 1) / warm)
        dead = self.since_fired >= plan.dead_tokens
        out = step_losses(sae, x, y, dead=dead, aux_k=plan.aux_k, aux_coefficient=config.aux_coefficient,
                          sparsity_coefficient=sparsity, bandwidth=config.jumprelu_bandwidth, sparse=config.sparse_decode)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        unit_decoder = config.arch != "relu"
        if unit_decoder:
            remove_parallel_gradient(sae)
        if config.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip_norm)
        self.optimizer.step()
        if unit_decoder:
            sae.normalize_decoder()

        n = x.shape[0]
        self.since_fired += n
        self.since_fired[out.fired] = 0
        if config.arch == "batchtopk" and out.min_kept is not None:
            self._update_threshold(out.min_kept)
        self.step += 1
        with torch.no_grad():
            row_loss = (y - out.y_hat).pow(2).sum(-1)
            fvu = float(row_loss.sum() / (y - y.mean(0)).pow(2).sum())
        if config.resample_every is not None and self.step % config.resample_every == 0 and self.step < plan.steps:
            dead_now = self.since_fired >= plan.dead_tokens
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.step)
            count = resample_dead_latents(sae, self.optimizer, dead_now, x, y, row_loss, generator)
            self.since_fired[dead_now] = 0
            self.resampled += count
        dead_fraction = float((self.since_fired >= plan.dead_tokens).float().mean())
        metrics = {"loss": float(out.loss.detach()), "mse": float(out.mse.detach()), "aux_loss": float(out.aux.detach()),
                   "fvu": fvu, "l0": out.l0, "dead_fraction": dead_fraction, "lr": lr}
        if not math.isfinite(metrics["loss"]):
            raise LmscopeError(f"SAE training diverged at step {self.step} (loss {metrics['loss']}); "
                               f"lower lr (it was {lr:.3g}) and train into a new out_dir.")
        if self.step % config.log_every == 0 or self.step == plan.steps:
            self.log.append({"step": self.step, "tokens": self.step * plan.batch_size, **metrics, "resampled": self.resampled})
        return metrics

    def _update_threshold(self, value: float) -> None:
        horizon = max(1, self.plan.steps // 10)
        self.threshold_count += 1
        self.threshold_mean += (value - self.threshold_mean) / min(self.threshold_count, horizon)
        with torch.no_grad():
            self.sae.log_threshold.fill_(math.log(self.threshold_mean) if self.threshold_mean > 0 else float("-inf"))

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.config.to_dict(),
            "source": self.fingerprint, "step": self.step,
            # the data position (a function of the step, recorded for readers): epoch, and batches of it consumed
            "epoch": self.step // self.plan.steps_per_epoch, "batches_in_epoch": self.step % self.plan.steps_per_epoch,
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(), "since_fired": self.since_fired,
            "threshold_mean": self.threshold_mean, "threshold_count": self.threshold_count,
            "resampled": self.resampled, "log": self.log,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_with(out_dir / CHECKPOINT_FILE, lambda path: torch.save(state, path))
        atomic_write_with(out_dir / TRAIN_LOG_FILE, self._write_log)

    def _write_log(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = ["step", "tokens", "loss", "mse", "aux_loss", "fvu", "l0", "dead_fraction", "lr", "resampled"]
        types = {"step": pa.int64(), "tokens": pa.int64(), "resampled": pa.int64()}
        schema = pa.schema([(c, types.get(c, pa.float64())) for c in columns])
        pq.write_table(pa.Table.from_pylist(self.log, schema=schema), path)

    def load(self, path: Path) -> None:
        state = _read_checkpoint(path)
        saved = state["config"]
        current = self.config.to_dict()
        if saved != current:
            changed = ", ".join(f"{k} {saved.get(k)!r} → {current.get(k)!r}" for k in sorted(set(saved) | set(current))
                                if saved.get(k) != current.get(k))
            raise LmscopeError(f"{path.parent} holds a checkpoint of a different SAE training run ({changed}); "
                               "choose another out_dir, or delete it to start over.")
        if state["source"] != self.fingerprint:
            raise LmscopeError(f"{path.parent} holds a checkpoint trained on other data (another activation store or model "
                               "stream) or from a different initial SAE; choose another out_dir, or pass the data and init it "
                               "was trained with.")
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.since_fired = state["since_fired"].to(self.device)
        self.threshold_mean = float(state["threshold_mean"])
        self.threshold_count = int(state["threshold_count"])
        self.resampled = int(state["resampled"])
        self.log = list(state["log"])


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LmscopeError(f"{path} does not exist; train an SAE into {path.parent} first.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise LmscopeError(f"checkpoint {path} is unreadable ({err}); delete it to start over.") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LmscopeError(f"{path} is not an lmscope SAE training checkpoint; choose another out_dir.")
    if state.get("version") != CHECKPOINT_VERSION:
        raise LmscopeError(f"checkpoint {path} has version {state.get('version')!r}, this lmscope writes "
                           f"{CHECKPOINT_VERSION}; choose another out_dir or delete it to start over.")
    return state
