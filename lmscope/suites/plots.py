"""The training-curve plot of a mini suite: loss against tokens seen, one line per model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path

LOG_FILE = "train_log.parquet"


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (shorter at the start)."""
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def plot_train_logs(suite_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, smooth: int = 8) -> Path:
    """Plot every model's ``train_log.parquet`` in ``suite_dir`` as loss vs tokens seen (log x) into a PNG.

    Each model is one line (the loss of each update, averaged over the trailing ``smooth``
    updates; the raw losses drawn faintly behind it), coloured by size; seeds other than the
    first are dashed. Written atomically to ``out`` (default ``suite_dir/train_log.png``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmscopeError("plotting the training curves needs matplotlib; install it with pip install matplotlib.") from None
    suite_dir = Path(suite_dir)
    logs = sorted(path for path in suite_dir.glob(f"*/{LOG_FILE}"))
    if not logs:
        raise LmscopeError(f"{suite_dir} holds no {LOG_FILE}; train the suite first.")
    tables = [pq.read_table(path).to_pydict() for path in logs]
    sizes = list(dict.fromkeys(table["size"][0] for table in tables if table["size"]))
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(sizes), 1)))
    first_seed = min((table["seed"][0] for table in tables if table["seed"]), default=0)
    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for path, table in zip(logs, tables):
        if not table["step"]:
            continue
        size, seed = table["size"][0], table["seed"][0]
        colour = colours[sizes.index(size)]
        tokens = np.asarray(table["tokens_seen"], dtype=np.float64)
        loss = np.asarray(table["loss"], dtype=np.float64)
        axes.plot(tokens, loss, color=colour, alpha=0.15, linewidth=0.7)
        label = path.parent.name if seed == first_seed else f"{size} seed {seed}"
        axes.plot(tokens, _smooth(loss, smooth), color=colour, linewidth=1.6, linestyle="-" if seed == first_seed else "--", label=label)
    axes.set_xscale("log")
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("training loss (nats/token)")
    axes.set_title(f"{suite_dir.name}: training loss by size")
    axes.grid(True, which="both", alpha=0.25)
    axes.legend(title="model", fontsize="small")
    figure.tight_layout()
    target = Path(out) if out is not None else suite_dir / "train_log.png"
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return target
