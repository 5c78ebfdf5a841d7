"""Benchmark: lmscope's top-k SAE trainer vs SAELens's training loop, on the same cached activations.

Same activation store, same batches in the same order, same width, k, batch size, steps, learning
rate and schedule, Adam betas, AuxK coefficient and ``aux_k``, dead-latent window and initial
weights; the trainers run one after the other (never at once) with the same number of torch
threads. Reported for each: training throughput (activations/s) and, at the end, FVU and L0 on
held-out rows, computed by one function (:func:`lmscope.sae.evaluate.reconstruction_metrics`) for
both: SAELens's trained SAE is converted to lmscope's :class:`~lmscope.sae.model.SparseAutoencoder`
on raw activations (its normalisation and decoder norms folded in) and checked against SAELens's
own forward pass.

Configurations (``--configs``, default ``small,default``):

- ``small``: the default mini suite's 1.6m model (GPT-NeoX, hidden 128), ``blocks.1.hook_resid_post``,
  width 2048, k 32, batch 4096, 160 steps; SAELens dense;
- ``tiny``: the same activations, width 1024, k 16, batch 1024, 400 steps (the set-up of the SAELens
  figure in the workplace's FACTS); SAELens dense;
- ``default``: the default model (SmolLM2-135M-Instruct, d_model 576), ``blocks.6.hook_resid_post``,
  width 16 × 576 = 9216, k 32, batch 4096, 25 steps (SAELens takes ~6 s a step here); SAELens sparse.

SAELens runs as ``dense`` (``use_sparse_activations=False``) or ``sparse`` (``True``); each
configuration runs by default the variant that was faster on this machine (``--saelens dense,sparse``
runs both). ``--quick`` is a smoke run (``tiny``, 20 steps, one run each).

**Data.** Each model's activations are captured once and cached under ``$LMSCOPE_HOME/bench/sae/``:
a training store from the corpus's train split and an evaluation store from its held-out split.
The training rows are loaded into memory before either trainer starts, and both trainers get the
batches of ``store.stream(hook, batch, seed, epoch=e, drop_last=True)`` for ``e = 0, 1, …``,
gathered from memory by the same code, so I/O is identical for both and small. lmscope reads them
through :func:`lmscope.sae.train.train_sae` (the store is wrapped; nothing in lmscope is changed);
SAELens's ``SAETrainer`` from an iterator. SAELens's norm estimate first reads the same sample that
lmscope's normalisation uses (the first ``min(n_rows, 65536)`` rows of the epoch-0 stream).

**Settings made equal.** lr = lmscope's default ``2e-4 / sqrt(width / 2**14)``; linear warmup over
``steps // 20`` steps and linear decay to 0 over the last 20 % (SAELens: ``constant`` scheduler,
``lr_end = lr``, checked step by step); Adam β = (0.9, 0.999); AuxK on the ``d_in // 2`` largest dead
latents with coefficient 1/32; a latent is dead once it has not fired for more than ``steps // 10``
steps (SAELens ``dead_feature_window``; lmscope ``dead_tokens = (window + 1) × batch``, the same rule); inputs scaled
to ``E‖x‖² ≈ d_in`` (``expected_average_only_in``); SAELens starts from lmscope's initial weights
(random unit decoder rows, encoder = their transpose times the scalar that makes the initial reconstruction
of the scaled sample least-squares optimal, as lmscope's ``fit_encoder_scale`` does; ``b_dec`` = mean of the
scaled sample); both clip the gradient norm to 1 before every Adam step (SAELens hard-codes it); no
wandb, evaluation, checkpoints or sparsity logging in SAELens; no checkpoints or log rows in lmscope
until the end.

**Differences left** (not settable in one or the other):

- AuxK: lmscope's is ``Σ‖e − ê‖² / Σ‖e − ē‖²`` with ReLU'd auxiliary activations; SAELens's is
  ``mean ‖e − ê‖²`` (not normalised) times ``min(#dead / aux_k, 1)``, with auxiliary activations not ReLU'd.
- Decoder: lmscope keeps rows at unit norm (parallel gradient removed, rows renormalised each step).
  SAELens ``dense`` uses ``rescale_acts_by_decoder_norm=True`` (its default: rows free, top-k chosen on
  ``pre · ‖W_dec,i‖``); ``sparse`` needs ``rescale_acts_by_decoder_norm=False`` (with ``True`` its backward
  fails on CPU in this version: "aten::view ... SparseCPU"), so its decoder is unconstrained.
- Scale: lmscope ``sqrt(d / E‖x‖²)``, SAELens ``sqrt(d) / E‖x‖``, on the same sample.
- Adam: lmscope uses the fused kernel, SAELens ``torch.optim.Adam``'s default (same maths).

**Timing.** Every training-batch request is time-stamped; in both trainers a request comes right
after the previous step has finished. Throughput is ``(S - 1 - w) · batch / (t[S-1] - t[w])`` over
steps ``w … S-2`` (``w`` warm-up steps); store loading, model construction, normalisation and the
trainers' final saves and folds are outside the window, everything inside each training loop is
inside. ``--repeats`` runs of each, interleaved (lmscope, SAELens, lmscope, …); medians reported
(also ``batch / median step time``, which bursts of other jobs on a shared machine disturb less).
FVU and L0 are those of the first run of each (a later run that differs is reported).
``--profile N`` also profiles N steps of each trainer (torch.profiler, ops by self CPU time).

Run: ``.venv/bin/python bench/sae.py [--configs small,default] [--json] [--quick] [--profile 8]``
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bar (tqdm reads this at import)
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch

from lmscope.activations.reader import ActivationStore
from lmscope.home import lmscope_home
from lmscope.sae.evaluate import reconstruction_metrics
from lmscope.sae.model import SaeShape, SparseAutoencoder

NORM_SAMPLE_ROWS = 1 << 16  # lmscope's normalisation sample (lmscope.sae.train.NORM_SAMPLE_ROWS)
AUX_COEFFICIENT = 1.0 / 32.0


@dataclass(frozen=True)
class BenchConfig:
    name: str
    model: str
    """``default`` or ``suite:<size>`` (the last checkpoint of that size of the default mini suite)."""
    hook: str
    ctx: int
    train_tokens: int
    eval_tokens: int
    width: int
    k: int
    batch: int
    steps: int
    warmup_measure: int
    """Steps left out of the timing window at the start."""
    saelens: tuple[str, ...]
    """SAELens variants run by default: ``dense`` (``use_sparse_activations=False``) and/or ``sparse``; each
    configuration runs the faster one here (measured with ``--saelens dense,sparse``, see BENCHMARKS.md)."""
    dead_window: int | None = None
    """Steps without firing after which a latent is dead (SAELens's ``dead_feature_window``); ``None``: steps // 10."""


_SUITE = dict(model="suite:1.6m", hook="blocks.1.hook_resid_post", ctx=128, train_tokens=262144, eval_tokens=32768)
CONFIGS = {
    "small": BenchConfig("small", **_SUITE, width=2048, k=32, batch=4096, steps=160, warmup_measure=8, saelens=("dense",)),
    # the set-up of the SAELens figure in the workplace's FACTS (d=128, width 1024, k=16, batch 1024)
    "tiny": BenchConfig("tiny", **_SUITE, width=1024, k=16, batch=1024, steps=400, warmup_measure=20, saelens=("dense",)),
    "default": BenchConfig("default", "default", "blocks.6.hook_resid_post", ctx=256, train_tokens=131072,
                           eval_tokens=16384, width=9216, k=32, batch=4096, steps=25, warmup_measure=3, saelens=("sparse",)),
}


# -- data ------------------------------------------------------------------------------------------


def _model_and_corpus(spec: str) -> tuple[str, Path]:
    """The model spec to load and its tokenized corpus."""
    if spec == "default":
        from lmscope.data.default_corpus import ensure_default_corpus

        return "default", Path(ensure_default_corpus("default"))
    if spec.startswith("suite:"):
        from lmscope.suites.catalog import resolve_suite
        from lmscope.suites.train import ensure_default_suite

        suite_dir = ensure_default_suite(device="cpu")
        suite, _ = resolve_suite(str(suite_dir))
        models = {m.size: m for m in suite.models}
        size = spec.split(":", 1)[1]
        last = max(suite.checkpoints(), key=lambda c: c.step)
        return f"{models[size].model_id}@{last.revision}", suite_dir / "corpus"
    raise SystemExit(f"unknown model {spec!r}: use 'default' or 'suite:<size>'")


def ensure_stores(config: BenchConfig, log: Callable[[str], None]) -> tuple[ActivationStore, ActivationStore, str]:
    """The training (train split) and evaluation (held-out split) stores of ``config``, captured on first use."""
    spec, corpus_dir = _model_and_corpus(config.model)
    root = lmscope_home() / "bench" / "sae"
    stores: dict[str, Path] = {}
    hooked = None
    for split, tokens in (("train", config.train_tokens), ("heldout", config.eval_tokens)):
        key = hashlib.sha256(json.dumps([spec, str(corpus_dir), config.hook, config.ctx, split, tokens]).encode()).hexdigest()[:12]
        path = root / f"{config.model.replace(':', '-')}-{split}-{tokens}-{key}"
        stores[split] = path
        if (path / "manifest.json").is_file():
            try:
                ActivationStore.open(path)
                continue
            except Exception:  # incomplete: capture resumes it
                pass
        from lmscope.activations.job import capture_corpus_activations
        from lmscope.data.tokenized import TokenizedCorpus
        from lmscope.models.hooks import HookedModel

        if hooked is None:
            hooked = HookedModel.from_spec(spec, device="cpu")
        log(f"[{config.name}] capturing {tokens} {split} activations of {spec} {config.hook} into {path}")
        start = time.perf_counter()
        capture_corpus_activations(hooked, TokenizedCorpus.open(corpus_dir), [config.hook], tokens, config.ctx, path,
                                   split=split, meta={"model": spec, "bench": "sae"})
        log(f"[{config.name}] captured in {time.perf_counter() - start:.0f} s")
    return ActivationStore.open(stores["train"]), ActivationStore.open(stores["heldout"]), spec


class Clock:
    """Time stamps of training-batch requests; optional callbacks at given request numbers (profiling)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.at: dict[int, Callable[[], None]] = {}

    def tick(self) -> None:
        callback = self.at.get(len(self.times))
        if callback is not None:
            callback()
        self.times.append(time.perf_counter())


class PreloadedStore:
    """An :class:`ActivationStore` whose rows of one hook are held in memory.

    ``stream`` yields exactly the rows, in exactly the order, that the store's own ``stream`` yields
    (the row order is read from it once, in :meth:`order`); anything else is the store's. Batches of
    the training batch size tick ``clock`` when requested.
    """

    def __init__(self, store: ActivationStore, hook: str, clock: Clock | None = None, clock_batch: int | None = None) -> None:
        self._store, self.hook = store, hook
        self.x = store.rows(hook, slice(None)).reshape(store.n_rows, -1).to(torch.float32).contiguous()
        self._orders: dict[tuple[int, int, int, bool], list[torch.Tensor]] = {}
        self.clock, self.clock_batch = clock, clock_batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def order(self, batch_size: int, seed: int, epoch: int, drop_last: bool) -> list[torch.Tensor]:
        key = (batch_size, seed, epoch, drop_last)
        if key not in self._orders:
            stream = self._store.stream(self.hook, batch_size, seed, epoch=epoch, drop_last=drop_last, with_metadata=True)
            self._orders[key] = [torch.from_numpy(np.asarray(meta["row"], dtype=np.int64)) for _, meta in stream]
        return self._orders[key]

    def stream(self, hook: str, batch_size: int, seed: int = 0, *, shuffle: bool = True, buffer_shards: int = 4,
               epoch: int = 0, drop_last: bool = False, with_metadata: bool = False) -> Iterator[torch.Tensor]:
        if hook != self.hook or not shuffle or buffer_shards != 4 or with_metadata:
            raise RuntimeError(f"PreloadedStore.stream supports only the default shuffled stream of {self.hook!r}")
        for index in self.order(batch_size, seed, epoch, drop_last):
            if self.clock is not None and batch_size == self.clock_batch:
                self.clock.tick()
            yield self.x[index]

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Training batches forever: epoch 0, 1, … of ``stream(..., drop_last=True)``, ticking the clock."""
        for epoch in itertools.count():
            yield from self.stream(self.hook, batch_size, seed, epoch=epoch, drop_last=True)

    def norm_sample(self, seed: int) -> torch.Tensor:
        """lmscope's normalisation sample: the first ``min(n_rows, 65536)`` rows of the epoch-0 stream."""
        n = min(self.n_rows, NORM_SAMPLE_ROWS)
        return self.x[self.order(n, seed, 0, False)[0]]


# -- the two trainers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Every setting both trainers share, resolved."""

    d_in: int
    width: int
    k: int
    batch: int
    steps: int
    lr: float
    warmup_steps: int
    decay_steps: int
    dead_window: int
    aux_k: int
    seed: int
    warmup_measure: int


def make_plan(config: BenchConfig, d_in: int, n_rows: int, seed: int) -> Plan:
    steps = config.steps
    decay_steps = round(0.2 * steps)
    if decay_steps == 0 or steps < config.warmup_measure + 3:
        raise SystemExit(f"{steps} steps is too few")
    return Plan(d_in=d_in, width=config.width, k=config.k, batch=config.batch, steps=steps,
                lr=2e-4 / math.sqrt(config.width / 2**14),  # lmscope's default rule
                warmup_steps=min(1000, steps // 20), decay_steps=decay_steps,
                dead_window=config.dead_window if config.dead_window is not None else max(1, steps // 10),
                aux_k=d_in // 2, seed=seed, warmup_measure=config.warmup_measure)


def initial_weights(plan: Plan, hook: str, sample: torch.Tensor) -> tuple[SparseAutoencoder, float]:
    """lmscope's initial SAE and lmscope's input scale on ``sample``, as :func:`lmscope.sae.train.train_sae` starts.

    The constructor with the run's seed, ``b_dec`` = the mean of the scaled sample, then the encoder scale fitted on
    the scaled sample (:func:`lmscope.sae.train.fit_encoder_scale`, lmscope's default ``fit_encoder_scale=True``).
    """
    from lmscope.sae.train import fit_encoder_scale

    sae = SparseAutoencoder(SaeShape(d_in=plan.d_in, width=plan.width, arch="topk", k=plan.k, hook=hook), seed=plan.seed)
    scale = math.sqrt(plan.d_in / float(sample.double().pow(2).sum(-1).mean()))
    scaled = sample.double() * scale
    with torch.no_grad():
        sae.b_dec.copy_(scaled.mean(0).float())
    fit_encoder_scale(sae, scaled)
    return sae, scale


def lmscope_config(plan: Plan, hook: str) -> Any:
    from lmscope.sae.train import SaeTrainConfig

    return SaeTrainConfig(
        hook=hook, arch="topk", width=plan.width, k=plan.k, batch_size=plan.batch, total_tokens=plan.steps * plan.batch,
        lr=plan.lr, warmup_steps=plan.warmup_steps, decay="linear", decay_fraction=plan.decay_steps / plan.steps,
        seed=plan.seed, aux_k=plan.aux_k, aux_coefficient=AUX_COEFFICIENT,
        # lmscope: dead once tokens since firing >= dead_tokens; SAELens: once steps since firing > window.
        dead_tokens=(plan.dead_window + 1) * plan.batch,
        sparse_decode=True, checkpoint_every=10**9, log_every=10**9,
    )


def run_lmscope(plan: Plan, store: PreloadedStore, hook: str, clock: Clock) -> SparseAutoencoder:
    from lmscope.sae.train import train_sae

    config = lmscope_config(plan, hook)
    store.clock, store.clock_batch = clock, plan.batch
    out = Path(tempfile.mkdtemp(prefix="lmscope-bench-sae-"))
    try:
        return train_sae(config, store, out, device="cpu")
    finally:
        store.clock = None
        shutil.rmtree(out, ignore_errors=True)


def run_saelens(plan: Plan, store: PreloadedStore, hook: str, clock: Clock, *, sparse: bool,
                init: SparseAutoencoder) -> tuple[SparseAutoencoder, dict[str, float]]:
    """Train with SAELens's ``SAETrainer``; returns the SAE converted to lmscope's class (raw space) and a check of it.

    The check runs SAELens's own forward pass and the converted SAE on the first 4096 training rows:
    ``sse_rel_diff`` is the relative difference of their squared errors, ``rows_differing`` the fraction
    of rows whose reconstructions differ by more than 1e-4 of the row's norm (a near-tie in the top-k
    can pick another latent after the weights are refolded in float32).
    """
    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sample = store.norm_sample(plan.seed)
    norm_batches = list(sample.split(plan.batch))
    sae_cfg = TopKTrainingSAEConfig(
        d_in=plan.d_in, d_sae=plan.width, k=plan.k, dtype="float32", device="cpu",
        apply_b_dec_to_input=True, normalize_activations="expected_average_only_in",
        decoder_init_norm=1.0, aux_loss_coefficient=AUX_COEFFICIENT, use_sparse_activations=sparse,
        # True (SAELens's default: top-k chosen on pre · ‖W_dec,i‖, the nearest to lmscope's unit-norm rows)
        # fails in backward with use_sparse_activations on CPU in this version ("aten::view ... SparseCPU"),
        # so the sparse variant trains with an unconstrained decoder.
        rescale_acts_by_decoder_norm=not sparse,
    )
    sae = TopKTrainingSAE(sae_cfg)
    # The same initial weights as lmscope; b_dec = the mean of the sample in SAELens's normalised units.
    saelens_scale = math.sqrt(plan.d_in) / float(sample.double().norm(dim=-1).mean())
    with torch.no_grad():
        sae.W_enc.copy_(init.W_enc)
        sae.W_dec.copy_(init.W_dec)
        sae.b_enc.zero_()
        sae.b_dec.copy_((sample.double() * saelens_scale).mean(0).float())
    trainer_cfg = SAETrainerConfig(
        total_training_samples=plan.steps * plan.batch, train_batch_size_samples=plan.batch,
        lr=plan.lr, lr_end=plan.lr, lr_scheduler_name="constant", lr_warm_up_steps=plan.warmup_steps,
        lr_decay_steps=plan.decay_steps, adam_beta1=0.9, adam_beta2=0.999, device="cpu", autocast=False,
        dead_feature_window=plan.dead_window, feature_sampling_window=plan.steps + 1, n_checkpoints=0,
        checkpoint_path=None, save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=len(norm_batches),
    )
    store.clock, store.clock_batch = clock, plan.batch

    def provider() -> Iterator[torch.Tensor]:
        yield from norm_batches
        yield from store.batches(plan.batch, plan.seed)

    try:
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider())
        trained = trainer.fit()
    finally:
        store.clock = None
    converted = saelens_to_lmscope(trained, hook, plan.k)
    with torch.no_grad():
        x = store.x[: min(4096, store.n_rows)]
        theirs = trained(x)
        theirs = theirs.to_dense() if theirs.is_sparse else theirs
        ours = converted(x)
        sse_theirs, sse_ours = float((x - theirs).double().pow(2).sum()), float((x - ours).double().pow(2).sum())
        check = {"sse_rel_diff": abs(sse_theirs - sse_ours) / sse_ours,
                 "rows_differing": float(((theirs - ours).norm(dim=-1) > 1e-4 * x.norm(dim=-1)).double().mean())}
    return converted, check


@torch.no_grad()
def saelens_to_lmscope(sae: Any, hook: str, k: int) -> SparseAutoencoder:
    """A trained SAELens top-k SAE (normalisation already folded by ``fit``) as lmscope's SAE on raw activations.

    With ``rescale_acts_by_decoder_norm`` SAELens computes ``pre_i = ((x - b_dec) W_enc + b_enc)_i · n_i`` and
    decodes ``Σ_i (f_i / n_i) W_dec,i + b_dec`` (``n_i = ‖W_dec,i‖``): the same as unit decoder rows
    ``W_dec,i / n_i`` with encoder column ``i`` and ``b_enc,i`` multiplied by ``n_i``.
    """
    if sae.cfg.normalize_activations != "none":
        raise RuntimeError("the SAELens SAE still has its activation normalisation unfolded")
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().float() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    if sae.cfg.rescale_acts_by_decoder_norm:
        norms = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    d_in, width = W_enc.shape
    out = SparseAutoencoder(SaeShape(d_in=d_in, width=width, arch="topk", k=k, hook=hook))
    out.W_enc.copy_(W_enc)
    out.b_enc.copy_(b_enc)
    out.W_dec.copy_(W_dec)
    out.b_dec.copy_(b_dec)
    return out


def lr_schedule_check(plan: Plan, store: PreloadedStore, hook: str) -> float:
    """Largest relative difference between the two learning-rate schedules over all steps (0 = identical)."""
    from lmscope.sae.train import learning_rate, plan_training
    from sae_lens.training.optim import get_lr_scheduler

    config = lmscope_config(plan, hook)
    lmscope_plan = plan_training(config, store)

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=plan.lr)
    scheduler = get_lr_scheduler("constant", optimizer=optimizer, training_steps=plan.steps, lr=plan.lr,
                                 warm_up_steps=plan.warmup_steps, decay_steps=plan.decay_steps, lr_end=plan.lr, num_cycles=1)
    worst = 0.0
    for step in range(plan.steps):
        ours = learning_rate(step, lmscope_plan, config.decay, config.decay_fraction)
        worst = max(worst, abs(optimizer.param_groups[0]["lr"] - ours) / plan.lr)
        optimizer.step()
        scheduler.step()
    return worst


# -- measuring -------------------------------------------------------------------------------------


def throughput(clock: Clock, plan: Plan) -> tuple[float, float, float]:
    """Activations/s over steps ``w … S-2``, the seconds that window took, and ``batch / median step time``.

    The last is less sensitive to other jobs' bursts on a shared machine (but ignores real variation between steps).
    """
    if len(clock.times) != plan.steps:
        raise RuntimeError(f"expected {plan.steps} training-batch requests, saw {len(clock.times)}")
    w = plan.warmup_measure
    seconds = clock.times[plan.steps - 1] - clock.times[w]
    step_times = np.diff(np.asarray(clock.times[w:plan.steps]))
    return (plan.steps - 1 - w) * plan.batch / seconds, seconds, plan.batch / float(np.median(step_times))


def evaluate(sae: SparseAutoencoder, eval_store: ActivationStore) -> dict[str, float]:
    metrics = reconstruction_metrics(sae, eval_store)
    return {"fvu": metrics.fvu, "l0": metrics.l0, "mse": metrics.mse, "dead_fraction": metrics.dead_fraction,
            "rows": metrics.rows}


def profile_steps(run: Callable[[Plan, Clock], Any], plan: Plan, n_steps: int) -> list[dict[str, Any]]:
    """Profile ``n_steps`` steps of one trainer in a short run of its own (same settings, ``w + n_steps + 1`` steps).

    Returns the 15 ops with the most self CPU time, per step, and the total.
    """
    from torch.profiler import ProfilerActivity, profile

    short = replace(plan, steps=plan.warmup_measure + n_steps + 1, decay_steps=max(1, round(0.2 * (plan.warmup_measure + n_steps + 1))),
                    warmup_steps=min(plan.warmup_steps, plan.warmup_measure))
    profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    clock = Clock()
    clock.at = {short.warmup_measure: profiler.start, short.warmup_measure + n_steps: profiler.stop}
    run(short, clock)
    events = profiler.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return [{"op": e.key, "shapes": str(e.input_shapes), "ms_per_step": e.self_cpu_time_total / 1e3 / n_steps, "share": e.self_cpu_time_total / total,
             "calls_per_step": e.count / n_steps} for e in rows] + [
        {"op": "TOTAL (self CPU time of all ops)", "shapes": "", "ms_per_step": total / 1e3 / n_steps, "share": 1.0, "calls_per_step": 0.0}]


def bench_config(config: BenchConfig, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    train_store, eval_store, spec = ensure_stores(config, log)
    store = PreloadedStore(train_store, config.hook)
    plan = make_plan(config, store.d(config.hook), store.n_rows, args.seed)
    epochs = math.ceil(plan.steps / (store.n_rows // plan.batch))
    start = time.perf_counter()
    for epoch in range(epochs):  # the row order of every epoch, read once before any timing
        store.order(plan.batch, plan.seed, epoch, True)
    sample = store.norm_sample(plan.seed)
    init, _ = initial_weights(plan, config.hook, sample)
    schedule_diff = lr_schedule_check(plan, store, config.hook)
    log(f"[{config.name}] {store.n_rows} training rows (d={plan.d_in}) loaded in {time.perf_counter() - start:.1f} s; "
        f"{plan.steps} steps of {plan.batch} = {epochs} epoch(s); lr {plan.lr:.3g}, warmup {plan.warmup_steps}, "
        f"decay {plan.decay_steps}, dead window {plan.dead_window} steps; lr schedules differ by at most {schedule_diff:.1e} of lr")

    variants: dict[str, Callable[[Plan, Clock], Any]] = {
        "lmscope": lambda plan, clock: (run_lmscope(plan, store, config.hook, clock), None)}
    for sparse in [{"dense": False, "sparse": True}[v] for v in (args.saelens or config.saelens)]:
        variants["saelens_sparse" if sparse else "saelens"] = (
            lambda sparse: lambda plan, clock: run_saelens(plan, store, config.hook, clock, sparse=sparse, init=init))(sparse)

    rates: dict[str, list[float]] = {name: [] for name in variants}
    windows: dict[str, list[float]] = {name: [] for name in variants}
    step_rates: dict[str, list[float]] = {name: [] for name in variants}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    quality: dict[str, dict[str, float]] = {}
    conversion_check: dict[str, dict[str, float]] = {}
    fvu_runs: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, run in variants.items():
            clock = Clock()
            wall = time.perf_counter()
            sae, check = run(plan, clock)
            wall = time.perf_counter() - wall
            rate, seconds, median_step_rate = throughput(clock, plan)
            rates[name].append(rate)
            step_rates[name].append(median_step_rate)
            windows[name].append(seconds)
            walls[name].append(wall)
            measured = evaluate(sae, eval_store)
            fvu_runs[name].append(measured["fvu"])
            if repeat == 0:
                quality[name] = measured
                if check is not None:
                    conversion_check[name] = check
            log(f"[{config.name}] run {repeat + 1} {name:>14}: {rate:9.0f} act/s ({median_step_rate:.0f} by median step; "
                f"{seconds:.1f} s timed, {wall:.1f} s call), "
                f"FVU {measured['fvu']:.4f}, L0 {measured['l0']:.2f}" + (f"; conversion check: SSE differs by {check['sse_rel_diff']:.1e}, "
                   f"{100 * check['rows_differing']:.2f}% of rows differ" if check is not None else ""))
            if repeat and abs(measured["fvu"] - fvu_runs[name][0]) > 1e-6 * max(1.0, abs(fvu_runs[name][0])):
                log(f"[{config.name}] note: {name}'s FVU differs between runs ({fvu_runs[name]}); the table shows run 1")
    median = {name: statistics.median(r) for name, r in rates.items()}
    reference = max((n for n in median if n != "lmscope"), key=lambda n: median[n], default=None)
    result: dict[str, Any] = {
        "config": config.name, "model": spec, "hook": config.hook, "d_in": plan.d_in, "width": plan.width, "k": plan.k,
        "batch": plan.batch, "steps": plan.steps, "tokens_trained": plan.steps * plan.batch,
        "train_rows": store.n_rows, "epochs": epochs, "eval_rows": quality["lmscope"]["rows"],
        "lr": plan.lr, "warmup_steps": plan.warmup_steps, "decay_steps": plan.decay_steps,
        "dead_window_steps": plan.dead_window, "aux_k": plan.aux_k, "aux_coefficient": AUX_COEFFICIENT,
        "timed_steps": plan.steps - 1 - plan.warmup_measure, "repeats": args.repeats,
        "lr_schedule_max_rel_diff": schedule_diff,
        "activations_per_s": median, "activations_per_s_runs": rates,
        "activations_per_s_median_step": {n: statistics.median(r) for n, r in step_rates.items()},
        "activations_per_s_median_step_runs": step_rates, "timed_seconds_runs": windows, "call_seconds_runs": walls,
        "quality": quality, "fvu_runs": fvu_runs, "saelens_conversion_check": conversion_check,
        "reference": reference,
        "speedup_vs_reference": median["lmscope"] / median[reference] if reference else None,
        "speedup_vs": {n: median["lmscope"] / median[n] for n in median if n != "lmscope"},
    }
    if args.profile:
        result["profile"] = {}
        for name, run in variants.items():
            log(f"[{config.name}] profiling {args.profile} steps of {name}")
            result["profile"][name] = profile_steps(run, plan, args.profile)
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    print()
    print("| config | trainer | act/s | vs lmscope | act/s by median step | FVU (held-out) | L0 | dead |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        lm = r["activations_per_s"]["lmscope"]
        for name, rate in r["activations_per_s"].items():
            q = r["quality"][name]
            print(f"| {r['config']} (d={r['d_in']}, W={r['width']}, k={r['k']}, B={r['batch']}, {r['steps']} steps) | {name} | "
                  f"{rate:,.0f} | {rate / lm:.2f} | {r['activations_per_s_median_step'][name]:,.0f} | {q['fvu']:.4f} | "
                  f"{q['l0']:.2f} | {q['dead_fraction']:.3f} |")
    for r in results:
        if r["reference"]:
            print(f"{r['config']}: lmscope / {r['reference']} throughput = {r['speedup_vs_reference']:.2f}x; "
                  f"FVU {r['quality']['lmscope']['fvu']:.4f} vs {r['quality'][r['reference']]['fvu']:.4f}")
        if "profile" in r:
            for name, rows in r["profile"].items():
                print(f"\n{r['config']} / {name}: self CPU time per step by op")
                for row in rows:
                    print(f"  {row['ms_per_step']:9.2f} ms  {100 * row['share']:5.1f}%  {row['calls_per_step']:6.1f}/step  "
                          f"{row['op']} {row['shapes'][:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,default", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: per configuration)")
    parser.add_argument("--dead-window", type=int, default=None, metavar="STEPS",
                        help="steps without firing before a latent counts as dead (default: steps // 10; "
                             "more than --steps: AuxK never runs)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer, interleaved; median reported")
    parser.add_argument("--saelens", default=None,
                        help="SAELens variants to run: dense (use_sparse_activations=False), sparse (True, which needs "
                             "rescale_acts_by_decoder_norm=False here), or dense,sparse; default: per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps of each trainer")
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 min once the activations are cached): tiny config, 20 steps, one run each")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.saelens is not None:
        args.saelens = tuple(v.strip() for v in args.saelens.split(",") if v.strip())
        if not args.saelens or set(args.saelens) - {"dense", "sparse"}:
            raise SystemExit("--saelens takes dense, sparse or dense,sparse")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if args.quick:
        names, args.repeats, args.steps = ["tiny"], 1, args.steps or 20
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = []
    begin = time.perf_counter()
    for name in names:
        config = CONFIGS[name]
        if args.steps is not None:
            config = replace(config, steps=args.steps, warmup_measure=min(config.warmup_measure, max(1, args.steps // 10)))
        if args.dead_window is not None:
            config = replace(config, dead_window=args.dead_window)
        results.append(bench_config(config, args, log))
    import sae_lens

    summary = {
        "results": results, "torch": torch.__version__, "sae_lens": sae_lens.__version__, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "wall_seconds": time.perf_counter() - begin,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print_table(results)
    print(f"\ntorch {summary['torch']}, sae_lens {summary['sae_lens']}, {summary['torch_threads']} threads, "
          f"load average at end {summary['load_average_at_end'][0]:.2f}, wall {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
