"""Influence end to end for a suite checkpoint: fit factors once, answer queries with documents and exposure steps.

- :func:`fit_checkpoint` fits (or reuses) the curvature factors of a checkpoint on a seeded sample of
  the training rows it had seen, into a directory (``factors.json`` + ``factors.safetensors``; a killed
  fit resumes from ``fit.ckpt``).
- :func:`score_queries` scores candidate training rows for each query (prompt, completion) and returns
  the top proponents and opponents, each with its training step, whether the checkpoint had seen it,
  its documents (id, domain, offset) and per-token scores, which also split the row's score among the
  documents it holds (they sum to it).

A model spec is a mini-suite checkpoint, ``SUITE/SIZE@stepN``; its suite's data order gives the rows.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.influence.candidates import CANDIDATE_SETS, Candidates, all_candidates, filtered_candidates, read_rows, row_provenance
from lmscope.influence.factors import FACTORS_JSON, Factors, FactorSettings, fit_factors
from lmscope.influence.precondition import DEFAULT_DAMPING, Preconditioner, parse_damping
from lmscope.progress import Progress, no_progress

FIT_CHECKPOINT = "fit.ckpt"
DEFAULT_FIT_ROWS = 512


@dataclass
class Query:
    """A prompt and the completion whose log-probability is measured (as text, or also as token ids)."""

    prompt: str
    completion: str
    prompt_ids: list[int] | None = None
    """Token ids of the prompt, when known (e.g. a generation's); used instead of encoding ``prompt``."""
    completion_ids: list[int] | None = None
    """Token ids of the completion, when known."""


@dataclass
class ScoreSettings:
    """How queries are scored."""

    damping: float | str = DEFAULT_DAMPING
    """Damping λ: a number, or ``heuristic`` (0.1 × each layer's mean eigenvalue)."""
    candidates: str = "filtered"
    """``filtered`` (BM25 top rows and rows sharing a span with the query) or ``all`` rows."""
    candidates_top: int = 256
    """``filtered``: rows kept by BM25."""
    limit: int | None = None
    """``all``: score a seeded sample of this many rows (``None``: every row)."""
    seen_only: bool = True
    """Only rows the checkpoint had been trained on (``False``: every row of the data order)."""
    rank: int | None = None
    """Rank of the query gradients (query batching); ``None``: full rank."""
    top: int = 10
    """Proponents and opponents reported per query."""
    batch_size: int = 8
    min_span: int = 8
    """``filtered`` with an index: shortest shared span that adds rows."""
    seed: int = 0

    def __post_init__(self) -> None:
        self.damping = parse_damping(self.damping)
        if self.candidates not in CANDIDATE_SETS:
            raise LmscopeError(f"candidate set {self.candidates!r} is unknown; choose one of {', '.join(CANDIDATE_SETS)}.")
        for name in ("candidates_top", "top", "batch_size", "min_span"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmscopeError(f"{name.replace('_', '-')} {value!r} must be a positive integer.")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise LmscopeError(f"limit {self.limit!r} must be a positive number of rows (or unset for all).")


# -- the checkpoint and its suite ------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded suite checkpoint: model, tokenizer ids, its step and its suite's replay source."""

    spec: str
    model: Any
    tokenizer: Any
    """A :class:`lmscope.data.tokenizer_info.CorpusTokenizer` (encodes as the corpus was encoded)."""
    decoder: Any
    """The model's ``transformers`` tokenizer, for decoding."""
    source: Any
    step: int | None

    @property
    def seen_rows(self) -> int:
        return 0 if self.step is None else self.source.batch_size * min(self.step, self.source.num_steps)


def open_checkpoint(spec: str, *, device: str = "auto", dtype: str = "float32") -> Checkpoint:
    """Load ``SUITE/SIZE@stepN`` with its suite; the model's tokenizer must be the suite corpus's."""
    from lmscope.data.tokenizer_info import corpus_tokenizer
    from lmscope.models.loading import load_model
    from lmscope.models.spec import parse_spec
    from lmscope.suites.replay.mini import MiniSuiteSource, mini_suite_root

    parsed = parse_spec(spec)
    root = mini_suite_root(Path(parsed.name)) if parsed.kind == "local" else None
    if root is None:
        raise LmscopeError(
            f"model {spec!r} is not a checkpoint of a mini suite; influence needs the training data order: give SUITE_DIR/SIZE@stepN "
            "(a suite trained with `lmscope suite train`)."
        )
    source = MiniSuiteSource(root)
    step = None
    if parsed.revision is not None:
        if not parsed.revision.startswith("step") or not parsed.revision[4:].isdigit():
            raise LmscopeError(f"revision {parsed.revision!r} of {spec!r} is not a suite checkpoint; give @stepN.")
        step = int(parsed.revision[4:])
    loaded = load_model(spec, dtype=dtype, device=device)
    if loaded.tokenizer is None:
        raise LmscopeError(f"model {spec!r} ships no tokenizer; give a suite checkpoint directory with its tokenizer files.")
    wrapped = corpus_tokenizer(loaded.tokenizer)
    recorded = (source.corpus.manifest.get("tokenizer") or {}).get("sha256")
    if recorded and wrapped.sha256 != recorded:
        raise LmscopeError(f"model {spec!r} does not use the tokenizer its suite's corpus was tokenized with; give a checkpoint of that suite.")
    if step is None:
        step = source.num_steps
    return Checkpoint(spec, loaded.model, wrapped, loaded.tokenizer, source, step)


# -- fitting ---------------------------------------------------------------------------------------


def fit_rows_positions(checkpoint: Checkpoint, n_rows: int, seed: int) -> np.ndarray:
    """A seeded sample of ``n_rows`` positions the checkpoint had seen (all rows of the data order at step 0)."""
    pool = checkpoint.seen_rows or checkpoint.source.batch_size * checkpoint.source.num_steps
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(n_rows, pool), replace=False)).astype(np.int64)


def fit_checkpoint(checkpoint: Checkpoint, out_dir: str | os.PathLike[str], settings: FactorSettings, *,
                   n_rows: int = DEFAULT_FIT_ROWS, progress: Progress = no_progress) -> Factors:
    """Fit ``settings``' factors of the checkpoint on ``n_rows`` rows it had seen, into ``out_dir``; reused when already there."""
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise LmscopeError(f"--rows {n_rows!r} must be a positive number of training rows.")
    out = Path(out_dir)
    positions = fit_rows_positions(checkpoint, n_rows, settings.seed)
    source_info = {
        "model": checkpoint.spec,
        "suite": str(checkpoint.source.root),
        "step": checkpoint.step,
        "positions_sha": _digest(positions),
        "n_rows": int(len(positions)),
    }
    if (out / FACTORS_JSON).is_file():
        existing = Factors.load(out)
        if existing.settings == settings and {k: existing.source.get(k) for k in source_info} == source_info:
            return existing
        raise LmscopeError(
            f"{str(out)!r} already holds factors of another fit ({existing.settings.strategy} of {existing.source.get('model')!r}); "
            "fit into another directory or delete it."
        )
    rows = read_rows(checkpoint.source, positions, progress)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    factors = fit_factors(checkpoint.model, rows, settings, checkpoint=out / FIT_CHECKPOINT, source=source_info, progress=progress)
    factors.source["seconds"] = round(time.perf_counter() - started, 3)
    factors.save(out)
    return factors


def _digest(positions: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(positions, dtype="<i8").tobytes()).hexdigest()[:16]


# -- scoring ---------------------------------------------------------------------------------------


def encode_query(tokenizer: Any, query: Query) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion as the whole text tokenizes (lm-evaluation-harness's split)."""
    if query.prompt_ids is not None and query.completion_ids is not None:
        if not query.prompt_ids or not query.completion_ids:
            raise LmscopeError("a query's prompt or completion token ids are empty; give at least one token of each.")
        return [int(t) for t in query.prompt_ids], [int(t) for t in query.completion_ids]
    if not query.prompt:
        raise LmscopeError("a query's prompt is empty; give --prompt TEXT (the context the completion follows).")
    if not query.completion:
        raise LmscopeError("a query's completion is empty; give --completion TEXT (the continuation whose probability is measured).")
    prompt = tokenizer.encode_batch([query.prompt])[0]
    whole = tokenizer.encode_batch([query.prompt + query.completion])[0]
    if whole[: len(prompt)] == prompt and len(whole) > len(prompt):
        return list(prompt), list(whole[len(prompt):])
    return list(prompt), list(tokenizer.encode_batch([query.completion])[0])


def choose_candidates(checkpoint: Checkpoint, query_tokens: list[int], settings: ScoreSettings, index: Any = None,
                      progress: Progress = no_progress) -> Candidates:
    before = checkpoint.step if settings.seen_only else None
    if settings.candidates == "all":
        return all_candidates(checkpoint.source, before, settings.limit, settings.seed)
    return filtered_candidates(checkpoint.source, query_tokens, top=settings.candidates_top, index=index, min_span=settings.min_span,
                               before_step=before, progress=progress)


def query_tokens(checkpoint: Checkpoint, queries: list[Query]) -> list[tuple[list[int], list[int]]]:
    if not queries:
        raise LmscopeError("no query given; give --prompt and --completion.")
    return [encode_query(checkpoint.tokenizer, q) for q in queries]


def shared_candidates(checkpoint: Checkpoint, encoded: list[tuple[list[int], list[int]]], settings: ScoreSettings, index: Any = None,
                      progress: Progress = no_progress) -> Candidates:
    """One candidate set for all queries: the union of each query's (``filtered``), or the ``all`` set."""
    if settings.candidates == "all":
        return choose_candidates(checkpoint, [], settings, index, progress)
    sets = [choose_candidates(checkpoint, p + c, settings, index, progress) for p, c in encoded]
    reasons: dict[int, list[str]] = {}
    for q, cands in enumerate(sets):
        for position, why in cands.reasons.items():
            reasons.setdefault(position, []).extend(f"query {q + 1}: {w}" if len(sets) > 1 else w for w in why)
    return Candidates(np.array(sorted(reasons), dtype=np.int64), "filtered", reasons, pool=sets[0].pool)


def score_queries(checkpoint: Checkpoint, factors: Factors, queries: list[Query], settings: ScoreSettings, *, index: Any = None,
                  candidates: Candidates | None = None, progress: Progress = no_progress) -> dict[str, Any]:
    """Score candidate rows for every query; top proponents and opponents with provenance and per-token scores.

    All queries are scored in one pass over the candidates (one forward and backward pass per batch of
    rows, whatever the number of queries), against one candidate set: ``candidates`` when given, else
    the union of each query's. Returns a JSON-ready dict: the settings, and per query its measurement,
    the scores of every candidate (``positions``/``scores``), and the ``proponents`` and ``opponents``.
    """
    import torch

    from lmscope.influence.objectives import query_batch
    from lmscope.influence.scores import prepare_queries, score_batch, score_rows
    from lmscope.influence.taps import tracked_linears

    encoded = query_tokens(checkpoint, queries)
    model = checkpoint.model
    modules = tracked_linears(model, factors.settings.modules)
    if {name: (m.out_features, m.in_features + (m.bias is not None)) for name, m in modules.items()} != factors.shapes:
        raise LmscopeError("the factors were fitted on layers of another shape; fit them for this model with `lmscope influence fit`.")
    precond = Preconditioner(factors, settings.damping)
    started = time.perf_counter()
    prepared = prepare_queries(model, modules, query_batch(encoded), precond, rank=settings.rank)
    if candidates is None:
        candidates = shared_candidates(checkpoint, encoded, settings, index, progress)
    rows = read_rows(checkpoint.source, candidates.positions)
    all_scores = score_rows(model, modules, prepared, rows, batch_size=settings.batch_size, progress=progress)
    out_queries = []
    for q, (query, (prompt_ids, completion_ids)) in enumerate(zip(queries, encoded)):
        scores = all_scores[q]
        order = np.argsort(-scores, kind="stable")
        top_pos = [k for k in order[: settings.top].tolist() if scores[k] > 0]
        top_neg = [k for k in order[::-1][: settings.top].tolist() if scores[k] < 0]
        picked = sorted(set(top_pos + top_neg))
        details: dict[int, dict[str, Any]] = {}
        for start in range(0, len(picked), settings.batch_size):
            chunk = picked[start : start + settings.batch_size]
            _, per_token = score_batch(model, modules, prepared, torch.as_tensor(rows[chunk]), per_token=True)
            for j, k in enumerate(chunk):
                position = int(candidates.positions[k])
                details[k] = _row_detail(checkpoint, position, rows[k], per_token[q, j].numpy(), float(scores[k]), candidates.reasons.get(position, []))
        out_queries.append({
            "prompt": query.prompt,
            "completion": query.completion,
            "prompt_tokens": prompt_ids,
            "completion_tokens": completion_ids,
            "completion_logprob": -float(prepared.measurements[q]),
            "candidates": {"method": candidates.method, "n": len(candidates), "pool": candidates.pool},
            "positions": candidates.positions.tolist(),
            "scores": scores.tolist(),
            "proponents": [details[k] for k in top_pos],
            "opponents": [details[k] for k in top_neg],
        })
    return {
        "model": checkpoint.spec,
        "suite": str(checkpoint.source.root),
        "checkpoint_step": checkpoint.step,
        "batch_size": checkpoint.source.batch_size,
        "factors": {"strategy": factors.settings.strategy, "modules": factors.settings.modules, "fisher": factors.settings.fisher,
                    "n_layers": len(factors.layers), "n_rows": factors.n_sequences, "source": factors.source},
        "settings": {**asdict(settings), "damping": settings.damping},
        "seconds": round(time.perf_counter() - started, 3),
        "queries": out_queries,
    }


def _row_detail(checkpoint: Checkpoint, position: int, row: np.ndarray, token_scores: np.ndarray, score: float, reasons: list[str]) -> dict[str, Any]:
    """One scored row: step, seen, documents with their share of the score, and its tokens with their scores."""
    prov = row_provenance(checkpoint.source, position)
    inputs = row[:-1]
    pieces = []
    for seg in prov["segments"]:
        a, b = seg["row_offset"], min(seg["row_offset"] + seg["length"], len(inputs))
        pieces.append({**seg, "score": float(token_scores[a:b].sum()) if b > a else 0.0})
    texts = [checkpoint.decoder.decode([int(t)]) for t in inputs.tolist()]
    return {
        "position": position,
        "step": prov["step"],
        "seen": checkpoint.step is not None and position < checkpoint.source.batch_size * checkpoint.step,
        "score": score,
        "reasons": reasons,
        "documents": pieces,
        "token_ids": [int(t) for t in inputs.tolist()],
        "tokens": texts,
        "token_scores": [float(v) for v in token_scores.tolist()],
    }


def write_scores_parquet(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Every candidate's score, one row per (query, position): ``query, position, step, seen, score``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmscope.fsio import atomic_write_with

    batch = result["batch_size"]
    seen_limit = None if result["checkpoint_step"] is None else batch * result["checkpoint_step"]
    cols: dict[str, list[Any]] = {"query": [], "position": [], "step": [], "seen": [], "score": []}
    for q, query in enumerate(result["queries"]):
        for position, score in zip(query["positions"], query["scores"]):
            cols["query"].append(q)
            cols["position"].append(position)
            cols["step"].append(position // batch)
            cols["seen"].append(seen_limit is not None and position < seen_limit)
            cols["score"].append(score)
    table = pa.table({"query": pa.array(cols["query"], pa.int32()), "position": pa.array(cols["position"], pa.int64()),
                      "step": pa.array(cols["step"], pa.int64()), "seen": pa.array(cols["seen"], pa.bool_()),
                      "score": pa.array(cols["score"], pa.float64())})
    atomic_write_with(path, lambda p: pq.write_table(table, p))
    return Path(path)


# -- the gradient store ----------------------------------------------------------------------------

STORE_POSITIONS = "positions.npy"


def build_checkpoint_store(checkpoint: Checkpoint, out_dir: str | os.PathLike[str], *, n_rows: int | None = None, dim_per_layer: int = 256,
                           modules: str = "blocks", seed: int = 0, batch_size: int = 8, progress: Progress = no_progress) -> Any:
    """A gradient store (:mod:`lmscope.influence.store`) of the rows the checkpoint had seen (a seeded sample of ``n_rows``, or all).

    The training-order positions of the stored rows are saved as ``positions.npy`` beside it; the store's
    model identity names the checkpoint and those positions, so a store is reused only for the same ones.
    """
    from lmscope.fsio import atomic_write_with
    from lmscope.influence.store import GradientStore
    from lmscope.influence.taps import tracked_linears

    pool = checkpoint.seen_rows or checkpoint.source.batch_size * checkpoint.source.num_steps
    if n_rows is None or n_rows >= pool:
        positions = np.arange(pool, dtype=np.int64)
    else:
        positions = fit_rows_positions(checkpoint, n_rows, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"model": checkpoint.spec, "step": checkpoint.step, "modules": modules, "positions_sha": _digest(positions)}
    rows = read_rows(checkpoint.source, positions, progress)
    store = GradientStore.build(checkpoint.model, tracked_linears(checkpoint.model, modules), rows, out, dim_per_layer=dim_per_layer,
                                seed=seed, batch_size=batch_size, model_identity=identity, progress=progress)
    def write(path: Path) -> None:
        with open(path, "wb") as handle:  # a file object: np.save would add ".npy" to a bare temporary name
            np.save(handle, positions)

    atomic_write_with(out / STORE_POSITIONS, write)
    return store


def score_with_store(checkpoint: Checkpoint, store_dir: str | os.PathLike[str], queries: list[Query], *, strategy: str = "fisher",
                     damping: float | str = "heuristic", top: int = 10, batch_size: int = 8) -> dict[str, Any]:
    """Scores of every stored row for each query from the gradient store (no training gradient recomputed).

    The top rows are then rescored exactly, token by token, with gradient dot products (``exact_score``,
    ``token_scores``), so their highlights are exact while the ranking is the store's.
    """
    import torch

    from lmscope.influence.factors import Factors, FactorSettings
    from lmscope.influence.objectives import query_batch
    from lmscope.influence.scores import prepare_queries, score_batch
    from lmscope.influence.store import GradientStore
    from lmscope.influence.taps import tracked_linears

    store = GradientStore.open(store_dir)
    identity = store.model
    if identity.get("model") != checkpoint.spec:
        raise LmscopeError(f"the gradient store in {str(store_dir)!r} is of {identity.get('model')!r}, not {checkpoint.spec!r}; "
                           "build a store for this checkpoint with `lmscope influence store`.")
    try:
        positions = np.load(Path(store_dir) / STORE_POSITIONS)
    except (OSError, ValueError, EOFError) as err:
        raise LmscopeError(f"{str(Path(store_dir) / STORE_POSITIONS)!r} could not be read ({err}); build the store again with "
                           "`lmscope influence store`.") from None
    if positions.shape != (store.n_rows,):
        raise LmscopeError(f"{STORE_POSITIONS} in {str(store_dir)!r} lists {positions.shape[0]} rows but the store holds {store.n_rows}; "
                           "build the store again.")
    modules = tracked_linears(checkpoint.model, identity.get("modules", "blocks"))
    store.check_modules(modules)
    encoded = query_tokens(checkpoint, queries)
    started = time.perf_counter()
    projected, measurements = store.project_batch(checkpoint.model, modules, query_batch(encoded))
    all_scores = store.scores(projected, strategy=strategy, damping=damping)
    seconds = time.perf_counter() - started
    identity_factors = Factors(FactorSettings(strategy="identity", modules=identity.get("modules", "blocks")), {}, {})
    exact = prepare_queries(checkpoint.model, modules, query_batch(encoded), Preconditioner(identity_factors))
    out_queries = []
    for q, (query, (prompt_ids, completion_ids)) in enumerate(zip(queries, encoded)):
        scores = all_scores[q]
        order = np.argsort(-scores, kind="stable")
        top_pos = [k for k in order[:top].tolist() if scores[k] > 0]
        top_neg = [k for k in order[::-1][:top].tolist() if scores[k] < 0]
        picked = sorted(set(top_pos + top_neg))
        rows = read_rows(checkpoint.source, positions[picked]) if picked else np.zeros((0, checkpoint.source.row_length), np.int64)
        details: dict[int, dict[str, Any]] = {}
        for start in range(0, len(picked), batch_size):
            chunk = list(range(start, min(start + batch_size, len(picked))))
            exact_scores, per_token = score_batch(checkpoint.model, modules, exact, torch.as_tensor(rows[chunk]), per_token=True)
            for j, c in enumerate(chunk):
                k = picked[c]
                detail = _row_detail(checkpoint, int(positions[k]), rows[c], per_token[q, j].numpy(), float(scores[k]), [])
                detail["exact_score"] = float(exact_scores[q, j])
                details[k] = detail
        out_queries.append({
            "prompt": query.prompt, "completion": query.completion, "prompt_tokens": prompt_ids, "completion_tokens": completion_ids,
            "completion_logprob": -float(measurements[q]),
            "candidates": {"method": "store", "n": int(len(positions)), "pool": int(len(positions))},
            "positions": positions.tolist(), "scores": scores.tolist(),
            "proponents": [details[k] for k in top_pos], "opponents": [details[k] for k in top_neg],
        })
    return {
        "model": checkpoint.spec, "suite": str(checkpoint.source.root), "checkpoint_step": checkpoint.step,
        "batch_size": checkpoint.source.batch_size,
        "store": {"path": str(store_dir), "strategy": strategy, "damping": store.damping(damping) if strategy == "fisher" else None,
                  "dim": store.dim, "n_rows": store.n_rows},
        "seconds": round(seconds, 3),
        "queries": out_queries,
    }
