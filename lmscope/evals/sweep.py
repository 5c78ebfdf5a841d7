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

SWEEP_VERSION = 2
METRICS = ("bpb", "memorization", "icl", "induction", "lens", "tuned_lens")


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
             replay: Any, progress: Progress) -> list[dict[str, Any]]:
    """Result rows of one metric on one loaded checkpoint."""
    from lmscope.evals import bpb, icl, lens

    identity = target.identity()
    if metric == "bpb":
        results = bpb.bits_per_byte_by_domain(loaded.model, corpus, ctx=settings["ctx"], stride=settings["stride"],
                                              batch_size=batch_size, max_documents=settings["max_documents"],
                                              max_per_domain=settings["documents_per_domain"], tokenizer=loaded.tokenizer)
        return bpb.result_rows(results, **identity)
    if metric == "icl":
        score = icl.in_context_learning_score(loaded.model, corpus, late=settings["late"], early=settings["early"],
                                              n_contexts=settings["n_contexts"], batch_size=batch_size)
        return icl.result_rows(score, **identity)
    if metric == "memorization":
        from lmscope.evals import memorization

        results = memorization.memorization_scores(loaded.model, replay.sequences(settings), prefix_len=settings["prefix_len"],
                                                   batch_size=128)  # decoding cost is per call; results do not depend on it
        return memorization.result_rows(results, **identity)
    from lmscope.models.hooks import HookedModel

    hooked = HookedModel(loaded.model, loaded.tokenizer)
    limit = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
    if metric in ("lens", "tuned_lens"):
        ctx = min(settings["max_ctx"], limit) if limit else settings["max_ctx"]
        if metric == "lens":
            layers = lens.logit_lens(hooked, corpus, ctx=ctx, n_contexts=settings["n_contexts"], batch_size=batch_size,
                                     split=settings["split"])
            return lens.result_rows(layers, **identity)
        from lmscope.evals import tuned_lens

        train_ctx = min(settings["train_ctx"], limit) if limit else settings["train_ctx"]
        trained = tuned_lens.train_tuned_lens(hooked, corpus, ctx=train_ctx, n_contexts=settings["train_contexts"],
                                              steps=settings["steps"], lr=settings["lr"],
                                              tokens_per_step=settings["tokens_per_step"], seed=settings["seed"],
                                              progress=progress)
        layers = tuned_lens.evaluate_lens(hooked, corpus, trained, ctx=ctx, n_contexts=settings["n_contexts"],
                                          batch_size=batch_size, split=settings["split"])
        return tuned_lens.result_rows(layers, **identity)
    # Random segments of up to max_seq_len tokens, shortened to fit twice (plus a BOS) in the model's context.
    seq_len = min(settings["max_seq_len"], (limit - 1) // 2) if limit else settings["max_seq_len"]
    scores = icl.induction_scores(hooked, seq_len=seq_len, n_sequences=settings["n_sequences"], seed=settings["seed"])
    return [{**row, "seq_len": seq_len} for row in icl.result_rows(scores, **identity)]


class _Replay:
    """The trained sequences of a suite, sampled once per sweep for the memorization metric."""

    def __init__(self, suite_root: str | None) -> None:
        self.root = suite_root
        self._sequences: dict[str, Any] = {}

    def sha(self) -> str | None:
        """What identifies the data order: the sha256 of the suite's order file, or None without a suite."""
        if self.root is None:
            return None
        order = Path(self.root) / "data" / "order.json"
        return sha256_file(order) if order.is_file() else sha256_file(Path(self.root) / "suite.json")

    def sequences(self, settings: dict[str, Any]) -> list[Any]:
        from lmscope.evals.memorization import sample_trained_sequences
        from lmscope.suites.replay import open_source

        key = json.dumps(settings, sort_keys=True)
        if key not in self._sequences:
            self._sequences[key] = sample_trained_sequences(
                open_source(self.root), n_sequences=settings["n_sequences"], seed=settings["seed"],
                prefix_len=settings["prefix_len"], continuation_len=settings["continuation_len"])
        return self._sequences[key]


def sweep_settings(
    *,
    bpb_ctx: int | None = None,
    bpb_stride: int | None = None,
    documents_per_domain: int | None = 16,
    max_documents: int | None = None,
    memorization_sequences: int = 256,
    dtype: str = "float32",
) -> dict[str, dict[str, Any]]:
    """Every setting that determines each metric's result (part of each unit's cache key)."""
    return {
        "bpb": {"ctx": bpb_ctx, "stride": bpb_stride, "documents_per_domain": documents_per_domain,
                "max_documents": max_documents, "split": "heldout", "dtype": dtype},
        "icl": {"late": 500, "early": 50, "n_contexts": 64, "split": "heldout", "dtype": dtype},
        "induction": {"max_seq_len": 50, "n_sequences": 10, "seed": 0, "dtype": dtype},
        "lens": {"kind": "logit", "max_ctx": 128, "n_contexts": 16, "split": "heldout", "dtype": dtype},
        "tuned_lens": {"kind": "tuned", "max_ctx": 128, "n_contexts": 16, "split": "heldout", "train_ctx": 256,
                       "train_contexts": 32, "steps": 400, "lr": 1e-2, "tokens_per_step": 64, "seed": 0, "dtype": dtype},
        "memorization": {"n_sequences": memorization_sequences, "prefix_len": 32, "continuation_len": 32, "seed": 0,
                         "dtype": dtype},
    }


def run_sweep(
    spec_or_suite: str,
    corpus_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    select: str | None = None,
    metrics: tuple[str, ...] = ("bpb",),
    bpb_ctx: int | None = None,
    bpb_stride: int | None = None,
    documents_per_domain: int | None = None,
    max_documents: int | None = 64,
    memorization_sequences: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    progress: Progress = no_progress,
) -> Path:
    """Run ``metrics`` on every target of ``spec_or_suite``; returns ``OUT/results/eval.parquet``.

    A checkpoint is loaded once for all the metrics it still lacks, and not at all when the
    cache holds them all.
    """
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.models.loading import load_model
    from lmscope.results.schema import results_table, write_results

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LmscopeError(f"unknown metric(s) {', '.join(unknown)}; available here: {', '.join(METRICS)}.")
    corpus = TokenizedCorpus.open(corpus_path)
    corpus_sha = sha256_file(Path(corpus.path) / "manifest.json")
    targets = sweep_targets(spec_or_suite, select)
    replay = _Replay(_suite_root(spec_or_suite) if "memorization" in metrics else None)
    if "memorization" in metrics and replay.root is None:
        raise LmscopeError(f"the memorization metric needs the data order of a suite; {spec_or_suite!r} is not a local suite "
                           "(train one with `lmscope suite train`, or leave memorization out).")
    replay_sha = replay.sha()
    out = Path(out_dir)
    cache = out / "cache"
    settings = sweep_settings(bpb_ctx=bpb_ctx, bpb_stride=bpb_stride, documents_per_domain=documents_per_domain,
                              max_documents=max_documents, memorization_sequences=memorization_sequences, dtype=dtype)
    keys: list[Path] = []
    progress("evaluate checkpoints", 0, len(targets) * len(metrics))
    for target in targets:
        loaded = None
        for metric in metrics:
            data_sha = replay_sha if metric == "memorization" else corpus_sha
            key = cache / f"{_unit_key(target, metric, settings[metric], data_sha)}.parquet"
            keys.append(key)
            if not key.is_file():
                loaded = loaded or load_model(target.spec, dtype=dtype, device=device)
                write_results(_compute(metric, loaded, corpus, settings[metric], batch_size, target, replay, progress), key)
            progress("evaluate checkpoints", 1, len(targets) * len(metrics))
    tables = [pq.read_table(key) for key in keys]
    combined = pa.concat_tables(tables, promote_options="default") if tables else results_table([])
    return write_results(combined, out / "results" / "eval.parquet")


def _suite_root(spec_or_suite: str) -> str | None:
    """The directory of the local suite that ``spec_or_suite`` names (the suite, or one size of it), else None."""
    from lmscope.suites.replay import mini_suite_root

    path = Path(spec_or_suite).expanduser()
    if not path.exists():
        return None
    root = mini_suite_root(path)
    return str(root) if root is not None else None
