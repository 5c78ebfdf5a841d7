"""The figures of a sweep: every plot the results can support, with its reading and how to read it.

:func:`sweep_figures` is shared by ``lmscope eval`` (which writes the PNGs next to its
results) and the study report (which embeds them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from lmscope.report import plots, readings
from lmscope.report.plots import _rows
from lmscope.report.html import Figure


def _spec() -> list[tuple[str, str, Callable[[Any, Path], Path], Callable[[Any], str | None], str]]:
    """(file stem, title, plot, reading, explanation) of every figure, in report order."""
    return [
        ("overview", "Every metric against tokens seen",
         lambda t, p: plots.plot_metrics_overview(t, p),
         readings.overview,
         "One panel per metric, one line per model size; x: tokens trained on (log scale). The figures below show "
         "each metric in full, with its definition."),
        ("bits_per_byte", "Bits per byte on held-out text, across training",
         lambda t, p: plots.plot_metric_vs_tokens(t, "bits_per_byte", p, ylabel="bits per byte (all held-out domains)"),
         lambda t: readings.metric_vs_tokens(t, "bits_per_byte", "Held-out bits per byte went"),
         "Bits per byte (Paloma's measure): −Σ log2 p(token) over each held-out document divided by its UTF-8 bytes, "
         "summed over all domains; lower is better and comparable across tokenizers. x: tokens trained on (log scale); "
         "one line per model size."),
        ("bits_per_byte_by_domain", "Bits per byte by domain and checkpoint",
         lambda t, p: plots.plot_domain_heatmap(t, p),
         readings.domain_heatmap,
         "Each cell is one domain (row) at one checkpoint (column), in bits per byte; lighter is better. A domain "
         "learned late, or not at all, stays dark along its row."),
        ("icl_score", "In-context learning score",
         lambda t, p: plots.plot_metric_vs_tokens(t, "icl_score", p, ylabel="loss(late token) − loss(early token), nats"),
         lambda t: readings.metric_vs_tokens(t, "icl_score", "The in-context learning score went"),
         "Olsson et al.'s score: mean loss at a late token of a held-out context minus the loss at an early one (token "
         "500 and 50, or 90% and 10% of the context when it is shorter). More negative means the model makes more use "
         "of its context."),
        ("memorization", "Memorization of training sequences against when they were seen",
         lambda t, p: plots.plot_memorization_vs_exposure(t, p),
         readings.memorization,
         "Pythia's test: sequences sampled across the training order; the model gets the first 32 tokens and decodes "
         "32 greedily; the score is the fraction of those equal to the true continuation (1 = 32-extractable). x: the "
         "step at which the sequence was trained on; one line per checkpoint. Sequences to the right of a checkpoint's "
         "dotted line were not yet seen by it and show the score that text of this kind gets without memorization."),
        ("induction_heads", "Induction heads forming",
         lambda t, p: plots.plot_induction_heads(t, p),
         readings.induction_heads,
         "For each attention head: on random tokens repeated twice, the mean attention from a repeated token to the "
         "token that followed its first occurrence (the prefix-matching score). Induction heads score near 1; the "
         "jump, when it comes, is the induction bump of Olsson et al. The grey dotted line is what a head attending "
         "uniformly to all earlier tokens would score."),
        ("lens_kl", "What each layer already predicts (logit and tuned lens)",
         lambda t, p: plots.plot_lens_curves(t, p, "lens_kl"),
         lambda t: readings.lens(t, "lens_kl"),
         "KL divergence (nats) from the model's final next-token distribution to the distribution read from the "
         "residual stream after each layer: through the final norm and unembedding directly (logit lens, solid) or "
         "after an affine translator trained per layer (tuned lens, dashed). The last layer's logit lens is the model "
         "itself (KL 0)."),
        ("lens_cross_entropy", "Lens cross-entropy per layer",
         lambda t, p: plots.plot_lens_curves(t, p, "lens_cross_entropy"),
         lambda t: readings.lens(t, "lens_cross_entropy"),
         "The same lenses scored on the actual next token: cross-entropy (nats) per layer; the last layer's value is "
         "the model's loss on these contexts."),
    ]


def sweep_figures(results: pa.Table | list[dict[str, Any]], out_dir: str | os.PathLike[str]) -> list[Figure]:
    """Draw every figure ``results`` can support into ``out_dir/<stem>.png``; figures without data are skipped."""
    from lmscope.errors import LmscopeError

    out_dir = Path(out_dir)
    figures = []
    rows = _rows(results)
    for stem, title, plot, reading, explain in _spec():
        try:
            png = plot(rows, out_dir / f"{stem}.png")
        except LmscopeError:
            continue
        figures.append(Figure(title, png, reading(rows), explain))
    return figures


def track_figures(track_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], n_lineages: int = 6) -> list[Figure]:
    """The figures of a feature track (:mod:`lmscope.sae.track`): latent counts, and density of chosen lineages."""
    from lmscope.sae.track import pick_lineages, read_track

    timeline, summary, _ = read_track(track_dir)
    out_dir = Path(out_dir)
    lineages = pick_lineages(timeline, n_lineages)
    figures = [Figure(
        "SAE latents across training", plots.plot_feature_track(summary, out_dir / "sae_track.png"),
        readings.feature_track(summary),
        "One SAE per checkpoint, each trained starting from the previous checkpoint's SAE on the same text. A latent is "
        "alive when it fires at least once on that checkpoint's activations; alive latents of consecutive checkpoints "
        "are paired one to one by the cosine of their decoder directions (matched when ≥ the threshold). Unmatched "
        "alive latents start new lineages (born); a lineage dies when it has no latent at the next checkpoint.")]
    if lineages:
        figures.append(Figure(
            "How often chosen features fire, across training",
            plots.plot_lineage_density(timeline, lineages, out_dir / "sae_lineages.png"), None,
            "Firing density (log scale) of the longest-lived lineages, each followed through its matched latents. The "
            "cards below show what the first of them fires on at each checkpoint."))
    return figures
