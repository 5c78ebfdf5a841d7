"""The study's influence step: which training rows made a suite model say what it generated, at several checkpoints.

The queries are the study's traced generations (prompt → the first ``completion_tokens`` tokens the
model generated), or queries given in the config, so the report can set the two answers side by side:
exact-match tracing says where the text occurs in the corpus; influence says which training rows,
seen when, raised its probability. Layout of ``out_dir`` as :mod:`lmscope.influence.across`, plus
``results.parquet`` (the results schema): per query and checkpoint the completion's log-probability
and the top row's score, and per query the number of top rows each checkpoint had seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError
from lmscope.influence.across import influence_across_training
from lmscope.influence.factors import FactorSettings
from lmscope.influence.job import Query, ScoreSettings
from lmscope.progress import Progress, no_progress


def trace_queries(traces_dir: str | os.PathLike[str], completion_tokens: int, tokenizer_file: str | os.PathLike[str]) -> list[Query]:
    """One query per traced generation in ``traces_dir`` (``trace-{i}.json``): its prompt and first generated tokens.

    ``tokenizer_file``: the suite's ``tokenizer.json``, to show the completion as text.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    queries = []
    for path in sorted(Path(traces_dir).glob("trace-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        data = json.loads(path.read_text())
        prompt_ids, generated = data.get("prompt_tokens") or [], (data.get("tokens") or [])[:completion_tokens]
        if prompt_ids and generated:
            queries.append(Query(data.get("prompt") or "", tokenizer.decode(generated), prompt_ids, generated))
    return queries


def run_influence_job(
    suite_dir: str | os.PathLike[str],
    size: str,
    steps: list[int],
    queries: list[Query],
    out_dir: str | os.PathLike[str],
    *,
    identity: dict[str, Any] | None = None,
    fit: FactorSettings | None = None,
    score: ScoreSettings | None = None,
    fit_rows: int = 128,
    device: str = "auto",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Influence of the suite's training rows on ``queries`` at ``steps`` of ``size``; a summary for the study."""
    from lmscope.results.schema import write_results

    if not queries:
        raise LmscopeError("[influence] has no query: give queries in the config, or enable [trace] so its generations are used.")
    result = influence_across_training(Path(suite_dir) / size, steps, queries, out_dir, fit=fit, score=score, fit_rows=fit_rows,
                                       device=device, progress=progress)
    meta = json.loads((Path(suite_dir) / "suite.json").read_text())
    tokens_per_step = int(meta["tokens_per_step"])
    base = {k: v for k, v in (identity or {}).items() if k not in ("revision", "step", "tokens_seen")}
    rows = []
    for q, query in enumerate(result["queries"]):
        prompt = query["prompt"]
        for step in result["steps"]:
            ident = {**base, "revision": f"step{step}", "step": step, "tokens_seen": step * tokens_per_step}
            rows.append({**ident, "metric": "influence_completion_logprob", "domain": "all", "value": query["completion_logprob"][f"step{step}"],
                         "prompt": prompt})
            top = max((row["scores"][f"step{step}"] for row in query["top"]), default=0.0)
            rows.append({**ident, "metric": "influence_top_score", "domain": "all", "value": float(top), "prompt": prompt})
            seen = sum(f"step{step}" in row["seen_by"] for row in query["top"])
            rows.append({**ident, "metric": "influence_top_rows_seen", "domain": "all", "value": float(seen), "prompt": prompt})
    write_results(rows, Path(out_dir) / "results.parquet")
    return {"steps": result["steps"], "queries": len(result["queries"]), "fit_rows": fit_rows, "strategy": (fit or FactorSettings()).strategy,
            "candidates_top": (score or ScoreSettings()).candidates_top}
