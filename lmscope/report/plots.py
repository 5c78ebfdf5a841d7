"""Plots researchers expect from a sweep: a metric against tokens seen, one line per size (and seed)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path


def plot_metric_vs_tokens(table: pa.Table, metric: str, out_png: str | os.PathLike[str], domain: str = "all") -> Path:
    """``metric`` on ``domain`` against tokens seen (symmetric-log axis, so step 0 shows), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.to_pylist() if r["metric"] == metric and r["domain"] == domain and r["tokens_seen"] is not None]
    if not rows:
        raise LmscopeError(f"no {metric!r} results on domain {domain!r} with tokens seen to plot; run a sweep over a suite first.")
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        label = r["model"] if r.get("seed") in (None, 0) else f"{r['model']} (seed {r['seed']})"
        lines.setdefault(label, []).append((r["tokens_seen"], r["value"]))
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for label in sorted(lines):
        points = sorted(lines[label])
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    positive = [r["tokens_seen"] for r in rows if r["tokens_seen"] > 0]
    axis.set_xscale("symlog", linthresh=min(positive) if positive else 1)
    axis.set_xlabel("tokens seen")
    axis.set_ylabel(f"{metric} ({domain})")
    axis.grid(alpha=0.3)
    axis.legend(title="model")
    figure.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return out_png
