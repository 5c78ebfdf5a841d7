r"""Features across training: one SAE per checkpoint, latents matched between checkpoints, lineages.

For checkpoints :math:`c_0 < c_1 < \dots` of one model, an SAE is trained on each checkpoint's
activations of the same text (the same corpus rows), the SAE of :math:`c_{t}` starting from the
trained parameters of :math:`c_{t-1}` (:func:`lmscope.sae.train.train_sae` ``init=``), except that
latents dead at :math:`c_{t-1}` start afresh (:func:`fresh_dead_latents`). A latent is
**alive** at a checkpoint when it fires at least once on that checkpoint's activations.

**Matching.** Alive latents of consecutive checkpoints are paired one to one by the cosine
similarity of their decoder directions :math:`W_{dec,i}` (scale-free, so normalisation folding
does not matter). ``hungarian`` maximises the summed cosine over all one-to-one pairings
(:func:`scipy.optimize.linear_sum_assignment`); ``mutual`` pairs latents that are each other's
nearest neighbour (cheap for wide SAEs). ``auto`` uses ``hungarian`` up to
``HUNGARIAN_MAX_PAIRS`` candidate pairs. Pairs below ``threshold`` (default 0.7) are not matches.

**Lineages.** A lineage is a chain of matched latents. At the first checkpoint every alive latent
starts one (event ``start``); later, an alive latent matched to an alive latent of the previous
checkpoint continues that one's lineage (``continued``), any other alive latent starts a new one
(``born``). A lineage **dies** at :math:`c_t` when it has a latent at :math:`c_{t-1}` and none at
:math:`c_t`. **Drift** is :math:`1 - \cos` to the previous checkpoint's matched direction, and
``cosine_birth`` compares a latent with its lineage's first direction. Lineage ids are assigned in
checkpoint order, then latent index: deterministic.

Layout of ``out_dir`` (each step resumable)::

    step{N}/                 one :func:`lmscope.sae.job.run_sae_job` per checkpoint (activations, train, sae, eval, features)
    timeline.parquet         one row per (checkpoint, alive latent): lineage, match, cosines, density, event
    summary.parquet          one row per checkpoint: alive, matched, born, died, median cosine
    results.parquet          every checkpoint's SAE metrics plus the sae_track_* counts, results schema
    track.json               what produced it (settings, checkpoints, version)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress

TRACK_VERSION = 1
DEFAULT_THRESHOLD = 0.7
HUNGARIAN_MAX_PAIRS = 1 << 24
"""``auto`` matching runs the Hungarian algorithm up to this many (alive × alive) candidate pairs (4096²)."""
MATCH_METHODS = ("auto", "hungarian", "mutual")
TIMELINE_FILE, SUMMARY_FILE, RESULTS_FILE, TRACK_FILE = "timeline.parquet", "summary.parquet", "results.parquet", "track.json"
TRACK_METRICS = ("sae_track_alive", "sae_track_matched", "sae_track_born", "sae_track_died", "sae_track_cosine_median")

MatchMethod = Literal["auto", "hungarian", "mutual"]


@dataclass(frozen=True)
class Matching:
    """Latents of the next checkpoint paired with latents of the previous one."""

    previous: np.ndarray
    """int64 ``[W_next]``: the matched latent of the previous checkpoint, ``-1`` where none."""
    cosine: np.ndarray
    """float64 ``[W_next]``: decoder cosine to that latent, ``nan`` where none."""


@dataclass(frozen=True)
class CheckpointFeatures:
    """What the timeline needs of one checkpoint's SAE."""

    step: int
    tokens_seen: int | None
    directions: Tensor
    """``[W, d]`` decoder rows (any scale)."""
    density: np.ndarray
    """float64 ``[W]``: fraction of the checkpoint's activation rows on which each latent fires."""


def decoder_cosines(a: Tensor, b: Tensor) -> Tensor:
    """``[Wa, Wb]`` cosine similarity of the rows of ``a`` ``[Wa, d]`` and ``b`` ``[Wb, d]`` (float64)."""
    if a.shape[1] != b.shape[1]:
        raise LmscopeError(f"decoder rows of width {a.shape[1]} and {b.shape[1]} cannot be compared; "
                           "track SAEs of one hook of one model.")
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    return (a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ (b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)).T


def match_features(
    previous: Tensor,
    next_: Tensor,
    *,
    previous_alive: np.ndarray | None = None,
    next_alive: np.ndarray | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    method: MatchMethod = "auto",
) -> Matching:
    """Pair the alive rows of ``next_`` ``[W2, d]`` with alive rows of ``previous`` ``[W1, d]`` by decoder cosine.

    Args:
        previous_alive, next_alive: bool masks ``[W1]``, ``[W2]`` (default: all alive); dead
            latents are never matched.
        threshold: pairs with cosine below it are left unmatched.
        method: ``hungarian`` (one-to-one, maximal total cosine), ``mutual`` (mutual nearest
            neighbours) or ``auto`` (see the module docstring).
    """
    if method not in MATCH_METHODS:
        raise LmscopeError(f"matching method {method!r} is unknown; choose one of {', '.join(MATCH_METHODS)}.")
    if not -1.0 <= threshold <= 1.0:
        raise LmscopeError(f"threshold={threshold} is not a cosine; choose a value between -1 and 1 (default {DEFAULT_THRESHOLD}).")
    w1, w2 = previous.shape[0], next_.shape[0]
    alive1 = np.ones(w1, bool) if previous_alive is None else np.asarray(previous_alive, bool)
    alive2 = np.ones(w2, bool) if next_alive is None else np.asarray(next_alive, bool)
    if alive1.shape != (w1,) or alive2.shape != (w2,):
        raise LmscopeError(f"alive masks of shape {alive1.shape} and {alive2.shape} do not fit SAEs of widths {w1} and {w2}.")
    idx1, idx2 = np.flatnonzero(alive1), np.flatnonzero(alive2)
    matched_previous = np.full(w2, -1, np.int64)
    cosine = np.full(w2, np.nan)
    if idx1.size == 0 or idx2.size == 0:
        return Matching(matched_previous, cosine)
    if method == "auto":
        method = "hungarian" if idx1.size * idx2.size <= HUNGARIAN_MAX_PAIRS else "mutual"
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        sims = decoder_cosines(previous[idx1], next_[idx2]).numpy()
        rows, cols = linear_sum_assignment(sims, maximize=True)
        pairs = [(idx1[r], idx2[c], sims[r, c]) for r, c in zip(rows, cols)]
    else:
        pairs = _mutual_nearest(previous[idx1], next_[idx2], idx1, idx2)
    for i, j, value in pairs:
        if value >= threshold:
            matched_previous[j], cosine[j] = i, value
    return Matching(matched_previous, cosine)


def _mutual_nearest(a: Tensor, b: Tensor, ia: np.ndarray, ib: np.ndarray, chunk: int = 2048) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cos) where ``a``'s row i and ``b``'s row j are each other's nearest (highest cosine; lower index on ties)."""
    best_b = np.empty(a.shape[0], np.int64)  # for each row of a: its best row of b
    best_a = np.full(b.shape[0], -1, np.int64)  # for each row of b: its best row of a
    best_a_value = np.full(b.shape[0], -np.inf)
    for start in range(0, a.shape[0], chunk):
        sims = decoder_cosines(a[start:start + chunk], b).numpy()
        best_b[start:start + sims.shape[0]] = sims.argmax(1)
        column_best = sims.argmax(0)
        column_value = sims[column_best, np.arange(sims.shape[1])]
        better = column_value > best_a_value
        best_a[better] = column_best[better] + start
        best_a_value[better] = column_value[better]
    return [(int(ia[i]), int(ib[j]), float(best_a_value[j])) for j, i in enumerate(best_a) if best_b[i] == j]


def lineage_timeline(checkpoints: Sequence[CheckpointFeatures], *, threshold: float = DEFAULT_THRESHOLD,
                     method: MatchMethod = "auto") -> pa.Table:
    """One row per (checkpoint, alive latent): ``step, tokens_seen, feature, lineage, event, previous_feature,
    cosine_previous, cosine_birth, density, continues`` (``continues``: the lineage has a latent at the next
    checkpoint; null at the last)."""
    if not checkpoints:
        raise LmscopeError("no checkpoints to track; select at least one checkpoint.")
    steps = [c.step for c in checkpoints]
    if steps != sorted(set(steps)):
        raise LmscopeError(f"checkpoints must be in increasing step order without repeats; got steps {steps}.")
    rows: list[dict[str, Any]] = []
    lineage_of: dict[int, int] = {}  # latent of the previous checkpoint -> its lineage
    birth: dict[int, Tensor] = {}  # lineage -> its first decoder direction
    next_id = 0
    for t, checkpoint in enumerate(checkpoints):
        alive = checkpoint.density > 0
        matching = None
        if t > 0:
            previous = checkpoints[t - 1]
            matching = match_features(previous.directions, checkpoint.directions, previous_alive=previous.density > 0,
                                      next_alive=alive, threshold=threshold, method=method)
        current: dict[int, int] = {}
        features = [int(f) for f in np.flatnonzero(alive)]
        for feature in features:
            prev = -1 if matching is None else int(matching.previous[feature])
            if prev >= 0:
                current[feature] = lineage_of[prev]
            else:
                current[feature] = next_id
                birth[next_id] = checkpoint.directions[feature]
                next_id += 1
        if features:
            here = checkpoint.directions[features].double()
            first = torch.stack([birth[current[f]] for f in features]).double()
            cos_birth = torch.nn.functional.cosine_similarity(here, first, dim=1, eps=1e-30).tolist()
        for position, feature in enumerate(features):
            prev = -1 if matching is None else int(matching.previous[feature])
            event = "continued" if prev >= 0 else ("start" if t == 0 else "born")
            rows.append({"step": checkpoint.step, "tokens_seen": checkpoint.tokens_seen, "feature": feature,
                         "lineage": current[feature], "event": event, "previous_feature": prev if prev >= 0 else None,
                         "cosine_previous": float(matching.cosine[feature]) if prev >= 0 else None,
                         "cosine_birth": cos_birth[position], "density": float(checkpoint.density[feature])})
        lineage_of = current
    by_step: dict[int, set[int]] = {}
    for row in rows:
        by_step.setdefault(row["step"], set()).add(row["lineage"])
    following = {steps[t]: by_step.get(steps[t + 1], set()) for t in range(len(steps) - 1)}
    for row in rows:
        row["continues"] = row["lineage"] in following[row["step"]] if row["step"] in following else None
    schema = pa.schema([("step", pa.int64()), ("tokens_seen", pa.int64()), ("feature", pa.int64()), ("lineage", pa.int64()),
                        ("event", pa.string()), ("previous_feature", pa.int64()), ("cosine_previous", pa.float64()),
                        ("cosine_birth", pa.float64()), ("density", pa.float64()), ("continues", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


def track_summary(timeline: pa.Table, checkpoints: Sequence[tuple[int, int | None]], width: int) -> pa.Table:
    """One row per checkpoint ``(step, tokens_seen)``: ``alive, matched, born, died, cosine_median, width``.

    ``died`` at a checkpoint counts lineages present at the previous checkpoint and absent here.
    """
    rows = timeline.to_pylist()
    out = []
    previous: set[int] = set()
    for t, (step, tokens) in enumerate(checkpoints):
        here = [r for r in rows if r["step"] == step]
        lineages = {r["lineage"] for r in here}
        cosines = [r["cosine_previous"] for r in here if r["cosine_previous"] is not None]
        out.append({"step": step, "tokens_seen": tokens, "alive": len(here),
                    "matched": sum(r["event"] == "continued" for r in here),
                    "born": sum(r["event"] == "born" for r in here), "died": len(previous - lineages) if t else 0,
                    "cosine_median": float(np.median(cosines)) if cosines else None, "width": width})
        previous = lineages
    schema = pa.schema([("step", pa.int64()), ("tokens_seen", pa.int64()), ("alive", pa.int64()), ("matched", pa.int64()),
                        ("born", pa.int64()), ("died", pa.int64()), ("cosine_median", pa.float64()), ("width", pa.int64())])
    return pa.Table.from_pylist(out, schema=schema)


def summary_result_rows(summary: pa.Table, identities: Sequence[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    """The summary as rows of the results schema (``sae_track_*`` metrics), one identity per checkpoint."""
    columns = {"sae_track_alive": "alive", "sae_track_matched": "matched", "sae_track_born": "born",
               "sae_track_died": "died", "sae_track_cosine_median": "cosine_median"}
    rows = []
    for identity, row in zip(identities, summary.to_pylist(), strict=True):
        for metric, column in columns.items():
            if row[column] is not None:
                rows.append({**identity, "metric": metric, "domain": "all", "value": float(row[column]), **extra})
    return rows


def fresh_dead_latents(parameters: dict[str, Tensor], alive: np.ndarray, shape: Any, seed: int) -> dict[str, Tensor]:
    """``parameters`` with every latent that is not ``alive`` re-initialised as a new SAE's latent (seeded).

    A dead latent has no identity worth carrying to the next checkpoint; starting it afresh gives
    it the chance a cold-started SAE would give it (rather than a direction that stopped firing).
    """
    from lmscope.sae.model import SparseAutoencoder

    dead = torch.as_tensor(~np.asarray(alive, bool))
    fresh = {name: value for name, value in SparseAutoencoder(shape, seed=seed).state_dict().items() if name in parameters}
    out = {name: value.clone() for name, value in parameters.items()}
    out["W_enc"][:, dead] = fresh["W_enc"][:, dead].to(out["W_enc"])
    out["W_dec"][dead] = fresh["W_dec"][dead].to(out["W_dec"])
    out["b_enc"][dead] = fresh["b_enc"][dead].to(out["b_enc"])
    if shape.arch == "jumprelu":
        out["log_threshold"][dead] = parameters["log_threshold"][~dead].median() if bool((~dead).any()) else out["log_threshold"][dead]
    return out


def pick_lineages(timeline: pa.Table, n: int) -> list[int]:
    """``n`` lineages worth showing: longest-lived first, then densest at their last checkpoint, then lowest id."""
    spans: dict[int, list[dict[str, Any]]] = {}
    for row in timeline.to_pylist():
        spans.setdefault(row["lineage"], []).append(row)
    ranked = sorted(spans, key=lambda k: (-len(spans[k]), -spans[k][-1]["density"], k))
    return ranked[:n]


def lineage_examples(out_dir: str | os.PathLike[str], timeline: pa.Table, lineage: int, top: int = 3) -> list[dict[str, Any]]:
    """For each checkpoint where ``lineage`` has a latent: its step, latent, density and ``top`` top-activating examples."""
    import pyarrow.parquet as pq

    out = Path(out_dir)
    result = []
    for row in timeline.filter(pa.compute.equal(timeline["lineage"], lineage)).to_pylist():
        path = out / f"step{row['step']}" / "features" / "feature_examples.parquet"
        examples = pq.read_table(path).to_pylist() if path.is_file() else []
        chosen = sorted((e for e in examples if e["feature"] == row["feature"] and e["kind"] == "top"),
                        key=lambda e: e["rank"])[:top]
        result.append({**row, "examples": chosen})
    return result


def read_track(out_dir: str | os.PathLike[str]) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """``(timeline, summary, track.json)`` of a finished track in ``out_dir``."""
    import pyarrow.parquet as pq

    out = Path(out_dir)
    if not (out / TRACK_FILE).is_file():
        raise LmscopeError(f"{out} holds no finished feature track ({TRACK_FILE} is missing); run `lmscope sae track` into it.")
    return pq.read_table(out / TIMELINE_FILE), pq.read_table(out / SUMMARY_FILE), json.loads((out / TRACK_FILE).read_text())


def run_sae_track(
    model: str,
    config: Any,
    out_dir: str | os.PathLike[str],
    *,
    select: str = "log:4",
    corpus: str | os.PathLike[str] | None = None,
    tokens: int = 65536,
    ctx: int = 128,
    threshold: float = DEFAULT_THRESHOLD,
    method: MatchMethod = "auto",
    eval_contexts: int = 16,
    device: str = "auto",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Train one SAE per selected checkpoint of ``model``, each from the previous, and write the lineage timeline.

    Args:
        model: one size of a suite: a local suite's size directory (``SUITE_DIR/1.6m``) or a catalogued
            hub model (``EleutherAI/pythia-70m``, whose checkpoints must be in the local HF cache).
        config: a :class:`lmscope.sae.train.SaeTrainConfig`, the same for every checkpoint.
        select: checkpoint selector (:mod:`lmscope.suites.selectors`), at least two checkpoints.
        corpus: tokenized corpus; default the mini suite's own ``corpus`` (so examples carry training steps).
        tokens, ctx: activations captured per checkpoint (the same rows of the train split each time).
    """
    from lmscope.evals.sweep import sweep_targets
    from lmscope.fsio import atomic_path, atomic_write_json
    from lmscope.results.schema import write_results
    from lmscope.sae.io import load_sae
    from lmscope.sae.job import run_sae_job
    from lmscope.sae.train import trained_parameters
    from lmscope.suites.replay import mini_suite_root

    import pyarrow.parquet as pq

    targets = sweep_targets(model, select)
    if len({(t.model, t.seed) for t in targets}) != 1:
        raise LmscopeError(f"{model!r} names several models; track one size, e.g. SUITE_DIR/SIZE.")
    if len(targets) < 2:
        raise LmscopeError(f"selector {select!r} picks {len(targets)} checkpoint of {model!r}; tracking needs at least two "
                           "(try log:4).")
    suite_root = mini_suite_root(model) if Path(model).expanduser().exists() else None
    if corpus is None:
        if suite_root is None:
            raise LmscopeError(f"{model!r} is not a local mini suite, so it has no corpus of its own; pass --corpus.")
        corpus = Path(suite_root) / "corpus"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": model, "select": select, "corpus": str(corpus), "tokens": tokens, "ctx": ctx, "threshold": threshold,
                "method": method, "config": dataclasses.asdict(config)}
    settings_path = out / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise LmscopeError(f"{out} holds a feature track with other settings; choose another --out, or delete it to start over.")
    atomic_write_json(settings_path, settings)

    checkpoints: list[CheckpointFeatures] = []
    result_tables = []
    init = None
    progress("track checkpoints", 0, len(targets))
    for target in targets:
        step_dir = out / f"step{target.step}"
        run_sae_job(target.spec, config, step_dir, corpus=corpus, tokens=tokens, ctx=ctx, replay_suite=suite_root,
                    identity=target.identity(), eval_contexts=eval_contexts, device=device, init=init, progress=progress)
        sae, _ = load_sae(step_dir / "sae")
        stats = pq.read_table(step_dir / "features" / "feature_stats.parquet", columns=["feature", "density"]).to_pydict()
        density = np.zeros(sae.shape.width)
        density[np.asarray(stats["feature"], np.int64)] = stats["density"]
        init = fresh_dead_latents(trained_parameters(step_dir / "train"), density > 0, sae.shape, seed=config.seed + target.step + 1)
        checkpoints.append(CheckpointFeatures(int(target.step), target.tokens_seen, sae.W_dec.detach().cpu(), density))
        result_tables.append(pq.read_table(step_dir / "results.parquet"))
        progress("track checkpoints", 1, len(targets))

    timeline = lineage_timeline(checkpoints, threshold=threshold, method=method)
    summary = track_summary(timeline, [(c.step, c.tokens_seen) for c in checkpoints], checkpoints[0].density.shape[0])
    for table, name in ((timeline, TIMELINE_FILE), (summary, SUMMARY_FILE)):
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)
    extra = {"hook": config.hook, "arch": config.arch, "width": checkpoints[0].density.shape[0]}
    rows = [row for table in result_tables for row in table.to_pylist()]
    write_results(rows + summary_result_rows(summary, [t.identity() for t in targets], **extra), out / RESULTS_FILE)
    record = {"version": TRACK_VERSION, **settings, "steps": [c.step for c in checkpoints],
              "revisions": [t.revision for t in targets], "lineages": int(len(set(timeline["lineage"].to_pylist())))}
    atomic_write_json(out / TRACK_FILE, record)
    return {"out": str(out), "timeline": str(out / TIMELINE_FILE), "summary": summary.to_pylist(), **record}
