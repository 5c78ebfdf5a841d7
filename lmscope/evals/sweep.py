"""Sweeps: metrics over checkpoints × sizes × seeds, cached so a rerun computes only what is missing.

Each (model, revision, metric, metric settings, corpus) is one *unit of work*, named by
the sha256 of everything that determines its result (and :data:`SWEEP_VERSION`, bumped
when a metric's computation changes). A unit's result rows are written atomically to
``OUT/cache/<key>.parquet``; a killed sweep resumes by skipping the keys it has, and the
union of the units asked for is written to ``OUT/results/eval.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lmscope.errors import LmscopeError
from lmscope.fsio import sha256_file
from lmscope.progress import Progress, no_progress

SWEEP_VERSION = 1
METRICS = ("bpb", "icl", "induction", "lens")


@dataclass(frozen=True)
class Target:
    """One model at one checkpoint, with the identity columns of the results schema."""

    spec: str
    suite: str | None
    model: str
    size: str | None
    seed: int | None
    revision: str | None
    step: int | None
    tokens_seen: int | None

    def identity(self) -> dict[str, Any]:
        return {"suite": self.suite, "model": self.model, "size": self.size, "seed": self.seed,
                "revision": self.revision, "step": self.step, "tokens_seen": self.tokens_seen}


def _suite_seeds(root: Path) -> dict[str, int]:
    path = root / "suite.json"
    if not path.is_file():
        return {}
    models = json.loads(path.read_text()).get("models", {})
    return {name: info.get("seed") for name, info in models.items() if isinstance(info, dict)}


def sweep_targets(spec_or_suite: str, select: str | None = None) -> list[Target]:
    """The (model, checkpoint) pairs a sweep covers.

    ``spec_or_suite`` is a local suite directory (every size and seed), one size of it, a
    catalogued hub model (``EleutherAI/pythia-70m``: its catalog checkpoints), or any other
    model spec (one target, its own revision).
    """
    from lmscope.suites.catalog import resolve_suite
    from lmscope.suites.selectors import select_checkpoints

    path = Path(spec_or_suite).expanduser()
    is_suite = path.is_dir() and not (path / "config.json").is_file()
    is_catalogued = False
    if not is_suite and "@" not in spec_or_suite and "/" in spec_or_suite and not path.exists():
        from lmscope.suites.catalog import catalog_suite

        is_catalogued = catalog_suite(spec_or_suite) is not None
    if not (is_suite or is_catalogued):
        if select is not None:
            raise LmscopeError(f"--select needs a suite or a catalogued model; {spec_or_suite!r} is a single model.")
        return [Target(spec_or_suite, None, spec_or_suite, None, None, None, None, None)]
    suite, model = resolve_suite(spec_or_suite)
    models = [model] if model is not None else list(suite.models)
    seeds = _suite_seeds(Path(suite.root)) if suite.root is not None else {}
    targets = []
    for m in models:
        checkpoints = suite.checkpoints()
        if select is not None:
            checkpoints = select_checkpoints(checkpoints, select, where=spec_or_suite)
        name = Path(m.model_id).name if suite.family == "local" else m.model_id
        for c in checkpoints:
            targets.append(Target(f"{m.model_id}@{c.revision}", suite.name, name, m.size, seeds.get(name),
                                  c.revision, c.step, c.tokens_seen))
    return targets


def _unit_key(target: Target, metric: str, settings: dict[str, Any], corpus_sha: str) -> str:
    payload = json.dumps({"v": SWEEP_VERSION, "spec": target.spec, "metric": metric, "settings": settings,
                          "corpus": corpus_sha}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _compute(metric: str, loaded: Any, corpus: Any, settings: dict[str, Any], batch_size: int, target: Target,
             bpb_ctx: int | None, bpb_stride: int | None) -> list[dict[str, Any]]:
    """Result rows of one metric on one loaded checkpoint."""
    from lmscope.evals import bpb, icl, lens

    if metric == "bpb":
        results = bpb.bits_per_byte_by_domain(loaded.model, corpus, ctx=bpb_ctx, stride=bpb_stride, batch_size=batch_size,
                                              max_documents=settings["max_documents"], tokenizer=loaded.tokenizer)
        return bpb.result_rows(results, **target.identity())
    if metric == "icl":
        score = icl.in_context_learning_score(loaded.model, corpus, late=settings["late"], early=settings["early"],
                                              n_contexts=settings["n_contexts"], batch_size=batch_size)
        return icl.result_rows(score, **target.identity())
    from lmscope.models.hooks import HookedModel

    limit = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
    if metric == "lens":
        ctx = min(settings["max_ctx"], limit) if limit else settings["max_ctx"]
        layers = lens.logit_lens(HookedModel(loaded.model, loaded.tokenizer), corpus, ctx=ctx,
                                 n_contexts=settings["n_contexts"], batch_size=batch_size, split=settings["split"])
        return lens.result_rows(layers, **target.identity())
    # Random segments of up to max_seq_len tokens, shortened to fit twice (plus a BOS) in the model's context.
    seq_len = min(settings["max_seq_len"], (limit - 1) // 2) if limit else settings["max_seq_len"]
    scores = icl.induction_scores(HookedModel(loaded.model, loaded.tokenizer), seq_len=seq_len,
                                  n_sequences=settings["n_sequences"], seed=settings["seed"])
    return [{**row, "seq_len": seq_len} for row in icl.result_rows(scores, **target.identity())]


def run_sweep(
    spec_or_suite: str,
    corpus_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    select: str | None = None,
    metrics: tuple[str, ...] = ("bpb",),
    bpb_ctx: int | None = None,
    bpb_stride: int | None = None,
    max_documents: int | None = 64,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    progress: Progress = no_progress,
) -> Path:
    """Run ``metrics`` on every target of ``spec_or_suite``; returns ``OUT/results/eval.parquet``."""
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.models.loading import load_model
    from lmscope.results.schema import results_table, write_results

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LmscopeError(f"unknown metric(s) {', '.join(unknown)}; available here: {', '.join(METRICS)}.")
    corpus = TokenizedCorpus.open(corpus_path)
    corpus_sha = sha256_file(Path(corpus.path) / "manifest.json")
    targets = sweep_targets(spec_or_suite, select)
    out = Path(out_dir)
    cache = out / "cache"
    settings = {
        "bpb": {"ctx": bpb_ctx, "stride": bpb_stride, "max_documents": max_documents, "split": "heldout", "dtype": dtype},
        "icl": {"late": 500, "early": 50, "n_contexts": max_documents or 256, "split": "heldout", "dtype": dtype},
        "induction": {"max_seq_len": 50, "n_sequences": 10, "seed": 0, "dtype": dtype},
        "lens": {"kind": "logit", "max_ctx": 128, "n_contexts": 16, "split": "heldout", "dtype": dtype},
    }
    keys: list[Path] = []
    work = [(t, m) for t in targets for m in metrics]
    progress("evaluate checkpoints", 0, len(work))
    for target, metric in work:
        key = cache / f"{_unit_key(target, metric, settings[metric], corpus_sha)}.parquet"
        keys.append(key)
        if not key.is_file():
            loaded = load_model(target.spec, dtype=dtype, device=device)
            write_results(_compute(metric, loaded, corpus, settings[metric], batch_size, target, bpb_ctx, bpb_stride), key)
        progress("evaluate checkpoints", 1, len(work))
    tables = [pq.read_table(key) for key in keys]
    combined = pa.concat_tables(tables, promote_options="default") if tables else results_table([])
    return write_results(combined, out / "results" / "eval.parquet")
