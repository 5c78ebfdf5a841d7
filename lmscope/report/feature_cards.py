"""Feature cards for the report, from the tables of :func:`lmscope.sae.features.feature_report`."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from lmscope.report.html import Example, FeatureCard


def pick_features(stats: pa.Table, n: int) -> list[int]:
    """``n`` features that fired, spread evenly over the density ranking (so both frequent and rare ones show)."""
    alive = sorted((r for r in stats.to_pylist() if r["fired"] > 0), key=lambda r: (-r["density"], r["feature"]))
    if len(alive) <= n:
        return [r["feature"] for r in alive]
    return [alive[round(i * (len(alive) - 1) / max(n - 1, 1))]["feature"] for i in range(n)]


def _source(example: dict[str, Any]) -> str:
    where = " · ".join(str(x) for x in (example.get("domain"), example.get("doc_id")) if x)
    steps = example.get("steps_seen")
    if steps is None:
        seen = ""
    elif not steps:
        seen = " · never trained on"
    elif len(steps) <= 3:
        seen = f" · trained at step {', '.join(map(str, steps))}"
    else:
        seen = f" · trained at {len(steps)} steps, first {steps[0]}"
    return f"{where} · token {example.get('position')}{seen}"


def feature_cards(stats: pa.Table, examples: pa.Table, features: list[int], *, max_examples: int = 4,
                  interval_examples: int = 1) -> list[FeatureCard]:
    """One card per feature: facts, histogram, logit effects, top examples and a few lower-interval samples."""
    by_feature: dict[int, list[dict[str, Any]]] = {}
    for e in examples.to_pylist():
        by_feature.setdefault(e["feature"], []).append(e)
    rows = {r["feature"]: r for r in stats.to_pylist()}
    cards = []
    for feature in features:
        info = rows[feature]
        mine = by_feature.get(feature, [])
        tops = sorted((e for e in mine if e["kind"] == "top"), key=lambda e: e["rank"])[:max_examples]
        lower = sorted((e for e in mine if e["kind"].startswith("interval_")), key=lambda e: (e["kind"], e["rank"]))
        chosen = tops + [e for e in lower if e["kind"] == "interval_0"][:interval_examples]
        cards.append(FeatureCard(
            title=f"feature {feature}",
            facts=(f"fires on {info['density']:.2%} of tokens ({info['fired']:,}); max activation {info['max_activation']:.3g}, "
                   f"mean when active {info['mean_when_active']:.3g}"),
            histogram=info["log10_histogram"],
            top_tokens=info.get("top_logit_text") or [],
            bottom_tokens=info.get("bottom_logit_text") or [],
            examples=[Example(e["context_pieces"] or [str(t) for t in e["context_tokens"]], e["token_index"], e["activation"],
                              ("top: " if e["kind"] == "top" else "low activation: ") + _source(e)) for e in chosen],
        ))
    return cards


def lineage_cards(track_dir: Any, timeline: pa.Table, lineages: list[int], *, per_checkpoint: int = 2) -> list[FeatureCard]:
    """One card per lineage: its latent, density and top examples at every checkpoint where it is alive."""
    from lmscope.sae.track import lineage_examples

    cards = []
    for lineage in lineages:
        history = lineage_examples(track_dir, timeline, lineage, top=per_checkpoint)
        if not history:
            continue
        spans = ", ".join(f"{h['step']} (latent {h['feature']}, {h['density']:.2%})" for h in history)
        examples = [Example(e["context_pieces"] or [str(t) for t in e["context_tokens"]], e["token_index"], e["activation"],
                            f"step {h['step']} · latent {h['feature']} · " + _source(e))
                    for h in history for e in h["examples"]]
        cards.append(FeatureCard(
            title=f"lineage {lineage}",
            facts=(f"alive at steps {spans}; decoder cosine to its first direction at the end "
                   f"{history[-1]['cosine_birth']:.2f}"),
            histogram=[], top_tokens=[], bottom_tokens=[], examples=examples))
    return cards
