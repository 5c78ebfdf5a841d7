r"""How good is an SAE (or transcoder): reconstruction on activation rows, and the model's loss with it spliced in.

**Reconstruction** (:func:`reconstruction_metrics`) over rows :math:`x_n` (``[d_in]``, raw activations of
``hook``) with targets :math:`y_n` (``x_n`` for an SAE, the same token's ``out_hook`` for a transcoder),
prediction :math:`\hat y_n` and feature activations :math:`f_n` (``[width]``), :math:`N` rows:

- ``mse`` :math:`= \frac1N \sum_n \lVert y_n - \hat y_n \rVert^2` (summed over dimensions, averaged over rows);
- ``fvu`` :math:`= \sum_n \lVert y_n - \hat y_n \rVert^2 / \sum_n \lVert y_n - \bar y \rVert^2`, :math:`\bar y` the mean
  target of the evaluated rows (fraction of variance unexplained; ``1 - fvu`` is the explained variance);
- ``l0`` :math:`= \frac1N \sum_n \#\{i : f_{n,i} > 0\}`;
- per feature: firing count :math:`c_i = \#\{n : f_{n,i} > 0\}` and density :math:`c_i / N`; *dead*
  features never fired over the evaluated rows (or, with ``dead_window=W``, not in the last
  :math:`\min(W, N)` rows, as trainers count them); *dense* features have density above ``dense_threshold``;
- a histogram of :math:`\log_{10}` density of the features that fired, on fixed edges
  (:data:`DENSITY_EDGES`, ``-10 … 0`` in steps of 0.25) so that checkpoints compare bin for bin; dead
  features are counted apart (their log density is :math:`-\infty`).

Everything accumulates in float64 while streaming (the target mean and spread by Chan's pairwise
update), so no more than one batch of rows is held.

**Spliced** (:func:`spliced_metrics`): on held-out contexts (the first ``ctx`` tokens of held-out
documents at least that long, in corpus order, as for the logit lens), the model runs

(a) clean; (b) with the SAE's reconstruction of ``hook`` in place of its value (a transcoder: its
prediction from ``hook``, read in the same forward pass, in place of ``out_hook``); (c) with the
replaced hook zeroed; (d) with it replaced by its mean over the evaluated positions (computed in a
first pass unless given).

Position :math:`i` predicts token :math:`i+1`. Reported, per scored prediction, in nats: the
cross-entropy of each run, :math:`\Delta CE = CE_{sae} - CE_{clean}`, the loss recovered
:math:`(CE_{zero} - CE_{sae}) / (CE_{zero} - CE_{clean})` (and the same with the mean ablation; a
fraction, 1 = all of it; ``None`` when the denominator is 0) and
:math:`\mathrm{KL}(p_{clean} \,\|\, p_{sae})`.

**The first position.** The first position of a context has activations unlike any other (the
attention sink, often norms many times the rest), and SAEs are commonly trained without it
(SAELens leaves BOS out of its reconstruction statistics). One rule here, for both functions:

- by default (``include_first=False``) every intervention — SAE, zero and mean — leaves position 0
  of each context at its clean value, the ablation mean is taken over positions ``1 … ctx-1``, and
  only predictions made at positions ``1 … ctx-2`` are scored (``ctx - 2`` per context; the
  prediction at position 0 cannot change, since attention is causal, so it would only dilute
  :math:`\Delta CE` and KL). In an :class:`~lmscope.activations.ActivationStore` the row that opens
  each context (the BOS when the capture prepended one) is skipped likewise;
- ``include_first=True`` intervenes at every position and scores positions ``0 … ctx-2`` (so
  ``ce_clean`` is the model's own loss on the contexts); store rows are all used.

Rows given as plain tensors carry no positions: all of them are used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmscope.errors import LmscopeError
from lmscope.evals.lens import lens_contexts
from lmscope.sae.model import SparseAutoencoder

DENSITY_EDGES: np.ndarray = np.linspace(-10.0, 0.0, 41)
"""Bin edges of the log10 feature-density histogram (densities below 1e-10 fall in the first bin)."""

DEFAULT_DENSE_THRESHOLD = 0.1


# -- results -------------------------------------------------------------------------------------


@dataclass(eq=False)  # holds numpy arrays; compare fields, not objects
class ReconstructionMetrics:
    """Reconstruction quality and sparsity of an SAE over activation rows (see the module docstring).

    Attributes:
        hook, out_hook: the hook read and (transcoder) the hook predicted; ``out_hook`` is ``None`` for an SAE.
        arch, width, k: the SAE's architecture, number of features and ``k`` (``None`` unless top-k).
        rows: rows evaluated (:math:`N`).
        mse: mean over rows of the squared error summed over dimensions.
        fvu: fraction of variance unexplained (``nan`` if the targets do not vary).
        target_variance: :math:`\\frac1N \\sum_n \\lVert y_n - \\bar y \\rVert^2`, so ``fvu = mse / target_variance``.
        l0: mean number of active features per row.
        dead_features, dense_features: counts; ``dead_window``/``dense_threshold`` define them.
        firing_counts: int64 ``[width]``, rows on which each feature fired.
        histogram_edges, histogram_counts: the log10-density histogram of features that fired
            (``len(edges) == len(counts) + 1``).
        include_first: whether rows opening a context were used (stores only).
    """

    hook: str
    out_hook: str | None
    arch: str
    width: int
    k: int | None
    rows: int
    mse: float
    fvu: float
    target_variance: float
    l0: float
    dead_features: int
    dense_features: int
    dense_threshold: float
    dead_window: int | None
    include_first: bool
    firing_counts: np.ndarray = field(repr=False)
    histogram_edges: np.ndarray = field(repr=False)
    histogram_counts: np.ndarray = field(repr=False)

    @property
    def density(self) -> np.ndarray:
        """float64 ``[width]``: fraction of rows on which each feature fired."""
        return self.firing_counts / self.rows

    @property
    def dead_fraction(self) -> float:
        return self.dead_features / self.width

    @property
    def dense_fraction(self) -> float:
        return self.dense_features / self.width

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    def to_dict(self, per_feature: bool = False) -> dict[str, Any]:
        """JSON-ready summary (with the histogram); ``per_feature`` adds the firing counts."""
        out: dict[str, Any] = {
            "hook": self.hook, "out_hook": self.out_hook, "arch": self.arch, "width": self.width, "k": self.k,
            "rows": self.rows, "mse": self.mse, "fvu": self.fvu, "explained_variance": self.explained_variance,
            "target_variance": self.target_variance, "l0": self.l0,
            "dead_features": self.dead_features, "dead_fraction": self.dead_fraction, "dead_window": self.dead_window,
            "dense_features": self.dense_features, "dense_fraction": self.dense_fraction,
            "dense_threshold": self.dense_threshold, "include_first": self.include_first,
            "density_histogram": {"log10_edges": self.histogram_edges.tolist(), "counts": self.histogram_counts.tolist()},
        }
        if per_feature:
            out["firing_counts"] = self.firing_counts.tolist()
        return out


@dataclass
class SplicedMetrics:
    """The model's next-token loss with the SAE spliced in, against clean, zero and mean ablation (nats per prediction).

    Attributes:
        hook, out_hook, arch, width, k: the SAE (``out_hook``: the transcoder's replaced hook, else ``None``).
        ctx, contexts, predictions: context length, contexts used, predictions scored.
        include_first: whether position 0 was intervened on and scored (see the module docstring).
        ce_clean, ce_spliced, ce_zero, ce_mean: mean cross-entropy of each run.
        delta_ce: ``ce_spliced - ce_clean``.
        ce_recovered_zero, ce_recovered_mean: ``(ce_ablated - ce_spliced) / (ce_ablated - ce_clean)``; ``None`` if the denominator is 0.
        kl: mean :math:`\\mathrm{KL}(p_{clean} \\| p_{spliced})` over scored predictions.
        l0: mean active features per spliced position.
    """

    hook: str
    out_hook: str | None
    arch: str
    width: int
    k: int | None
    ctx: int
    contexts: int
    predictions: int
    include_first: bool
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_mean: float
    delta_ce: float
    ce_recovered_zero: float | None
    ce_recovered_mean: float | None
    kl: float
    l0: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- reconstruction over rows --------------------------------------------------------------------


class _RowStats:
    """Streaming float64 accumulators for :func:`reconstruction_metrics` (kept on the CPU; batches may live anywhere)."""

    def __init__(self, width: int, d_out: int, track_last: bool) -> None:
        self.rows = 0
        self.sse = 0.0
        self.mean = torch.zeros(d_out, dtype=torch.float64)
        self.m2 = 0.0  # Σ_n ||y_n - ȳ||², merged batch by batch (Chan, Golub & LeVeque)
        self.counts = torch.zeros(width, dtype=torch.int64)
        self.track_last = track_last
        self.last_fired = torch.full((width,), -1, dtype=torch.int64)  # global row of each feature's last firing

    def add(self, y: Tensor, y_hat: Tensor, f: Tensor) -> None:
        """``y``, ``y_hat``: ``[n, d_out]``; ``f``: ``[n, width]`` feature activations."""
        n = y.shape[0]
        if n == 0:
            return
        y = y.double()
        self.sse += float((y - y_hat.double()).pow(2).sum())
        batch_mean = y.mean(0)
        batch_m2 = float((y - batch_mean).pow(2).sum())
        batch_mean = batch_mean.cpu()
        total = self.rows + n
        delta = batch_mean - self.mean
        self.m2 += batch_m2 + float(delta.pow(2).sum()) * self.rows * n / total
        self.mean += delta * (n / total)
        fired = f > 0
        self.counts += fired.sum(0).cpu()
        if self.track_last:
            # argmax returns the first maximum: in the flipped batch, the last row that fired.
            last = n - 1 - fired.flip(0).to(torch.uint8).argmax(0)
            self.last_fired = torch.where(fired.any(0).cpu(), last.cpu() + self.rows, self.last_fired)
        self.rows = total


@torch.no_grad()
def reconstruction_metrics(
    sae: SparseAutoencoder,
    store_or_batches: Any,
    *,
    hook: str | None = None,
    out_hook: str | None = None,
    max_rows: int | None = None,
    batch_size: int = 4096,
    dead_window: int | None = None,
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
    include_first: bool = False,
) -> ReconstructionMetrics:
    """MSE, FVU, L0 and feature densities of ``sae`` over activation rows (formulas in the module docstring).

    Args:
        sae: an SAE or transcoder; it is given *raw* activations (its ``input_scale`` is applied here).
        store_or_batches: an :class:`~lmscope.activations.ActivationStore` (rows of ``hook``, read in
            store order; a transcoder's targets are the same rows of ``out_hook``), or an iterable of
            tensors ``[n, d_in]`` (an SAE) or of ``(input [n, d_in], target [n, d_out])`` pairs.
        hook, out_hook: store hooks to read; default the SAE's ``shape.hook`` and ``shape.out_hook``.
        max_rows: evaluate only the first this many rows (after skipping context openers).
        batch_size: rows per SAE call (results do not depend on it beyond float rounding).
        dead_window: a feature is dead if it did not fire in the last ``min(dead_window, rows)`` rows;
            ``None``: if it never fired.
        dense_threshold: a feature is dense if its density exceeds this.
        include_first: use store rows that open a context (see the module docstring).
    """
    if batch_size < 1:
        raise LmscopeError(f"batch size {batch_size} must be at least 1.")
    if max_rows is not None and max_rows < 1:
        raise LmscopeError(f"max_rows={max_rows} must be at least 1 (or None for every row).")
    if dead_window is not None and dead_window < 1:
        raise LmscopeError(f"dead_window={dead_window} must be at least 1 (or None: dead = never fired).")
    if not 0.0 <= dense_threshold <= 1.0:
        raise LmscopeError(f"dense_threshold={dense_threshold} is a density and must lie in [0, 1].")
    shape = sae.shape
    if hasattr(store_or_batches, "stream") and hasattr(store_or_batches, "manifest"):
        hook = hook or shape.hook
        if not hook:
            raise LmscopeError("the SAE names no hook (shape.hook is empty); pass hook= to say which store rows it reads.")
        if shape.transcoder:
            out_hook = out_hook or shape.out_hook
        elif out_hook is not None:
            raise LmscopeError(f"out_hook={out_hook!r} was given but the SAE is not a transcoder; it reconstructs {hook!r} itself.")
        pairs = _store_pairs(sae, store_or_batches, hook, out_hook, batch_size, include_first)
    else:
        hook = hook or shape.hook
        out_hook = (out_hook or shape.out_hook) if shape.transcoder else None
        pairs = _iterable_pairs(sae, store_or_batches, batch_size)

    stats = _RowStats(shape.width, shape.output_dim, track_last=dead_window is not None)
    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    for x, y in pairs:
        if max_rows is not None and stats.rows + x.shape[0] > max_rows:
            x, y = x[: max_rows - stats.rows], y[: max_rows - stats.rows]
        x = x.to(device=device, dtype=dtype)
        f = sae.encode(x * sae.input_scale)
        y_hat = sae.decode(f) / sae.output_scale  # = sae.forward_raw(x)
        stats.add(y.to(device), y_hat, f)
        if max_rows is not None and stats.rows >= max_rows:
            break
    if stats.rows == 0:
        raise LmscopeError("no activation rows were given to evaluate; pass a non-empty store or batches.")

    counts = stats.counts.numpy()
    n = stats.rows
    if dead_window is None:
        dead = counts == 0
    else:
        since = (n - 1 - stats.last_fired).numpy()  # rows since the last firing (n for never)
        dead = since >= min(dead_window, n)
    density = counts / n
    alive = counts > 0
    histogram, _ = np.histogram(np.clip(np.log10(density[alive]), DENSITY_EDGES[0], DENSITY_EDGES[-1]), bins=DENSITY_EDGES)
    variance = stats.m2 / n
    return ReconstructionMetrics(
        hook=hook, out_hook=out_hook, arch=shape.arch, width=shape.width, k=shape.k, rows=n,
        mse=stats.sse / n, fvu=stats.sse / stats.m2 if stats.m2 > 0 else float("nan"), target_variance=variance,
        l0=float(counts.sum()) / n, dead_features=int(dead.sum()), dense_features=int((density > dense_threshold).sum()),
        dense_threshold=dense_threshold, dead_window=dead_window, include_first=include_first,
        firing_counts=counts, histogram_edges=DENSITY_EDGES.copy(), histogram_counts=histogram.astype(np.int64),
    )


def _store_pairs(
    sae: SparseAutoencoder, store: Any, hook: str, out_hook: str | None, batch_size: int, include_first: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    shape = sae.shape
    for name, width, what in ((hook, shape.d_in, "d_in"), (out_hook, shape.output_dim, "d_out")):
        if name is None:
            continue
        if name not in store.hooks:
            raise LmscopeError(f"hook {name!r} is not in the activation store {store.root}; it holds {', '.join(store.hooks)}.")
        if store.d(name) != width:
            raise LmscopeError(f"store hook {name!r} has {store.d(name)} values per row but the SAE's {what} is {width}; "
                               "pass the store captured for this SAE's model and hook.")
    keep = None
    if not include_first:
        context = store.metadata["context"]
        opens = np.ones(len(context), dtype=bool)  # the first row of each context
        opens[1:] = context[1:] != context[:-1]
        keep = ~opens

    def generate() -> Iterator[tuple[Tensor, Tensor]]:
        inputs = store.stream(hook, batch_size, shuffle=False, with_metadata=True)
        targets = store.stream(out_hook, batch_size, shuffle=False) if out_hook is not None else None
        for x, meta in inputs:
            y = next(targets) if targets is not None else x
            x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
            if keep is not None:
                mask = torch.from_numpy(keep[meta["row"]])
                x, y = x[mask], y[mask]
            yield x, y

    return generate()


def _iterable_pairs(sae: SparseAutoencoder, batches: Iterable[Any], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    shape = sae.shape
    if isinstance(batches, Tensor):
        batches = [batches]
    try:
        iterator = iter(batches)
    except TypeError:
        raise LmscopeError(f"cannot read activation rows from a {type(batches).__name__}; "
                           "pass an ActivationStore or an iterable of tensors or (input, target) pairs.") from None

    def generate() -> Iterator[tuple[Tensor, Tensor]]:
        for item in iterator:
            if isinstance(item, Tensor):
                if shape.transcoder:
                    raise LmscopeError("a transcoder needs (input, target) pairs: its target is another hook's activations.")
                x, y = item, item
            elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
                x, y = item
            else:
                raise LmscopeError(f"an activation batch must be a tensor or an (input, target) pair of tensors, not {type(item).__name__}.")
            if x.dim() != 2 or x.shape[1] != shape.d_in:
                raise LmscopeError(f"activation batch of shape {tuple(x.shape)} does not fit the SAE's d_in {shape.d_in}; "
                                   f"give rows [n, {shape.d_in}].")
            if y.dim() != 2 or y.shape != (x.shape[0], shape.output_dim):
                raise LmscopeError(f"target batch of shape {tuple(y.shape)} does not match {x.shape[0]} rows of width "
                                   f"{shape.output_dim}, the SAE's output.")
            for start in range(0, x.shape[0], batch_size):
                yield x[start : start + batch_size], y[start : start + batch_size]

    return generate()


# -- spliced into the model ----------------------------------------------------------------------


@torch.no_grad()
def spliced_metrics(
    hooked: Any,
    sae: SparseAutoencoder,
    corpus: Any,
    *,
    ctx: int = 128,
    n_contexts: int = 16,
    batch_size: int = 4,
    split: str = "heldout",
    mean_activation: Tensor | None = None,
    include_first: bool = False,
) -> SplicedMetrics:
    """Cross-entropy and KL of ``hooked`` with ``sae`` spliced in, against clean, zero- and mean-ablated runs.

    Args:
        hooked: a :class:`~lmscope.models.hooks.HookedModel`.
        sae: an SAE (replaces ``shape.hook`` with its reconstruction) or a transcoder (replaces
            ``shape.out_hook`` with its prediction from ``shape.hook`` of the same forward pass); raw
            activations go in (its scales are applied).
        corpus: a :class:`~lmscope.data.tokenized.TokenizedCorpus`; contexts are the first ``ctx`` tokens
            of the first ``n_contexts`` ``split`` documents at least that long (:func:`~lmscope.evals.lens.lens_contexts`).
        batch_size: contexts per forward pass (results do not depend on it beyond float rounding).
        mean_activation: the mean-ablation value of the replaced hook (shape of one position's value);
            default its mean over the evaluated positions, computed in a first pass.
        include_first: intervene at and score position 0 too (see the module docstring).
    """
    shape = sae.shape
    if ctx < 3 or n_contexts < 1 or batch_size < 1:
        raise LmscopeError(f"ctx={ctx}, n_contexts={n_contexts}, batch_size={batch_size}: need ctx >= 3 and positive counts.")
    if not shape.hook:
        raise LmscopeError("the SAE names no hook (shape.hook is empty); set shape.hook to the hook it was trained on.")
    max_positions = getattr(hooked.config, "max_position_embeddings", None)
    if max_positions is not None and ctx > int(max_positions):
        raise LmscopeError(f"ctx={ctx} is longer than the model's {max_positions} positions; pass a smaller ctx.")
    hook = shape.hook
    target = shape.out_hook if shape.transcoder else hook
    for name in (hook, target):
        if name.endswith("hook_pattern"):
            raise LmscopeError(f"hook {name!r} is an attention pattern, not per-token activations; an SAE reads per-token hooks.")
        hooked.hook_point(name)  # unknown names raise with the valid ones
    if shape.transcoder and hooked.hook_point(target).order <= hooked.hook_point(hook).order:
        raise LmscopeError(f"transcoder out_hook {target!r} does not come after its input hook {hook!r} in the forward pass; "
                           "a transcoder must predict a later hook.")
    contexts = lens_contexts(corpus, split=split, ctx=ctx, n_contexts=n_contexts)
    batches = [torch.from_numpy(np.stack(contexts[i : i + batch_size])).to(hooked.device) for i in range(0, len(contexts), batch_size)]
    first = 0 if include_first else 1  # first intervened (and scored) position

    widths = _hook_widths(hooked, batches[0][:1], hook, target)
    if widths[hook] != shape.d_in:
        raise LmscopeError(f"hook {hook!r} has {widths[hook]} values per position but the SAE's d_in is {shape.d_in}; "
                           "this SAE was trained on another model or hook.")
    if widths[target] != shape.output_dim:
        raise LmscopeError(f"out_hook {target!r} has {widths[target]} values per position but the transcoder's d_out is "
                           f"{shape.output_dim}; this transcoder was trained on another model or hook.")

    if mean_activation is None:
        total = torch.zeros(widths[target], dtype=torch.float64)
        count = 0
        for ids in batches:
            _, cache = hooked.run_with_cache(ids, [target], need_logits=False)
            value = cache[target][:, first:]
            total += value.reshape(-1, widths[target]).double().sum(0).cpu()
            count += value.shape[0] * value.shape[1]
        mean_activation = total / count
    elif mean_activation.numel() != widths[target]:
        raise LmscopeError(f"mean_activation has {mean_activation.numel()} values but {target!r} has {widths[target]} per position; "
                           "pass the mean of one position's value.")
    mean_flat = mean_activation.reshape(-1)

    def keep_first(new: Tensor, value: Tensor) -> Tensor:
        if first:
            new[:, :first] = value[:, :first]
        return new

    def zero(value: Tensor, name: str) -> Tensor:
        return keep_first(torch.zeros_like(value), value)

    def mean(value: Tensor, name: str) -> Tensor:
        new = mean_flat.to(device=value.device, dtype=value.dtype).expand(*value.shape[:2], -1).reshape(value.shape).clone()
        return keep_first(new, value)

    l0 = {"active": 0.0, "positions": 0}

    def reconstruct(source: Tensor, like: Tensor) -> Tensor:
        x = source.reshape(-1, shape.d_in).to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        f = sae.encode(x * sae.input_scale)
        y_hat = sae.decode(f) / sae.output_scale  # = sae.forward_raw(x)
        active = (f > 0).sum(-1).reshape(source.shape[:2])[:, first:]
        l0["active"] += float(active.sum())
        l0["positions"] += active.numel()
        return keep_first(y_hat.to(device=like.device, dtype=like.dtype).reshape(like.shape), like)

    captured: dict[str, Tensor] = {}

    def capture_input(value: Tensor, name: str) -> None:
        captured["x"] = value.detach().clone()

    def transcode(value: Tensor, name: str) -> Tensor:
        source = captured.pop("x", None)
        if source is None:  # guarded above; kept so that a silent no-op splice can never pass
            raise LmscopeError(f"transcoder input {hook!r} did not fire before {target!r}; report this as a bug.")
        return reconstruct(source, value)

    if shape.transcoder:
        splice = [(hook, capture_input), (target, transcode)]
    else:
        splice = [(hook, lambda value, name: reconstruct(value, value))]

    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0}
    kl = 0.0
    predictions = 0
    for ids in batches:
        targets = ids[:, first + 1 :].unsqueeze(-1)
        clean = _log_probs(hooked.run_with_hooks(ids, []), first)
        ce["clean"] -= float(clean.gather(-1, targets).sum())
        spliced = _log_probs(hooked.run_with_hooks(ids, splice), first)
        ce["spliced"] -= float(spliced.gather(-1, targets).sum())
        kl += float((clean.exp() * (clean - spliced)).sum())
        del spliced
        for run, fn in (("zero", zero), ("mean", mean)):
            ablated = _log_probs(hooked.run_with_hooks(ids, [(target, fn)]), first)
            ce[run] -= float(ablated.gather(-1, targets).sum())
        predictions += targets.numel()
    ce = {run: value / predictions for run, value in ce.items()}

    def recovered(ablated: float) -> float | None:
        gap = ablated - ce["clean"]
        return (ablated - ce["spliced"]) / gap if gap != 0 else None

    return SplicedMetrics(
        hook=hook, out_hook=shape.out_hook, arch=shape.arch, width=shape.width, k=shape.k,
        ctx=ctx, contexts=len(contexts), predictions=predictions, include_first=include_first,
        ce_clean=ce["clean"], ce_spliced=ce["spliced"], ce_zero=ce["zero"], ce_mean=ce["mean"],
        delta_ce=ce["spliced"] - ce["clean"], ce_recovered_zero=recovered(ce["zero"]),
        ce_recovered_mean=recovered(ce["mean"]), kl=kl / predictions, l0=l0["active"] / max(l0["positions"], 1),
    )


def _hook_widths(hooked: Any, ids: Tensor, *names: str) -> dict[str, int]:
    """Values per position of each hook, read off one forward pass."""
    _, cache = hooked.run_with_cache(ids, list(names), need_logits=False)
    return {name: int(np.prod(cache[name].shape[2:])) for name in names}


def _log_probs(logits: Tensor, first: int) -> Tensor:
    """float64 log-probabilities ``[batch, pos, vocab]`` of the predictions made at positions ``first … ctx-2``."""
    return torch.log_softmax(logits[:, first:-1].double(), dim=-1)


# -- results rows --------------------------------------------------------------------------------

_RECONSTRUCTION_METRICS = (("sae_mse", "mse"), ("sae_fvu", "fvu"), ("sae_l0", "l0"),
                           ("sae_dead_fraction", "dead_fraction"), ("sae_dense_fraction", "dense_fraction"))
_SPLICED_METRICS = (("sae_ce_clean", "ce_clean"), ("sae_ce_spliced", "ce_spliced"), ("sae_ce_zero", "ce_zero"),
                    ("sae_ce_mean", "ce_mean"), ("sae_delta_ce", "delta_ce"), ("sae_ce_recovered_zero", "ce_recovered_zero"),
                    ("sae_ce_recovered_mean", "ce_recovered_mean"), ("sae_kl", "kl"), ("sae_spliced_l0", "l0"))


def result_rows(
    metrics: ReconstructionMetrics | SplicedMetrics | Iterable[ReconstructionMetrics | SplicedMetrics], **identity: Any
) -> list[dict[str, Any]]:
    """Rows of the results schema (:mod:`lmscope.results.schema`), one per metric, domain ``"all"``.

    Reconstruction gives ``sae_mse``, ``sae_fvu``, ``sae_l0``, ``sae_dead_fraction``, ``sae_dense_fraction``
    (extra column ``tokens``: rows evaluated); spliced gives ``sae_ce_clean``, ``sae_ce_spliced``,
    ``sae_ce_zero``, ``sae_ce_mean``, ``sae_delta_ce``, ``sae_ce_recovered_zero``, ``sae_ce_recovered_mean``,
    ``sae_kl``, ``sae_spliced_l0`` (``tokens``: predictions scored). Every row has extra columns ``hook``,
    ``out_hook``, ``arch``, ``width``, ``k``. ``identity`` (suite, model, size, seed, revision, step,
    tokens_seen...) is copied into every row. Undefined values (a ``None`` loss recovered, an ``nan``
    FVU) are left out rather than written as sentinels.
    """
    items = [metrics] if isinstance(metrics, (ReconstructionMetrics, SplicedMetrics)) else list(metrics)
    rows = []
    for item in items:
        if isinstance(item, ReconstructionMetrics):
            names, tokens = _RECONSTRUCTION_METRICS, item.rows
        elif isinstance(item, SplicedMetrics):
            names, tokens = _SPLICED_METRICS, item.predictions
        else:
            raise LmscopeError(f"result_rows takes ReconstructionMetrics or SplicedMetrics, not {type(item).__name__}.")
        for metric, attribute in names:
            value = getattr(item, attribute)
            if value is None or value != value:
                continue
            rows.append({**identity, "metric": metric, "domain": "all", "value": float(value), "hook": item.hook,
                         "out_hook": item.out_hook, "arch": item.arch, "width": item.width, "k": item.k, "tokens": tokens})
    return rows
