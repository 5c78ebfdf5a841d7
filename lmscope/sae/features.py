r"""Features with provenance: what makes each SAE feature fire, in which documents, seen when.

Two streaming passes over an activation store (rows in store order, so results do not depend
on any shuffling):

1. per feature: firing count (density = count / rows), sum and maximum of its activation, a
   histogram of :math:`\log_{10}` of its non-zero activations, and the ``top_n`` rows where it is
   largest (ties to the lower row);
2. per feature and per activation interval — the maximum split into ``n_intervals`` equal parts,
   as in Anthropic's feature browser — up to ``samples_per_interval`` rows, chosen by a seeded
   random priority, so that what a feature does at low activation shows too.

Every example records its row, document (index, id, domain), the token's position in the
document, the token and a window of the context around it. When a replay source with a
document table is given (a mini suite whose corpus the store was captured from), each example
also records ``steps_seen``: every training step whose batch held that exact token of that
document (:func:`lmscope.suites.replay.find_document`); held-out text has none.

Logit effects: the feature's decoder direction read through the unembedding,
:math:`W_{dec,i} W_U^\top`, top and bottom tokens (direct effect on the logits, ignoring the
final norm, as feature browsers show it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress

HISTOGRAM_EDGES = np.linspace(-4.0, 3.0, 36)  # log10 of the activation: 1e-4 … 1e3, 0.2 decades per bin


@dataclass
class FeatureReport:
    """Per-feature statistics (``stats``, one row per feature) and examples (``examples``, one row per example)."""

    stats: pa.Table
    examples: pa.Table

    def write(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``feature_stats.parquet`` and ``feature_examples.parquet`` atomically into ``directory``."""
        import pyarrow.parquet as pq

        from lmscope.fsio import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = (directory / "feature_stats.parquet", directory / "feature_examples.parquet")
        for table, path in zip((self.stats, self.examples), paths):
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp)
        return paths


def _batches(store: Any, hook: str, batch_size: int) -> Any:
    for start in range(0, store.n_rows, batch_size):
        stop = min(start + batch_size, store.n_rows)
        yield start, store.rows(hook, slice(start, stop)).float()


def _merge_top(values: Tensor, rows: Tensor, new_values: Tensor, new_rows: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Keep the ``n`` largest (value, lower row first) per feature of ``[W, m]`` candidates.

    Only positive entries at least as large as the batch's ``n``-th largest (ties included) can enter,
    so the exact tie-broken sort runs on a few candidates per feature.
    """
    width = values.shape[0]
    kth = new_values.topk(min(n, new_values.shape[1]), dim=1).values[:, -1:]
    feature, column = torch.nonzero((new_values >= kth) & (new_values > 0), as_tuple=True)
    old_feature = torch.arange(width).repeat_interleave(values.shape[1])
    feat = torch.cat([old_feature, feature]).numpy()
    val = torch.cat([values.reshape(-1), new_values[feature, column]]).numpy()
    row = torch.cat([rows.reshape(-1), new_rows[feature, column]]).numpy()
    order = np.lexsort((row, -val.astype(np.float64), feat))  # by feature, then value descending, then row
    feat, val, row = feat[order], val[order], row[order]
    starts = np.searchsorted(feat, np.arange(width))
    rank = np.arange(len(feat)) - starts[feat]
    keep = rank < n
    out_values = torch.full((width, n), float("-inf"))
    out_rows = torch.full((width, n), -1, dtype=torch.long)
    out_values[feat[keep], rank[keep]] = torch.from_numpy(val[keep]).float()
    out_rows[feat[keep], rank[keep]] = torch.from_numpy(row[keep])
    return out_values, out_rows


def _histogram_add(histogram: np.ndarray, acts: Tensor) -> None:
    """Add the ``log10`` of every non-zero activation of ``acts [rows, n_feat]`` to ``histogram [n_feat, bins]``."""
    rows, feature = torch.nonzero(acts > 0, as_tuple=True)
    bins = np.searchsorted(HISTOGRAM_EDGES, np.log10(acts[rows, feature].double().numpy()), side="right") - 1
    last = len(HISTOGRAM_EDGES) - 1
    bins[np.log10(acts[rows, feature].double().numpy()) == HISTOGRAM_EDGES[-1]] = last - 1  # numpy's closed last bin
    inside = (bins >= 0) & (bins < last)
    np.add.at(histogram, (feature.numpy()[inside], bins[inside]), 1)


@torch.no_grad()
def feature_report(
    sae: Any,
    store: Any,
    *,
    hook: str | None = None,
    features: list[int] | None = None,
    top_n: int = 10,
    n_intervals: int = 5,
    samples_per_interval: int = 3,
    window: tuple[int, int] = (8, 4),
    tokenizer: Any = None,
    unembedding: Tensor | None = None,
    n_logit_tokens: int = 8,
    replay: Any = None,
    batch_size: int = 2048,
    seed: int = 0,
    progress: Progress = no_progress,
) -> FeatureReport:
    """Statistics and examples of ``features`` (default: all) of ``sae`` over the rows of ``store``.

    Args:
        sae: a :class:`lmscope.sae.model.SparseAutoencoder` (raw-activation inputs: folded, or
            with its scales, which are applied here).
        store: an :class:`lmscope.activations.reader.ActivationStore` holding ``hook`` (default ``sae.shape.hook``).
        window: tokens of context shown before and after the example's token (same context only).
        tokenizer: decodes tokens to text for the examples and the logit effects (optional).
        unembedding: ``[vocab, d]`` output embedding for logit effects (optional; SAEs of a residual-width hook only:
            transcoders and SAEs on MLP neurons get none).
        replay: a replay source with a document table (a mini suite) for ``steps_seen`` (optional).
    """
    hook = hook or sae.shape.hook
    if hook not in store.hooks:
        raise LmscopeError(f"activation store {store.root} has no hook {hook!r} (it has {', '.join(store.hooks)}); "
                           "capture that hook first with `lmscope activations`.")
    if store.d(hook) != sae.shape.d_in:
        raise LmscopeError(f"hook {hook!r} has width {store.d(hook)} in the store but the SAE reads {sae.shape.d_in}; "
                           "pass the SAE trained on this hook.")
    if top_n < 1 or n_intervals < 1 or samples_per_interval < 0 or batch_size < 1:
        raise LmscopeError("top_n, n_intervals and batch_size must be positive and samples_per_interval non-negative.")
    width = sae.shape.width
    chosen = torch.arange(width) if features is None else torch.as_tensor(features, dtype=torch.long)
    if chosen.numel() == 0 or int(chosen.min()) < 0 or int(chosen.max()) >= width:
        raise LmscopeError(f"features {features} are not all in 0 … {width - 1}; pick feature indices of this SAE.")
    n_feat = chosen.numel()
    scale = sae.input_scale.float()

    def encode(x: Tensor) -> Tensor:
        return sae.encode(x.to(sae.W_enc.dtype) * scale)[:, chosen].float()

    count = torch.zeros(n_feat, dtype=torch.float64)
    total = torch.zeros(n_feat, dtype=torch.float64)
    top_values = torch.full((n_feat, top_n), float("-inf"))
    top_rows = torch.full((n_feat, top_n), -1, dtype=torch.long)
    histogram = np.zeros((n_feat, len(HISTOGRAM_EDGES) - 1), dtype=np.int64)
    n_batches = -(-store.n_rows // batch_size)
    progress("feature statistics", 0, 2 * n_batches)
    for start, x in _batches(store, hook, batch_size):
        acts = encode(x)
        active = acts > 0
        count += active.sum(0).double()
        total += acts.sum(0).double()
        rows = torch.arange(start, start + acts.shape[0]).expand(n_feat, -1)
        top_values, top_rows = _merge_top(top_values, top_rows, acts.T, rows, top_n)
        _histogram_add(histogram, acts)
        progress("feature statistics", 1, 2 * n_batches)
    maximum = top_values[:, 0].clamp_min(0)

    generator = torch.Generator().manual_seed(seed)
    sample_keys = torch.full((n_feat, n_intervals, 0), float("inf"))
    sample_rows = torch.zeros((n_feat, n_intervals, 0), dtype=torch.long)
    for start, x in _batches(store, hook, batch_size):
        acts = encode(x)
        priority = torch.rand(acts.shape, generator=generator)
        interval = (acts / maximum.clamp_min(1e-30) * n_intervals).long().clamp_max(n_intervals - 1)
        if samples_per_interval:
            fired = acts > 0
            keys, picked = [], []
            take = min(samples_per_interval, acts.shape[0])
            for b in range(n_intervals):
                candidate = torch.where(fired & (interval == b), priority, torch.inf)  # [batch, n_feat]
                best = candidate.topk(take, dim=0, largest=False, sorted=True)  # the batch's own smallest keys first
                merged_keys = torch.cat([sample_keys[:, b], best.values.T], dim=1)
                merged_rows = torch.cat([sample_rows[:, b], best.indices.T + start], dim=1)
                smallest = merged_keys.topk(min(samples_per_interval, merged_keys.shape[1]), dim=1, largest=False, sorted=True)
                keys.append(smallest.values)
                picked.append(merged_rows.gather(1, smallest.indices))
            sample_keys, sample_rows = torch.stack(keys, dim=1), torch.stack(picked, dim=1)
        progress("feature statistics", 1, 2 * n_batches)

    examples = _examples(store, hook, chosen, top_values, top_rows, sample_keys, sample_rows, window, tokenizer, replay, encode)
    stats = _stats(chosen, count, total, store.n_rows, maximum, histogram, sae, unembedding, tokenizer, n_logit_tokens)
    return FeatureReport(stats, examples)


def _decode(tokenizer: Any, ids: list[int]) -> str | None:
    return None if tokenizer is None else tokenizer.decode(ids)


def _examples(store: Any, hook: str, chosen: Tensor, top_values: Tensor, top_rows: Tensor, sample_keys: Tensor,
              sample_rows: Tensor, window: tuple[int, int], tokenizer: Any, replay: Any, encode: Any) -> pa.Table:
    meta = store.metadata
    doc_ids, domains = document_lookup(store)
    wanted: list[tuple[int, str, int, int, float | None]] = []  # (feature position, kind, rank, row, activation)
    top_v, top_r = top_values.numpy(), top_rows.numpy()
    finite, sample_r = np.isfinite(sample_keys.numpy()), sample_rows.numpy()
    for j in range(chosen.numel()):
        for rank in np.flatnonzero(top_v[j] > 0).tolist():
            wanted.append((j, "top", rank, int(top_r[j, rank]), float(top_v[j, rank])))
        for interval, rank in zip(*np.nonzero(finite[j])):
            wanted.append((j, f"interval_{int(interval)}", int(rank), int(sample_r[j, interval, rank]), None))
    # Activations of the sampled rows, recomputed exactly as in the passes.
    sampled_rows = sorted({w[3] for w in wanted if w[4] is None})
    sampled = {}
    if sampled_rows:
        acts = encode(store.rows(hook, np.asarray(sampled_rows)).float())
        sampled = {row: acts[i] for i, row in enumerate(sampled_rows)}
    exposures_cache: dict[tuple[int, int], list[int]] = {}
    records = []
    for j, kind, rank, row, value in wanted:
        if value is None:
            value = float(sampled[row][j])
        context = meta["context"]
        lo, hi = max(0, row - window[0]), min(store.n_rows, row + window[1] + 1)
        same = [r for r in range(lo, hi) if context[r] == context[row]]
        tokens = [int(meta["token"][r]) for r in same]
        doc_index, position = int(meta["doc_index"][row]), int(meta["position"][row])
        record = {
            "feature": int(chosen[j]), "kind": kind, "rank": rank, "activation": value, "row": row,
            "doc_index": doc_index, "doc_id": doc_ids.get(doc_index), "domain": domains.get(doc_index),
            "position": position, "token": int(meta["token"][row]), "context_tokens": tokens,
            "token_index": same.index(row), "context_text": _decode(tokenizer, tokens),
            "context_pieces": None if tokenizer is None else [tokenizer.decode([t]) for t in tokens],
            "token_text": _decode(tokenizer, [int(meta["token"][row])]),
            "steps_seen": steps_seen(replay, doc_ids.get(doc_index), position, exposures_cache),
        }
        records.append(record)
    return pa.Table.from_pylist(records, schema=_EXAMPLE_SCHEMA)


_EXAMPLE_SCHEMA = pa.schema([
    ("feature", pa.int64()), ("kind", pa.string()), ("rank", pa.int64()), ("activation", pa.float64()), ("row", pa.int64()),
    ("doc_index", pa.int64()), ("doc_id", pa.string()), ("domain", pa.string()), ("position", pa.int64()),
    ("token", pa.int64()), ("context_tokens", pa.list_(pa.int64())), ("token_index", pa.int64()),
    ("context_text", pa.string()), ("context_pieces", pa.list_(pa.string())), ("token_text", pa.string()), ("steps_seen", pa.list_(pa.int64())),
])


def document_lookup(store: Any) -> tuple[dict[int, str], dict[int, str]]:
    table = store.documents
    if table is None:
        return {}, {}
    index = table.column("doc_index").to_pylist()
    ids = dict(zip(index, table.column("id").to_pylist())) if "id" in table.column_names else {}
    domains = dict(zip(index, table.column("domain").to_pylist())) if "domain" in table.column_names else {}
    return ids, domains


def steps_seen(replay: Any, doc_id: str | None, position: int, cache: dict[tuple[int, int], list[int]]) -> list[int] | None:
    """Training steps whose batch held token ``position`` of document ``doc_id`` (None without a replay source)."""
    if replay is None or doc_id is None or position < 0:
        return None
    from lmscope.suites.replay import find_document

    try:
        doc_index = replay.doc_index_of(doc_id)
    except LmscopeError:
        return []  # a document the suite's corpus does not hold was never trained on
    key = (doc_index, position)
    if key not in cache:
        found = find_document(replay, doc_index=doc_index, token_range=(position, position + 1))
        cache[key] = sorted({e.step for e in found.exposures})
    return cache[key]


def _stats(chosen: Tensor, count: Tensor, total: Tensor, n_rows: int, maximum: Tensor, histogram: np.ndarray, sae: Any,
           unembedding: Tensor | None, tokenizer: Any, n_logit_tokens: int) -> pa.Table:
    columns: dict[str, Any] = {
        "feature": chosen.tolist(),
        "density": (count / max(n_rows, 1)).tolist(),
        "fired": count.long().tolist(),
        "max_activation": maximum.tolist(),
        "mean_when_active": (total / count.clamp_min(1)).tolist(),
        "log10_histogram": histogram.tolist(),
    }
    if unembedding is not None and not sae.shape.transcoder and unembedding.shape[1] == sae.shape.d_in:
        # Raw-space decoder direction: W_dec / output_scale (fold_scales), through the unembedding.
        direction = (sae.W_dec[chosen] / sae.output_scale).float()
        effects = direction @ unembedding.float().T  # [n_feat, vocab]
        top = effects.topk(n_logit_tokens, dim=1)
        bottom = (-effects).topk(n_logit_tokens, dim=1)
        columns["top_logit_tokens"] = top.indices.tolist()
        columns["top_logit_values"] = top.values.tolist()
        columns["bottom_logit_tokens"] = bottom.indices.tolist()
        columns["bottom_logit_values"] = (-bottom.values).tolist()
        if tokenizer is not None:
            columns["top_logit_text"] = [[tokenizer.decode([t]) for t in row] for row in top.indices.tolist()]
            columns["bottom_logit_text"] = [[tokenizer.decode([t]) for t in row] for row in bottom.indices.tolist()]
    table = pa.table(columns)
    return table.append_column("histogram_edges", pa.array([HISTOGRAM_EDGES.tolist()] * len(chosen), pa.list_(pa.float64())))
