"""Plots researchers expect from a sweep, each drawn from rows of the results schema.

Every function takes the results (a ``pyarrow`` table or a list of row dicts), writes one PNG
atomically and returns its path; it raises :class:`LmscopeError` when the results hold nothing
to draw. Models are drawn in order of size (the suite's own order when rows carry it), so
colours mean the same size in every figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path

Rows = pa.Table | Iterable[Mapping[str, Any]]


def _rows(results: Rows) -> list[dict[str, Any]]:
    return results.to_pylist() if isinstance(results, pa.Table) else [dict(r) for r in results]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, out_png: str | os.PathLike[str]) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    _pyplot().close(figure)
    return out_png


def _label(row: Mapping[str, Any]) -> str:
    return row["model"] if row.get("seed") in (None, 0) else f"{row['model']} (seed {row['seed']})"


def _size_key(label: str) -> tuple[float, str]:
    """Sort ``0.3m``, ``1.6m``, ``70m``, ``1b`` by the number they name; other labels after, by name."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9}
    head = label.split(" ")[0].lower()
    try:
        if head and head[-1] in units:
            return (float(head[:-1]) * units[head[-1]], label)
    except ValueError:
        pass
    return (math.inf, label)


def _models(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({_label(r) for r in rows}, key=_size_key)


def _symlog_tokens(axis: Any, tokens: Iterable[int]) -> None:
    """Symmetric-log x axis (step 0 shows at 0), without the negative side the autoscale margin would add."""
    positive = [t for t in tokens if t and t > 0]
    linthresh = min(positive) if positive else 1
    axis.set_xscale("symlog", linthresh=linthresh)
    if axis.get_xlim()[0] < 0:
        axis.set_xlim(left=-0.25 * linthresh)
    axis.set_xlabel("tokens seen")


def _panels(plt: Any, n: int, width: float = 4.2, height: float = 3.4) -> tuple[Any, list[Any]]:
    figure, axes = plt.subplots(1, n, figsize=(width * n + 0.6, height), squeeze=False)
    return figure, list(axes[0])


def plot_metric_vs_tokens(results: Rows, metric: str, out_png: str | os.PathLike[str], domain: str = "all",
                          where: Mapping[str, Any] | None = None, ylabel: str | None = None) -> Path:
    """``metric`` on ``domain`` against tokens seen (symmetric-log axis, so step 0 shows), one line per model.

    ``where`` keeps only rows whose extra columns have the given values (e.g. ``{"lens": "logit"}``).
    """
    plt = _pyplot()
    where = dict(where or {})
    rows = [r for r in _rows(results) if r["metric"] == metric and r["domain"] == domain and r["tokens_seen"] is not None
            and all(r.get(k) == v for k, v in where.items())]
    if not rows:
        raise LmscopeError(f"no {metric!r} results on domain {domain!r} with tokens seen to plot; run a sweep over a suite first.")
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        lines.setdefault(_label(r), []).append((r["tokens_seen"], r["value"]))
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for label in _models(rows):
        points = sorted(lines[label])
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    _symlog_tokens(axis, (r["tokens_seen"] for r in rows))
    axis.set_ylabel(ylabel or f"{metric} ({domain})")
    axis.grid(alpha=0.3)
    axis.legend(title="model")
    figure.tight_layout()
    return _save(figure, out_png)


def plot_domain_heatmap(results: Rows, out_png: str | os.PathLike[str], metric: str = "bits_per_byte") -> Path:
    """``metric`` per domain (rows) × checkpoint (columns), one panel per model stacked top to bottom, values in the cells."""
    plt = _pyplot()
    rows = [r for r in _rows(results) if r["metric"] == metric and r["domain"] != "all" and r["step"] is not None]
    if not rows:
        raise LmscopeError(f"no per-domain {metric!r} results at known steps to plot; run a bpb sweep over a suite first.")
    models = _models(rows)
    domains = sorted({r["domain"] for r in rows})
    values = [r["value"] for r in rows]
    vmin, vmax = min(values), max(values)
    n_steps = len({r["step"] for r in rows})
    figure, axes = plt.subplots(len(models), 1, figsize=(min(max(0.75 * n_steps + 2.5, 6.0), 12.0), (0.42 * len(domains) + 0.9) * len(models)),
                                squeeze=False)
    axes = list(axes[:, 0])
    image = None
    for axis, model in zip(axes, models):
        mine = [r for r in rows if _label(r) == model]
        steps = sorted({r["step"] for r in mine})
        grid = np.full((len(domains), len(steps)), np.nan)
        for r in mine:
            grid[domains.index(r["domain"]), steps.index(r["step"])] = r["value"]
        image = axis.imshow(grid, aspect="auto", cmap="viridis_r", vmin=vmin, vmax=vmax)
        axis.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=8)
        axis.set_yticks(range(len(domains)), domains, fontsize=8)
        axis.set_title(model, fontsize=9, loc="left")
        if len(steps) * len(domains) <= 160:
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    dark = (value - vmin) / ((vmax - vmin) or 1) > 0.5
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    axes[-1].set_xlabel("checkpoint step")
    figure.colorbar(image, ax=axes, label=metric.replace("_", " "), fraction=0.03, pad=0.02)
    return _save(figure, out_png)


def _spread(items: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced, first and last included."""
    if len(items) <= n:
        return items
    picks = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in picks]


def plot_memorization_vs_exposure(results: Rows, out_png: str | os.PathLike[str], bins: int = 8, max_checkpoints: int = 5) -> Path:
    """Mean memorization score against the step each sequence was trained at, one panel per model.

    One line per checkpoint (at most ``max_checkpoints``, evenly spread; darker = later), each a
    mean over ``bins`` equal spans of training steps; a dotted
    vertical line marks where the checkpoint was saved: sequences to its right had not yet been
    seen, so their scores are the chance-level control.
    """
    plt = _pyplot()
    rows = [r for r in _rows(results) if r["metric"] == "memorization_score" and r.get("step_seen") is not None]
    if not rows:
        raise LmscopeError("no memorization results to plot; run a sweep with --metrics memorization over a suite.")
    models = _models(rows)
    top = max(r["step_seen"] for r in rows) + 1
    edges = np.linspace(0, top, bins + 1)
    figure, axes = _panels(plt, len(models))
    cmap = plt.get_cmap("plasma")
    for axis, model in zip(axes, models):
        mine = [r for r in rows if _label(r) == model]
        checkpoints = _spread(sorted({r["step"] for r in mine if r["step"] is not None}), max_checkpoints)
        for k, step in enumerate(checkpoints):
            seen = np.array([r["step_seen"] for r in mine if r["step"] == step])
            score = np.array([r["value"] for r in mine if r["step"] == step])
            which = np.clip(np.digitize(seen, edges) - 1, 0, bins - 1)
            centres = [(edges[b] + edges[b + 1]) / 2 for b in range(bins) if (which == b).any()]
            means = [score[which == b].mean() for b in range(bins) if (which == b).any()]
            colour = cmap(0.85 * k / max(len(checkpoints) - 1, 1))
            axis.plot(centres, means, color=colour, marker=".", label=f"step {step}")
            if 0 < step < top:
                axis.axvline(step, color=colour, linestyle=":", linewidth=0.8)
        axis.set_title(model)
        axis.set_xlabel("step the sequence was trained at")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("memorization score (32 greedy tokens)")
    axes[-1].legend(title="checkpoint", fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    return _save(figure, out_png)


def plot_induction_heads(results: Rows, out_png: str | os.PathLike[str]) -> Path:
    """Prefix-matching (induction) score of every head against tokens seen, one panel per model."""
    plt = _pyplot()
    rows = [r for r in _rows(results) if r["metric"] == "induction_score" and r["tokens_seen"] is not None]
    if not rows:
        raise LmscopeError("no induction-head results to plot; run a sweep with --metrics induction over a suite.")
    models = _models(rows)
    figure, axes = _panels(plt, len(models))
    for axis, model in zip(axes, models):
        mine = [r for r in rows if _label(r) == model]
        heads = sorted({(r["layer"], r["head"]) for r in mine})
        layers = sorted({h[0] for h in heads})
        for layer, head in heads:
            points = sorted((r["tokens_seen"], r["value"]) for r in mine if (r["layer"], r["head"]) == (layer, head))
            style = ["-", "--", ":", "-."][layers.index(layer) % 4]
            axis.plot([p[0] for p in points], [p[1] for p in points], style, marker=".", label=f"L{layer}H{head}")
        _symlog_tokens(axis, (r["tokens_seen"] for r in mine))
        seq_lens = {r.get("seq_len") for r in mine} - {None}
        if len(seq_lens) == 1:
            from lmscope.evals.icl import uniform_induction_score

            axis.axhline(uniform_induction_score(seq_lens.pop()), color="grey", linestyle=":", linewidth=1)
        axis.set_title(model)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, ncol=2 if len(heads) > 6 else 1)
    axes[0].set_ylabel("induction (prefix-matching) score")
    figure.tight_layout()
    return _save(figure, out_png)


def plot_lens_curves(results: Rows, out_png: str | os.PathLike[str], metric: str = "lens_kl") -> Path:
    """Lens ``metric`` per layer, one panel per model: one line per checkpoint (darker = later),
    solid for the logit lens and dashed for the tuned lens."""
    plt = _pyplot()
    rows = [r for r in _rows(results) if r["metric"] == metric and r.get("layer") is not None and r["step"] is not None]
    if not rows:
        raise LmscopeError(f"no {metric!r} results to plot; run a sweep with --metrics lens over a suite.")
    models = _models(rows)
    figure, axes = _panels(plt, len(models))
    cmap = plt.get_cmap("viridis")
    for axis, model in zip(axes, models):
        mine = [r for r in rows if _label(r) == model]
        checkpoints = sorted({r["step"] for r in mine})
        for k, step in enumerate(checkpoints):
            colour = cmap(0.9 * k / max(len(checkpoints) - 1, 1))
            for kind, style in (("logit", "-"), ("tuned", "--")):
                points = sorted((r["layer"], r["value"]) for r in mine if r["step"] == step and (r.get("lens") or "logit") == kind)
                if points:
                    label = f"step {step}" if kind == "logit" else None
                    axis.plot([p[0] for p in points], [p[1] for p in points], style, color=colour, marker=".", label=label)
        layers = sorted({r["layer"] for r in mine})
        axis.set_xticks(layers)
        axis.set_xlabel("layer (residual stream after it)")
        axis.set_title(model)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel({"lens_kl": "KL to the final distribution (nats)", "lens_cross_entropy": "cross-entropy (nats)"}.get(metric, metric))
    handles, labels = axes[-1].get_legend_handles_labels()
    if any((r.get("lens") or "logit") == "tuned" for r in rows):
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], color="grey", linestyle="-"), Line2D([], [], color="grey", linestyle="--")]
        labels += ["logit lens", "tuned lens"]
    axes[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    return _save(figure, out_png)


# (panel title, metric, domain, extra-column filter, reduce over rows of one checkpoint)
OVERVIEW_PANELS: tuple[tuple[str, str, str, dict[str, Any], str], ...] = (
    ("bits per byte (held-out)", "bits_per_byte", "all", {}, "mean"),
    ("ICL score (nats)", "icl_score", "all", {}, "mean"),
    ("memorization (seen sequences)", "memorization_mean", "all", {}, "mean"),
    ("best induction score", "induction_score", "repeated_random_tokens", {}, "max"),
    ("logit-lens KL, first layer", "lens_kl", "all", {"lens": "logit", "layer": 0}, "mean"),
    ("tuned-lens KL, first layer", "lens_kl", "all", {"lens": "tuned", "layer": 0}, "mean"),
)


def plot_metrics_overview(results: Rows, out_png: str | os.PathLike[str]) -> Path:
    """Every metric the results hold against tokens seen (log axis), one small panel each, one line per model."""
    plt = _pyplot()
    rows = [r for r in _rows(results) if r["tokens_seen"] is not None]
    panels = []
    for title, metric, domain, where, reduce in OVERVIEW_PANELS:
        mine = [r for r in rows if r["metric"] == metric and r["domain"] == domain and all(r.get(k) == v for k, v in where.items())]
        if mine:
            panels.append((title, mine, reduce))
    if not panels:
        raise LmscopeError("no metric results with tokens seen to plot; run a sweep over a suite first.")
    columns = min(3, len(panels))
    n_rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(n_rows, columns, figsize=(3.9 * columns + 0.4, 2.9 * n_rows), squeeze=False)
    models = _models([r for _, mine, _ in panels for r in mine])
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    for axis, (title, mine, reduce) in zip(axes.flat, panels):
        points: dict[tuple[str, int], list[float]] = {}
        for r in mine:
            points.setdefault((_label(r), r["tokens_seen"]), []).append(r["value"])
        for model in models:
            line = sorted((t, max(v) if reduce == "max" else sum(v) / len(v)) for (m, t), v in points.items() if m == model)
            if line:
                axis.plot([p[0] for p in line], [p[1] for p in line], marker=".", color=colours[model], label=model)
        _symlog_tokens(axis, (r["tokens_seen"] for r in mine))
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.xaxis.label.set_size(8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    axes.flat[0].legend(title="model", fontsize=7, title_fontsize=7)
    figure.tight_layout()
    return _save(figure, out_png)


def plot_feature_track(summary: Rows, out_png: str | os.PathLike[str]) -> Path:
    """SAE latents across training (rows of :func:`lmscope.sae.track.track_summary`): alive, matched, born, died."""
    plt = _pyplot()
    rows = sorted(_rows(summary), key=lambda r: r["step"])
    if len(rows) < 2:
        raise LmscopeError("a feature track needs at least two checkpoints to plot; track over more checkpoints.")
    tokens = [r["tokens_seen"] if r["tokens_seen"] is not None else r["step"] for r in rows]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    styles = {"alive": ("black", "o", "alive (fired on this checkpoint's text)"),
              "matched": ("#2e7d32", "s", "matched to a latent of the previous checkpoint"),
              "born": ("#1565c0", "^", "born (alive, no match)"), "died": ("#c62828", "v", "died (lineage ended)")}
    for key, (colour, marker, label) in styles.items():
        axis.plot(tokens, [r[key] for r in rows], color=colour, marker=marker, markersize=4, label=label)
    axis.axhline(rows[0]["width"], color="grey", linestyle=":", linewidth=1, label=f"width ({rows[0]['width']:,})")
    _symlog_tokens(axis, tokens)
    axis.set_ylabel("latents")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, out_png)


def plot_lineage_density(timeline: Rows, lineages: list[int], out_png: str | os.PathLike[str]) -> Path:
    """Firing density of chosen lineages (rows of :func:`lmscope.sae.track.lineage_timeline`) against tokens seen."""
    plt = _pyplot()
    rows = [r for r in _rows(timeline) if r["lineage"] in set(lineages)]
    if not rows:
        raise LmscopeError(f"lineages {lineages} are not in the timeline; pick lineage ids it holds.")
    tokens = [r["tokens_seen"] if r["tokens_seen"] is not None else r["step"] for r in rows]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for lineage in lineages:
        points = sorted((r["tokens_seen"] if r["tokens_seen"] is not None else r["step"], r["density"])
                        for r in rows if r["lineage"] == lineage)
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=f"lineage {lineage}")
    _symlog_tokens(axis, tokens)
    axis.set_yscale("log")
    axis.set_ylabel("fraction of tokens the latent fires on")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    return _save(figure, out_png)


def plot_influence_by_exposure(scores: Rows, checkpoint_step: int, titles: list[str], out_png: str | os.PathLike[str]) -> Path:
    """Each candidate row's influence at ``checkpoint_step`` against the step it was trained at; one panel per query.

    ``scores``: rows of an influence ``scores.parquet`` (query, checkpoint_step, position, step, seen, score).
    Rows the checkpoint had not yet seen are drawn hollow.
    """
    plt = _pyplot()
    rows = [r for r in _rows(scores) if r["checkpoint_step"] == checkpoint_step]
    if not rows:
        raise LmscopeError(f"no influence scores at checkpoint step {checkpoint_step} to plot.")
    figure, axes = _panels(plt, len(titles), width=5.2, height=3.6)
    for q, (axis, title) in enumerate(zip(axes, titles)):
        mine = [r for r in rows if r["query"] == q]
        seen = [r for r in mine if r["seen"]]
        unseen = [r for r in mine if not r["seen"]]
        axis.scatter([r["step"] for r in seen], [r["score"] for r in seen], s=10, color="#1565c0", alpha=0.7, label="trained before the checkpoint")
        if unseen:
            axis.scatter([r["step"] for r in unseen], [r["score"] for r in unseen], s=10, facecolors="none", edgecolors="#888",
                         label="trained after it")
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xlabel("training step of the row")
        axis.set_ylabel(f"influence at step {checkpoint_step}")
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3)
        if q == 0:
            axis.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, out_png)


EXPLAIN_SCORES = (("simulation", "simulation (correlation)", 0.0), ("detection", "detection (balanced accuracy)", 0.5),
                  ("fuzzing", "fuzzing (balanced accuracy)", 0.5))


def plot_explanation_scores(results: Rows, out_png: str | os.PathLike[str]) -> Path:
    """Scores of explanations (``explain_*`` rows): per score, one column of dots per unit kind, own and shuffled."""
    plt = _pyplot()
    rows = [r for r in _rows(results) if str(r.get("metric", "")).startswith("explain_")]
    if not rows:
        raise LmscopeError("no explain_* results to plot; run `lmscope explain` first.")
    kinds = sorted({r["unit_kind"] for r in rows})
    groups = [(kind, source) for kind in kinds for source in ("own", "shuffled")]
    figure, axes = _panels(plt, len(EXPLAIN_SCORES), width=3.6, height=3.6)
    rng = np.random.default_rng(0)
    for axis, (name, title, chance) in zip(axes, EXPLAIN_SCORES):
        for x, (kind, source) in enumerate(groups):
            values = [r["value"] for r in rows if r["metric"] == f"explain_{name}" and r["unit_kind"] == kind
                      and r["explanation_source"] == source]
            if not values:
                continue
            colour = "#e65100" if kind == "feature" else "#3949ab"
            axis.scatter(x + rng.uniform(-0.12, 0.12, len(values)), values, s=16, color=colour,
                         alpha=0.9 if source == "own" else 0.35, edgecolors="none")
            axis.hlines(float(np.median(values)), x - 0.3, x + 0.3, color="black", linewidth=1.5)
        axis.axhline(chance, color="grey", linestyle=":", linewidth=1)
        axis.set_xticks(range(len(groups)), [f"{kind}s\n{source}" for kind, source in groups], fontsize=7)
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return _save(figure, out_png)
