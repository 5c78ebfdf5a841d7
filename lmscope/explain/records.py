r"""Activation records: windows of text with a unit's activation at every token, and where the text came from.

A *unit* is one neuron (a column of a hook's activations) or one SAE feature (a latent of an SAE reading
that hook). Its records come from an activation store, whose rows are token positions grouped into
contexts. For each unit, one pass over the store gives every context's maximum; then

- **top** contexts, by their maximum, alternate between the explainer's records (ranks 0, 2, 4, …) and the
  held-out records scored later (ranks 1, 3, 5, …), so both see equally strong examples;
- **quantile** contexts: among the remaining contexts where the unit fires, those at evenly spaced
  quantiles of the maximum (alternating the same way), so that weaker firing shows too;
- **random** contexts: a seeded sample of all contexts, as OpenAI's random records; **quiet** contexts: a
  seeded sample of those whose maximum discretises to 0 (or, for a unit active nearly everywhere, the
  contexts with the lowest maxima), the non-activating side of detection.

A record is a window of ``window`` tokens of its context that ends ``after`` tokens past the maximum (random
and quiet records: a seeded window). Activations are discretised as OpenAI's explainer shows them:
:math:`\mathrm{round}(10 \cdot \max(a, 0) / a_{max})`, with :math:`a_{max}` the unit's maximum over the store.
Each record keeps its document id, domain, the document position of its maximum token and, with a replay
source of a mini suite, the training steps whose batch held that token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress

RecordKind = Literal["top", "quantile", "random", "quiet"]


@dataclass
class ActivationRecord:
    """One window of text and a unit's activation at each of its tokens."""

    kind: str
    """``top``, ``quantile``, ``random`` or ``quiet``."""
    tokens: list[str]
    """The window's tokens as text (the studied model's tokenizer)."""
    activations: list[float]
    """The unit's activation at each token."""
    context: int
    """The store's context id."""
    first_row: int
    """Store row of the window's first token."""
    doc_id: str | None = None
    domain: str | None = None
    position: int | None = None
    """Document position of the window's maximum token."""
    steps_seen: list[int] | None = None
    """Training steps whose batch held that token (mini suites; ``None`` when unknown)."""

    def discretised(self, max_activation: float) -> list[int]:
        """Activations on OpenAI's 0 … 10 scale, relative to the unit's maximum."""
        return discretise(self.activations, max_activation)

    @property
    def peak(self) -> int:
        """Index of the largest activation in the window."""
        return int(np.argmax(self.activations)) if self.activations else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def discretise(activations: list[float] | np.ndarray, max_activation: float) -> list[int]:
    """``round(10 · max(a, 0) / max_activation)`` per activation, in 0 … 10 (all 0 when the maximum is not positive)."""
    a = np.asarray(activations, dtype=np.float64)
    if max_activation <= 0:
        return [0] * len(a)
    return np.clip(np.rint(10 * np.clip(a, 0, None) / max_activation), 0, 10).astype(int).tolist()


@dataclass
class UnitRecords:
    """Everything the explainer and the scorers see of one unit."""

    unit: int
    max_activation: float
    """The unit's largest activation over the store (the scale's 10)."""
    density: float
    """Fraction of the store's tokens where the unit's activation is positive."""
    explain: list[ActivationRecord] = field(default_factory=list)
    """Shown to the explainer: top and quantile records."""
    holdout: list[ActivationRecord] = field(default_factory=list)
    """Scored: held-out top and quantile records, never shown to the explainer."""
    random: list[ActivationRecord] = field(default_factory=list)
    """Scored by the simulator beside the held-out ones."""
    quiet: list[ActivationRecord] = field(default_factory=list)
    """Contexts where the unit stays at 0 on the scale: detection's negatives."""

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "max_activation": self.max_activation, "density": self.density,
                **{name: [r.to_dict() for r in getattr(self, name)] for name in ("explain", "holdout", "random", "quiet")}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnitRecords":
        return cls(data["unit"], data["max_activation"], data["density"],
                   **{name: [ActivationRecord(**r) for r in data[name]] for name in ("explain", "holdout", "random", "quiet")})


@dataclass(frozen=True)
class RecordSettings:
    """How many records of each kind, and how long."""

    window: int = 32
    """Tokens per record."""
    after: int = 4
    """Tokens kept after a top or quantile record's maximum (when the context has them)."""
    top: int = 4
    """Top records for the explainer, and as many held out."""
    quantile: int = 2
    """Quantile records for the explainer, and as many held out."""
    random: int = 4
    """Random records the simulator scores."""
    quiet: int = 6
    """Non-activating records for detection."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 2 or not 0 <= self.after < self.window or self.top < 1 or min(self.quantile, self.random, self.quiet) < 0:
            raise LmscopeError("record settings: window must be >= 2, after in 0 … window-1, top >= 1 and quantile, random, "
                               "quiet >= 0.")


class UnitSource:
    """Activations of units over a store's rows: neurons (``sae=None``: columns of the hook) or SAE features."""

    def __init__(self, store: Any, hook: str, sae: Any = None) -> None:
        if hook not in store.hooks:
            raise LmscopeError(f"activation store {store.root} has no hook {hook!r} (it has {', '.join(store.hooks)}); "
                               "capture it first with `lmscope activations`.")
        if sae is not None and store.d(hook) != sae.shape.d_in:
            raise LmscopeError(f"hook {hook!r} has width {store.d(hook)} in the store but the SAE reads {sae.shape.d_in}; "
                               "pass the store the SAE was trained on.")
        self.store, self.hook, self.sae = store, hook, sae
        self.kind = "neuron" if sae is None else "feature"
        self.n_units = store.d(hook) if sae is None else sae.shape.width

    @torch.no_grad()
    def activations(self, units: list[int], rows: Any = None, batch_size: int = 4096) -> Tensor:
        """``[n_rows, len(units)]`` float32 activations at ``rows`` (default: every row, in store order)."""
        index = torch.as_tensor(units, dtype=torch.long)
        if rows is not None:
            return self._encode(self.store.rows(self.hook, np.asarray(rows)).float())[:, index]
        parts = []
        for start in range(0, self.store.n_rows, batch_size):
            x = self.store.rows(self.hook, slice(start, min(start + batch_size, self.store.n_rows))).float()
            parts.append(self._encode(x)[:, index])
        return torch.cat(parts) if parts else torch.zeros((0, len(units)))

    def _encode(self, x: Tensor) -> Tensor:
        if self.sae is None:
            return x
        return self.sae.encode(x.to(self.sae.W_enc.dtype) * self.sae.input_scale.float()).float()

    @torch.no_grad()
    def firing(self, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Per unit: the maximum activation and the fraction of rows where it is positive (one pass)."""
        maximum = torch.full((self.n_units,), float("-inf"))
        count = torch.zeros(self.n_units, dtype=torch.float64)
        for start in range(0, self.store.n_rows, batch_size):
            acts = self._encode(self.store.rows(self.hook, slice(start, min(start + batch_size, self.store.n_rows))).float())
            maximum = torch.maximum(maximum, acts.max(dim=0).values)
            count += (acts > 0).sum(dim=0).double()
        return maximum.numpy(), (count / max(self.store.n_rows, 1)).numpy()


def choose_units(source: UnitSource, n: int, seed: int = 0, *, min_density: float = 1e-4, max_density: float = 0.9,
                 units: list[int] | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``units`` (checked), or ``n`` units drawn with ``seed`` among those whose firing density lies in the bounds.

    Returns the units, and every unit's maximum and density.
    """
    maximum, density = source.firing()
    if units is not None:
        bad = [u for u in units if not 0 <= u < source.n_units]
        if bad:
            raise LmscopeError(f"units {bad} are not in 0 … {source.n_units - 1}; pick {source.kind}s of {source.hook}.")
        return list(units), maximum, density
    eligible = np.flatnonzero((density >= min_density) & (density <= max_density) & (maximum > 0))
    if len(eligible) == 0:
        raise LmscopeError(f"no {source.kind} of {source.hook} fires on between {min_density:g} and {max_density:g} of the "
                           f"{source.store.n_rows} tokens in {source.store.root}; capture more tokens or pass --units.")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=min(n, len(eligible)), replace=False))
    return chosen.tolist(), maximum, density


def _contexts(store: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted unique context ids, the first row of each, and each context's number of rows (rows are grouped by context)."""
    context = store.metadata["context"]
    ids, first, counts = np.unique(context, return_index=True, return_counts=True)
    order = np.argsort(first)
    ids, first, counts = ids[order], first[order], counts[order]
    if not np.array_equal(np.repeat(ids, counts), context):
        raise LmscopeError(f"activation store {store.root} does not keep each context's rows together; recapture it with "
                           "`lmscope activations`.")
    return ids, first, counts


def _quiet_contexts(per_context: np.ndarray, maximum: float, used: set[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` contexts where the unit stays at 0 on the 0 … 10 scale (maximum below 5 % of the unit's), drawn with ``rng``.

    A unit active nearly everywhere (a GELU neuron) may have too few such contexts: the rest are the contexts
    with the lowest maxima.
    """
    free = np.array([c for c in range(len(per_context)) if c not in used], dtype=np.int64)
    if n == 0 or len(free) == 0:
        return np.zeros(0, dtype=np.int64)
    zero = free[per_context[free] < 0.05 * maximum] if maximum > 0 else free
    if len(zero) >= n:
        return np.sort(rng.choice(zero, size=n, replace=False))
    lowest = free[np.lexsort((free, per_context[free]))][:n]
    return np.sort(lowest)


def unit_records(source: UnitSource, units: list[int], settings: RecordSettings = RecordSettings(), *, tokenizer: Any = None,
                 replay: Any = None, progress: Progress = no_progress) -> list[UnitRecords]:
    """The records of each of ``units`` (see the module docstring), with provenance.

    Args:
        tokenizer: the studied model's tokenizer, to show tokens as text (else their ids as text).
        replay: a mini suite's replay source, for the training steps of each record's maximum token.
    """
    from lmscope.sae.features import document_lookup, steps_seen

    store = source.store
    if store.n_rows == 0:
        raise LmscopeError(f"activation store {store.root} is empty; capture some tokens first.")
    ids, first, counts = _contexts(store)
    meta = store.metadata
    doc_ids, domains = document_lookup(store)
    exposures: dict[tuple[int, int], list[int]] = {}
    pieces: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in pieces:
            pieces[token] = str(token) if tokenizer is None else tokenizer.decode([token])
        return pieces[token]

    progress("activation records", 0, len(units) + 1)
    acts = source.activations(units)  # [n_rows, n_units]
    density = (acts > 0).double().mean(dim=0).numpy()
    progress("activation records", 1, len(units) + 1)
    out = []
    for j, unit in enumerate(units):
        a = acts[:, j].numpy()
        maximum = float(a.max())
        per_context = np.maximum.reduceat(a, first)  # contexts are contiguous runs of rows starting at ``first``
        argmax = np.empty(len(ids), dtype=np.int64)
        for c in range(len(ids)):  # first row of the maximum within each context
            argmax[c] = first[c] + int(np.argmax(a[first[c] : first[c] + counts[c]]))
        rng = np.random.default_rng([settings.seed, unit])
        order = np.lexsort((np.arange(len(ids)), -per_context))  # by maximum, descending; ties to the earlier context
        firing = order[per_context[order] > 0]
        top = firing[: 2 * settings.top]
        rest = firing[2 * settings.top :]
        quantile = rest[np.unique(np.linspace(0, len(rest) - 1, 2 * settings.quantile).round().astype(int))] \
            if settings.quantile and len(rest) else np.zeros(0, dtype=np.int64)
        used = set(top.tolist()) | set(quantile.tolist())
        random_pool = np.array([c for c in range(len(ids)) if c not in used], dtype=np.int64)
        random = rng.choice(random_pool, size=min(settings.random, len(random_pool)), replace=False) if len(random_pool) else random_pool
        used |= set(random.tolist())
        quiet = _quiet_contexts(per_context, maximum, used, settings.quiet, rng)

        def record(c: int, kind: str, around_peak: bool) -> ActivationRecord:
            lo, n = int(first[c]), int(counts[c])
            if around_peak:
                end = min(lo + n, int(argmax[c]) + settings.after + 1)
                start = max(lo, end - settings.window)
            else:
                start = lo + int(rng.integers(0, max(n - settings.window, 0) + 1))
            end = min(lo + n, start + settings.window)
            rows = np.arange(start, end)
            peak = int(rows[np.argmax(a[rows])])
            doc_index, position = int(meta["doc_index"][peak]), int(meta["position"][peak])
            doc_id = doc_ids.get(doc_index)
            return ActivationRecord(kind=kind, tokens=[text(int(t)) for t in meta["token"][rows]],
                                    activations=[float(v) for v in a[rows]], context=int(ids[c]), first_row=start,
                                    doc_id=doc_id, domain=domains.get(doc_index), position=position,
                                    steps_seen=steps_seen(replay, doc_id, position, exposures))

        records = UnitRecords(unit=int(unit), max_activation=maximum, density=float(density[j]))
        for rank, c in enumerate(top.tolist()):
            (records.explain if rank % 2 == 0 else records.holdout).append(record(c, "top", True))
        for rank, c in enumerate(quantile.tolist()):
            (records.explain if rank % 2 == 0 else records.holdout).append(record(c, "quantile", True))
        records.random = [record(c, "random", False) for c in random.tolist()]
        records.quiet = [record(c, "quiet", False) for c in quiet.tolist()]
        out.append(records)
        progress("activation records", 1, len(units) + 1)
    return out
