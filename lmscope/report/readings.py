"""One-line readings of the report's figures, computed from the same results rows.

Each function returns one plain sentence stating what the figure shows in numbers (or
``None`` when the rows cannot support one), so that a reader who skips the figure still gets
its point, and so that what the report says is checked by code, not written by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lmscope.evals.icl import uniform_induction_score
from lmscope.report.plots import _label, _models, _rows

Rows = Any


def _by_model(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(_label(r), []).append(r)
    return out


def _first_last(rows: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    ordered = sorted(rows, key=lambda r: r["step"])
    return ordered[0], ordered[-1]


def _tokens(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def metric_vs_tokens(results: Rows, metric: str, what: str, domain: str = "all", lower_is_better: bool = True,
                     where: Mapping[str, Any] | None = None) -> str | None:
    """How ``metric`` moved from the first to the last checkpoint of each model, and which model ends best."""
    where = dict(where or {})
    rows = [r for r in _rows(results) if r["metric"] == metric and r["domain"] == domain and r["step"] is not None
            and all(r.get(k) == v for k, v in where.items())]
    if not rows:
        return None
    parts, finals = [], {}
    for model in _models(rows):
        first, last = _first_last(r for r in rows if _label(r) == model)
        finals[model] = last["value"]
        parts.append(f"{model} {first['value']:.3g} → {last['value']:.3g}")
    best = (min if lower_is_better else max)(finals, key=finals.get)
    last_tokens = max(r["tokens_seen"] or 0 for r in rows)
    return (f"{what} from the first to the last checkpoint ({_tokens(last_tokens)} tokens): {'; '.join(parts)}. "
            f"{best} ends {'lowest' if lower_is_better else 'highest'}.")


def domain_heatmap(results: Rows, metric: str = "bits_per_byte") -> str | None:
    """At the last checkpoint of the largest model: the easiest and hardest domain, and which improved most."""
    rows = [r for r in _rows(results) if r["metric"] == metric and r["domain"] != "all" and r["step"] is not None]
    if not rows:
        return None
    model = _models(rows)[-1]
    mine = [r for r in rows if _label(r) == model]
    first_step, last_step = min(r["step"] for r in mine), max(r["step"] for r in mine)
    last = {r["domain"]: r["value"] for r in mine if r["step"] == last_step}
    first = {r["domain"]: r["value"] for r in mine if r["step"] == first_step}
    easy, hard = min(last, key=last.get), max(last, key=last.get)
    text = (f"At step {last_step}, {model} finds {easy} easiest ({last[easy]:.2f} bits/byte) and {hard} hardest "
            f"({last[hard]:.2f})")
    gains = {d: first[d] - last[d] for d in last if d in first}
    if gains and last_step != first_step:
        most = max(gains, key=gains.get)
        text += f"; {most} improved most since step {first_step} ({first[most]:.2f} → {last[most]:.2f})"
    return text + "."


def memorization(results: Rows) -> str | None:
    """Seen against not-yet-seen sequences, and how many are 32-extractable, for the largest model."""
    rows = [r for r in _rows(results) if r["metric"] == "memorization_score" and r.get("step_seen") is not None]
    if not rows:
        return None
    model = _models(rows)[-1]
    mine = [r for r in rows if _label(r) == model]
    last_step = max(r["step"] for r in mine)
    final = [r for r in mine if r["step"] == last_step and r.get("seen")]
    text = f"At step {last_step}, {model}"
    if final:
        mean = sum(r["value"] for r in final) / len(final)
        extractable = sum(1 for r in final if r["value"] >= 1.0)
        text += (f" reproduces on average {mean:.1%} of the 32 tokens that followed a 32-token prefix in its training data, "
                 f"and {extractable} of {len(final)} sequences exactly (32-extractable)")
    else:
        text += " has not yet been trained on any sampled sequence"
    # The control: a checkpoint that has seen part of the sequences, compared on both parts.
    best = None
    for step in sorted({r["step"] for r in mine}):
        seen = [r["value"] for r in mine if r["step"] == step and r.get("seen")]
        unseen = [r["value"] for r in mine if r["step"] == step and r.get("seen") is False]
        if seen and unseen:
            best = (step, sum(seen) / len(seen), sum(unseen) / len(unseen))
    if best:
        text += (f"; at step {best[0]} it scores {best[1]:.1%} on sequences already trained on against {best[2]:.1%} "
                 f"on sequences it had not seen yet")
    return text + "."


def induction_heads(results: Rows) -> str | None:
    """The strongest induction head at the last checkpoint, its score at the first, and the chance level."""
    rows = [r for r in _rows(results) if r["metric"] == "induction_score" and r["step"] is not None]
    if not rows:
        return None
    last_step = max(r["step"] for r in rows)
    top = max((r for r in rows if r["step"] == last_step), key=lambda r: r["value"])
    mine = [r for r in rows if _label(r) == _label(top) and (r["layer"], r["head"]) == (top["layer"], top["head"])]
    first = min(mine, key=lambda r: r["step"])
    text = (f"The strongest induction head at step {last_step} is layer {top['layer']} head {top['head']} of {_label(top)}, "
            f"which on repeated random tokens puts {top['value']:.1%} of its attention on the token after the earlier "
            f"occurrence (it was {first['value']:.1%} at step {first['step']})")
    if top.get("seq_len"):
        text += f"; attending uniformly would give about {uniform_induction_score(top['seq_len']):.1%}"
    per_model = []
    for model, model_rows in _by_model([r for r in rows if r["step"] == last_step]).items():
        per_model.append(f"{model} {max(r['value'] for r in model_rows):.1%}")
    return text + f"; best head per model: {', '.join(per_model)}."


def lens(results: Rows, metric: str = "lens_kl") -> str | None:
    """First-layer figure of the logit (and tuned) lens at the last checkpoint of the largest model."""
    rows = [r for r in _rows(results) if r["metric"] == metric and r.get("layer") is not None and r["step"] is not None]
    if not rows:
        return None
    what = "nats of KL from its final prediction" if metric == "lens_kl" else "nats of cross-entropy on the next token"
    model = _models(rows)[-1]
    mine = [r for r in rows if _label(r) == model]
    last_step = max(r["step"] for r in mine)
    at = {(r.get("lens") or "logit", r["layer"]): r["value"] for r in mine if r["step"] == last_step}
    layers = sorted({layer for _, layer in at})
    text = (f"At step {last_step}, reading {model}'s residual stream after layer {layers[0]} through the unembedding "
            f"(logit lens) gives {at.get(('logit', layers[0]), float('nan')):.2f} {what}")
    if ("tuned", layers[0]) in at:
        text += f"; a trained affine translator (tuned lens) brings it to {at[('tuned', layers[0])]:.2f}"
    if metric == "lens_cross_entropy" and len(layers) > 1:
        text += f"; the model's own output gives {at.get(('logit', layers[-1]), float('nan')):.2f}"
    elif len(layers) > 2:
        text += f"; after layer {layers[-2]} the logit lens is at {at.get(('logit', layers[-2]), float('nan')):.2f}"
    return text + "."


def overview(results: Rows) -> str | None:
    """How many checkpoints, sizes and metrics the sweep covers."""
    rows = [r for r in _rows(results) if r["step"] is not None]
    if not rows:
        return None
    steps = sorted({r["step"] for r in rows})
    metrics = sorted({r["metric"] for r in rows})
    return (f"{len(_models(rows))} models × {len(steps)} checkpoints (steps {steps[0]}–{steps[-1]}), "
            f"{len(metrics)} measured quantities, {len(rows):,} numbers.")


def feature_track(summary: Rows) -> str | None:
    """How many latents were alive at the first and last checkpoint, and how many of the last continue a lineage."""
    rows = sorted(_rows(summary), key=lambda r: r["step"])
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    born = sum(r["born"] for r in rows[1:])
    died = sum(r["died"] for r in rows[1:])
    cosine = f" (median decoder cosine {last['cosine_median']:.2f})" if last["cosine_median"] is not None else ""
    return (f"Of {last['width']:,} latents, {first['alive']:,} fire at step {first['step']} and {last['alive']:,} at step "
            f"{last['step']}; at the last checkpoint {last['matched']:,} continue a latent of the previous one{cosine} and "
            f"{last['born']:,} are new. Over the whole run {born:,} lineages were born and {died:,} died.")


def explanation_scores(results: Rows) -> str | None:
    """Median simulation score of each unit kind against its shuffled baseline, and detection's likewise."""
    import numpy as np

    rows = [r for r in _rows(results) if str(r.get("metric", "")).startswith("explain_")]
    if not rows:
        return None

    def median(metric: str, kind: str, source: str) -> float | None:
        values = [r["value"] for r in rows if r["metric"] == metric and r["unit_kind"] == kind and r["explanation_source"] == source]
        return float(np.median(values)) if values else None

    parts = []
    for kind in sorted({r["unit_kind"] for r in rows}):
        own, shuffled = median("explain_simulation", kind, "own"), median("explain_simulation", kind, "shuffled")
        n = sum(1 for r in rows if r["metric"] == "explain_simulation" and r["unit_kind"] == kind and r["explanation_source"] == "own")
        if own is None:
            continue
        text = f"{kind}s ({n}): median simulation correlation {own:.2f}"
        if shuffled is not None:
            text += f" (shuffled explanations {shuffled:.2f})"
        detect, detect_shuffled = median("explain_detection", kind, "own"), median("explain_detection", kind, "shuffled")
        if detect is not None:
            text += f", detection {detect:.2f}" + (f" ({detect_shuffled:.2f})" if detect_shuffled is not None else "")
        parts.append(text)
    return ("; ".join(parts) + ".") if parts else None
