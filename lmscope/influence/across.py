"""Influence across training: the same queries and candidate rows scored at several checkpoints of one model.

Each checkpoint gets its own factors (fitted on rows *it* had seen) and its own scores; the candidate rows
are chosen once, at the last checkpoint, so every checkpoint scores the same rows. The aggregate is the
sum over checkpoints (TracIn's sum over checkpoints, with each checkpoint's curvature): rows that kept
raising the completion's probability throughout training rank first. Every row keeps its training step,
so the table answers when an influential row was seen relative to each checkpoint.

Layout of ``out_dir``::

    factors/step{N}/          each checkpoint's factors (reused when complete; a killed fit resumes)
    step{N}.json              each checkpoint's scores (:func:`lmscope.influence.job.score_queries`), reused when its key matches
    across.json               the aggregate: per query, the top rows by summed score, with per-checkpoint scores
    scores.parquet            every (query, checkpoint, row) score
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_write_json, atomic_write_with
from lmscope.influence.factors import FactorSettings
from lmscope.influence.job import Query, ScoreSettings, fit_checkpoint, open_checkpoint, query_tokens, score_queries, shared_candidates
from lmscope.progress import Progress, no_progress

ACROSS_VERSION = 1


def influence_across_training(
    size_dir: str | os.PathLike[str],
    steps: list[int],
    queries: list[Query],
    out_dir: str | os.PathLike[str],
    *,
    fit: FactorSettings | None = None,
    score: ScoreSettings | None = None,
    fit_rows: int = 256,
    index: Any = None,
    device: str = "auto",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Score ``queries`` at each checkpoint ``steps`` of ``size_dir`` (``SUITE_DIR/SIZE``); aggregate over checkpoints.

    Returns the aggregate (also ``across.json``): per query, the top rows by summed score with their
    per-checkpoint scores, training step and documents, and each checkpoint's completion log-probability.
    """
    fit = fit or FactorSettings()
    score = score or ScoreSettings()
    steps = sorted({int(s) for s in steps})
    if not steps:
        raise LmscopeError("no checkpoint steps given; give at least one step of the suite.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = open_checkpoint(f"{size_dir}@step{steps[-1]}", device=device)
    encoded = query_tokens(last, queries)
    fixed = [Query(q.prompt, q.completion, p, c) for q, (p, c) in zip(queries, encoded)]
    candidates = shared_candidates(last, encoded, score, index, progress)
    per_step: dict[int, dict[str, Any]] = {}
    progress("influence across checkpoints", 0, len(steps))
    for step in steps:
        key = hashlib.sha256(json.dumps({"version": ACROSS_VERSION, "model": f"{size_dir}@step{step}", "queries": encoded,
                                         "positions": candidates.positions.tolist(), "fit": fit.to_dict(), "fit_rows": fit_rows,
                                         "score": {**asdict(score), "damping": score.damping}}, sort_keys=True).encode()).hexdigest()
        path = out / f"step{step}.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or saved.get("key") != key:
            checkpoint = last if step == steps[-1] else open_checkpoint(f"{size_dir}@step{step}", device=device)
            factors = fit_checkpoint(checkpoint, out / "factors" / f"step{step}", fit, n_rows=fit_rows, progress=progress)
            saved = {**score_queries(checkpoint, factors, fixed, score, candidates=candidates, progress=progress), "key": key}
            atomic_write_json(path, saved)
        per_step[step] = saved
        progress("influence across checkpoints", 1, len(steps))
    result = _aggregate(last, steps, per_step, candidates, score.top)
    result.update({"size_dir": str(size_dir), "fit": fit.to_dict(), "fit_rows": fit_rows, "score": {**asdict(score), "damping": score.damping}})
    atomic_write_json(out / "across.json", result)
    _write_parquet(per_step, out / "scores.parquet")
    return result


def _aggregate(last: Any, steps: list[int], per_step: dict[int, dict[str, Any]], candidates: Any, top: int) -> dict[str, Any]:
    from lmscope.influence.candidates import row_provenance

    batch = last.source.batch_size
    queries = []
    for q in range(len(per_step[steps[-1]]["queries"])):
        by_step = np.array([per_step[s]["queries"][q]["scores"] for s in steps])  # [C, N]
        total = by_step.sum(axis=0)
        order = np.argsort(-total, kind="stable")[:top]
        rows = []
        for k in order.tolist():
            position = int(candidates.positions[k])
            prov = row_provenance(last.source, position)
            rows.append({
                "position": position,
                "step": position // batch,
                "total": float(total[k]),
                "scores": {f"step{s}": float(by_step[c, k]) for c, s in enumerate(steps)},
                "seen_by": [f"step{s}" for s in steps if position < batch * s],
                "documents": [{"doc_id": d["doc_id"], "domain": d["domain"], "doc_offset": d["doc_offset"], "length": d["length"]}
                              for d in prov["segments"]],
            })
        first = per_step[steps[-1]]["queries"][q]
        queries.append({
            "prompt": first["prompt"],
            "completion": first["completion"],
            "completion_logprob": {f"step{s}": per_step[s]["queries"][q]["completion_logprob"] for s in steps},
            "top": rows,
            "candidates": first["candidates"],
        })
    return {"steps": steps, "batch_size": batch, "queries": queries}


def _write_parquet(per_step: dict[int, dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[Any]] = {"query": [], "checkpoint_step": [], "position": [], "step": [], "seen": [], "score": []}
    for ckpt, result in per_step.items():
        batch = result["batch_size"]
        for q, query in enumerate(result["queries"]):
            for position, value in zip(query["positions"], query["scores"]):
                cols["query"].append(q)
                cols["checkpoint_step"].append(ckpt)
                cols["position"].append(position)
                cols["step"].append(position // batch)
                cols["seen"].append(position < batch * ckpt)
                cols["score"].append(value)
    table = pa.table({"query": pa.array(cols["query"], pa.int32()), "checkpoint_step": pa.array(cols["checkpoint_step"], pa.int64()),
                      "position": pa.array(cols["position"], pa.int64()), "step": pa.array(cols["step"], pa.int64()),
                      "seen": pa.array(cols["seen"], pa.bool_()), "score": pa.array(cols["score"], pa.float64())})
    atomic_write_with(path, lambda p: pq.write_table(table, p))
