"""Explain and score units of one hook: choose them, build their records, explain, score, and score a baseline.

For each unit the explainer model writes one explanation from the unit's explanation records; the scorers
(:mod:`lmscope.explain.scoring`) score it on the held-out records. The **baseline** scores every unit with
another unit's explanation (a seeded derangement of the explanations), so each score can be read against
what an explanation of the wrong unit gets.

Layout of ``out_dir`` (resumable: a unit whose file exists is not redone; model answers are cached on disk)::

    settings.json          what produced it (source, hook, settings, explainer identity, version)
    units/<kind>-<unit>.json  one finished unit: records, explanation, scores, baseline scores
    explanations.parquet   one row per unit: explanation, scores, baseline scores, density
    records.parquet        one row per record: tokens, activations, predicted activations, provenance
    results.parquet        the scores in the results schema (``explain_*`` metrics, ``explanation_source`` own/shuffled)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lmscope.errors import LmscopeError
from lmscope.explain.backend import ChatModel, complete_all
from lmscope.explain.prompts import clean_explanation, explain_request
from lmscope.explain.records import RecordSettings, UnitRecords, UnitSource, choose_units, unit_records
from lmscope.explain.scoring import score_all
from lmscope.fsio import atomic_path, atomic_write_json
from lmscope.progress import Progress, no_progress

EXPLAIN_VERSION = 1
SCORES = ("simulation", "detection", "detection_auroc", "fuzzing", "fuzzing_auroc")
"""Score columns; metric ``explain_<name>`` in the results."""


@dataclass(frozen=True)
class ExplainSettings:
    """Which units, how many records, and whether to score the shuffled baseline."""

    n: int = 8
    """Units drawn (seeded) among those that fire on between ``min_density`` and ``max_density`` of the tokens."""
    units: tuple[int, ...] | None = None
    """Explicit units instead of a draw."""
    min_density: float = 1e-4
    max_density: float = 0.9
    records: RecordSettings = field(default_factory=RecordSettings)
    baseline: bool = True
    """Also score each unit with another unit's explanation (needs two or more units)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 and not self.units:
            raise LmscopeError(f"--n {self.n} must be at least 1.")
        if not 0 <= self.min_density <= self.max_density <= 1:
            raise LmscopeError("densities must satisfy 0 <= min_density <= max_density <= 1.")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["units"] = list(self.units) if self.units is not None else None
        return data


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``0 … n-1`` that moves every index (``n >= 2``)."""
    if n < 2:
        raise LmscopeError("a shuffled-explanation baseline needs at least two units.")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm.tolist()


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / "settings.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise LmscopeError(f"{out} holds explanations made with other settings ({', '.join(changed)}); use another --out "
                               "or delete it to start over.")
    else:
        atomic_write_json(path, settings)


def run_explain(model: ChatModel, source: UnitSource, out_dir: str | os.PathLike[str], settings: ExplainSettings = ExplainSettings(),
                *, tokenizer: Any = None, replay: Any = None, identity: dict[str, Any] | None = None, label: str | None = None,
                progress: Progress = no_progress) -> dict[str, Any]:
    """Explain and score ``settings.n`` units of ``source`` with ``model`` into ``out_dir``; returns a summary.

    Args:
        model: the explainer and simulator (a :class:`~lmscope.explain.backend.ChatModel`; wrap it in
            :class:`~lmscope.explain.backend.CachedChatModel` to cache its answers).
        source: the units: neurons of a hook, or features of an SAE, over an activation store.
        tokenizer: the studied model's tokenizer (tokens as text).
        replay: a mini suite's replay source (training steps of each record's top token).
        identity: result-schema columns (suite, model, size, seed, revision, step, tokens_seen) of the studied model.
        label: what the SAE or hook is called in the results (default: the hook).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, {"version": EXPLAIN_VERSION, "kind": source.kind, "hook": source.hook, "store_rows": source.store.n_rows,
                          "store_model": source.store.meta.get("model"),
                          "settings": settings.to_json(), "explainer": model.identity})
    units, _, _ = choose_units(source, settings.n, settings.seed, min_density=settings.min_density,
                               max_density=settings.max_density, units=list(settings.units) if settings.units else None)
    if settings.baseline and len(units) < 2:
        raise LmscopeError(f"only {len(units)} {source.kind} could be explained; the shuffled baseline needs two or more "
                           "(raise --n, or turn the baseline off).")
    unit_dir = out / "units"
    done = {u: json.loads((unit_dir / f"{source.kind}-{u}.json").read_text()) for u in units
            if (unit_dir / f"{source.kind}-{u}.json").is_file()}
    todo = [u for u in units if u not in done]
    if todo:
        # Records and explanations only for the units still to do; each unit's records depend on it alone.
        records = unit_records(source, todo, settings.records, tokenizer=tokenizer, replay=replay, progress=progress)
        by_unit = {r.unit: r for r in records}
        progress("explain", 0, len(todo))
        answers = complete_all(model, [explain_request(r.explain, r.max_activation, source.kind) for r in records])
        explanations = {r.unit: clean_explanation(a.text) for r, a in zip(records, answers)}
        explanations |= {u: entry["explanation"] for u, entry in done.items()}  # finished units keep theirs
        progress("explain", len(todo), len(todo))
        shuffled = derangement(len(units), settings.seed) if settings.baseline else None
        progress("score", len(done), len(units))
        for i, unit in enumerate(units):
            if unit in done:
                continue
            rec = by_unit[unit]
            own = score_all(model, explanations[unit], source.kind, rec, seed=settings.seed)
            entry: dict[str, Any] = {"unit": unit, "explanation": explanations[unit], "scores": own, "records": rec.to_dict()}
            if shuffled is not None:
                other = units[shuffled[i]]
                entry["baseline_from"] = other
                entry["baseline_explanation"] = explanations[other]
                entry["baseline_scores"] = score_all(model, explanations[other], source.kind, rec, seed=settings.seed)
            atomic_write_json(unit_dir / f"{source.kind}-{unit}.json", entry)
            done[unit] = entry
            progress("score", 1, len(units), simulation=f"{own['simulation']:.2f}")
    entries = [done[u] for u in units]
    _write_tables(out, entries, source, identity or {}, label or source.hook, model.identity)
    return summarize(entries, source.kind, source.hook)


def summarize(entries: list[dict[str, Any]], kind: str, hook: str) -> dict[str, Any]:
    """Median of each score over units, for the explanations and for the shuffled baseline."""
    def median(key: str, name: str) -> float | None:
        values = [e[key][name] for e in entries if key in e and e[key][name] is not None and np.isfinite(e[key][name])]
        return float(np.median(values)) if values else None

    return {"kind": kind, "hook": hook, "units": [e["unit"] for e in entries],
            "median": {name: median("scores", name) for name in SCORES},
            "baseline_median": {name: median("baseline_scores", name) for name in SCORES},
            "explanations": {str(e["unit"]): e["explanation"] for e in entries}}


def _write_tables(out: Path, entries: list[dict[str, Any]], source: UnitSource, identity: dict[str, Any], label: str,
                  explainer: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    from lmscope.results.schema import write_results

    explainer_name = explainer.get("model", "?")
    rows, results, records = [], [], []
    for entry in entries:
        rec = UnitRecords.from_dict(entry["records"])
        row = {"kind": source.kind, "hook": source.hook, "unit": entry["unit"], "explanation": entry["explanation"],
               "density": rec.density, "max_activation": rec.max_activation,
               **{name: entry["scores"][name] for name in SCORES}, "simulation_unparsed": entry["scores"]["simulation_unparsed"]}
        if "baseline_scores" in entry:
            row |= {"baseline_from": entry["baseline_from"], "baseline_explanation": entry["baseline_explanation"],
                    **{f"baseline_{name}": entry["baseline_scores"][name] for name in SCORES}}
        rows.append(row)
        for source_name, key in (("own", "scores"), ("shuffled", "baseline_scores")):
            if key not in entry:
                continue
            for name in SCORES:
                value = entry[key][name]
                if value is None or not np.isfinite(value):
                    continue
                results.append({**identity, "model": identity.get("model", source.store.meta.get("model", "?")),
                                "metric": f"explain_{name}", "value": float(value), "hook": source.hook, "label": label,
                                "unit_kind": source.kind, "unit": entry["unit"], "explanation_source": source_name,
                                "explainer": explainer_name})
        scored = rec.holdout + rec.random
        predicted = dict(zip(range(len(scored)), entry["scores"]["predicted"]))
        for group in ("explain", "holdout", "random", "quiet"):
            for index, r in enumerate(getattr(rec, group)):
                position = (index if group == "holdout" else len(rec.holdout) + index) if group in ("holdout", "random") else None
                records.append({"kind": source.kind, "unit": entry["unit"], "group": group, "record_kind": r.kind,
                                "tokens": r.tokens, "activations": r.activations,
                                "predicted": predicted.get(position) if position is not None else None,
                                "doc_id": r.doc_id, "domain": r.domain, "position": r.position, "steps_seen": r.steps_seen,
                                "context": r.context})
    for name, table in (("explanations.parquet", pa.Table.from_pylist(rows)), ("records.parquet", pa.Table.from_pylist(records))):
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)
    if results:
        write_results(results, out / "results.parquet")


def open_units(*, sae: str | os.PathLike[str] | None = None, neurons: str | None = None,
               store: str | os.PathLike[str] | None = None) -> UnitSource:
    """The units to explain: the features of the SAE in directory ``sae``, or the neurons of hook ``neurons``.

    ``store`` is the activation store to read (for an SAE that lmscope trained, default: the store it was trained on).
    """
    from lmscope.activations.reader import ActivationStore

    if (sae is None) == (neurons is None):
        raise LmscopeError("give exactly one of --sae DIR (explain an SAE's features) and --neurons HOOK (explain a hook's neurons).")
    if sae is not None:
        from lmscope.sae.io import load_sae

        model, metadata = load_sae(sae)
        if store is None:
            store = metadata.get("store") if isinstance(metadata, dict) else None
            if not store:
                raise LmscopeError(f"SAE {sae} does not name the activation store it was trained on; pass --store.")
        opened = ActivationStore.open(store)
        return UnitSource(opened, model.shape.hook, model)
    if store is None:
        raise LmscopeError(f"--neurons {neurons} needs --store, an activation store holding that hook (`lmscope activations`).")
    return UnitSource(ActivationStore.open(store), neurons)
