"""Trace a suite model's generations into its training corpus, end to end: index, generate, trace, save.

Layout of ``out_dir``::

    index/                  the suffix-array index of the suite's corpus (built once, resumable)
    trace-{i}.json          the trace of prompt ``i`` (:meth:`lmscope.index.trace.Trace.to_dict`, plus ``key``)
    trace-{i}.html          the same as a self-contained page
    results.parquet         per prompt: spans kept, documents retrieved, documents the checkpoint had seen

A trace is recomputed only when its settings (model, prompt, decoding, span selection) change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_write_json
from lmscope.progress import Progress, no_progress

TRACE_JOB_VERSION = 1


def seen_documents(trace: dict[str, Any]) -> int:
    """Documents of a trace (its ``to_dict``) holding a match that the traced checkpoint had trained on."""
    return sum(any((m.get("exposures") or {}).get("seen_before", 0) > 0 for m in d["matches"]) for d in trace["documents"])


def run_trace_job(
    suite_dir: str | os.PathLike[str],
    model: str,
    prompts: list[str],
    out_dir: str | os.PathLike[str],
    *,
    step: int,
    identity: dict[str, Any] | None = None,
    max_new_tokens: int = 48,
    min_length: int = 5,
    max_frequency: int = 10,
    device: str = "auto",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Index ``suite_dir``'s corpus, generate greedily after each prompt with ``model`` (a checkpoint at ``step``) and trace it.

    Exposures are counted for checkpoint ``step``: a match is *seen* when a batch before ``step`` held it whole.
    """
    from lmscope.index import Index, build_index
    from lmscope.index.trace import trace_model
    from lmscope.index.trace_html import write_trace_html
    from lmscope.results.schema import write_results

    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise LmscopeError("[trace] prompts must be a non-empty list of non-empty strings.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_index(Path(suite_dir), out / "index", progress=progress)
    index = Index.open(out / "index")
    traces = []
    rows = []
    progress("trace generations", 0, len(prompts))
    for i, prompt in enumerate(prompts):
        settings = {"version": TRACE_JOB_VERSION, "model": model, "prompt": prompt, "step": step, "max_new_tokens": max_new_tokens,
                    "min_length": min_length, "max_frequency": max_frequency}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        path = out / f"trace-{i}.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or saved.get("key") != key:
            trace = trace_model(index, model, prompt, max_new_tokens=max_new_tokens, device=device, suite=Path(suite_dir),
                                before_step=step, min_length=min_length, max_frequency=max_frequency)
            write_trace_html(trace, out / f"trace-{i}.html", title=f"Trace of {Path(model).name}'s continuation of {prompt!r}")
            saved = {**trace.to_dict(), "key": key}
            atomic_write_json(path, saved)
        seen = seen_documents(saved)
        traces.append({"prompt": prompt, "json": path.name, "html": f"trace-{i}.html", "spans": len(saved["spans"]),
                       "documents": len(saved["documents"]), "seen_documents": seen})
        for metric, value in (("trace_spans", len(saved["spans"])), ("trace_documents", len(saved["documents"])),
                              ("trace_documents_seen", seen)):
            rows.append({**(identity or {"model": model}), "metric": metric, "domain": "all", "value": float(value), "prompt": prompt})
        progress("trace generations", 1, len(prompts))
    write_results(rows, out / "results.parquet")
    return {"index": "index", "model": model, "step": step, "traces": traces, "min_length": min_length, "max_frequency": max_frequency}
