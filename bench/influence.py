"""Benchmark: lmscope's influence functions vs kronfluence, on the same model, rows, queries, Fisher and damping.

Model: the default mini suite's 1.6m model (GPT-NeoX, hidden 128, 3 layers, vocabulary 4096) at its last
checkpoint, the 12 linear layers of its blocks. Training set: ``--rows`` rows the checkpoint was trained on
(a seeded sample of the data order; 257 tokens each). Queries: ``--queries`` held-out documents of the
suite's corpus, each an end-of-text token and 32 tokens of prompt, then 16 tokens of completion.

For each strategy (identity, diagonal, K-FAC, EK-FAC), in one run, one after the other, with the same
number of torch threads:

- **fit**: factor fitting time (lmscope ``fit_factors``; kronfluence ``Analyzer.fit_all_factors``);
- **score**: pairwise scores of all queries against all rows (lmscope ``prepare_queries`` + ``score_rows``;
  kronfluence ``compute_pairwise_scores``), each from its own fitted factors;
- **agreement**: Pearson correlation of the two score vectors, per query (min and median reported).

Both use the *empirical* Fisher (the data's targets), so the factors are the same up to floating point and
the comparison has no Monte Carlo noise; ``--fisher sampled`` draws targets in each library (its own
generator), which adds sampling noise to the agreement. Damping 1e-8 (kronfluence's default) unless
``--damping``. kronfluence runs with ``cpu=True`` from a temporary directory (it writes factors and scores to
disk, as it always does; that is part of its cost).

Then the two ways to make repeated queries cheaper:

- **query batching** (rank-``r`` preconditioned query gradients): lmscope ``rank=r`` vs kronfluence
  ``query_gradient_low_rank=r``, EK-FAC; time and correlation with each one's full-rank scores;
- **gradient store** (lmscope only; kronfluence has none): build time once, then the time to score a new
  set of queries against every row (identity and projected-Fisher), and its correlation with exact EK-FAC
  and identity scores. The baseline for a new query set is kronfluence's pairwise scoring time.

Run: ``.venv/bin/python bench/influence.py [--rows 256] [--queries 8] [--threads 2] [--json] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the kronfluence runner shared with the tests
os.environ.setdefault("TQDM_DISABLE", "1")

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def _setup(n_rows: int, n_queries: int, seed: int) -> tuple[Any, np.ndarray, list[tuple[list[int], list[int]]], str]:
    from lmscope.influence.candidates import read_rows
    from lmscope.influence.job import fit_rows_positions, open_checkpoint
    from lmscope.influence.lds import heldout_queries
    from lmscope.suites.catalog import resolve_suite
    from lmscope.suites.train import ensure_default_suite

    suite_dir = ensure_default_suite(device="cpu")
    suite, _ = resolve_suite(str(suite_dir))
    last = max(suite.checkpoints(), key=lambda c: c.step)
    spec = f"{suite_dir}/1.6m@{last.revision}"
    checkpoint = open_checkpoint(spec, device="cpu")
    rows = read_rows(checkpoint.source, fit_rows_positions(checkpoint, n_rows, seed))
    queries = heldout_queries(suite_dir, n_queries, prompt_tokens=32, completion_tokens=16)
    return checkpoint, rows, queries, spec


def _pearson(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(a[q], b[q])[0, 1]) for q in range(a.shape[0])]


def _lmscope(model: Any, rows: np.ndarray, queries: list, strategy: str, fisher: str, damping: float, rank: int | None = None,
             factors: Any = None) -> tuple[np.ndarray, float, float, Any]:
    from lmscope.influence.factors import FactorSettings, fit_factors
    from lmscope.influence.objectives import query_batch
    from lmscope.influence.precondition import Preconditioner
    from lmscope.influence.scores import prepare_queries, score_rows
    from lmscope.influence.taps import tracked_linears

    modules = tracked_linears(model)
    start = time.perf_counter()
    if factors is None:
        factors = fit_factors(model, rows, FactorSettings(strategy=strategy, fisher=fisher, batch_size=8))
    fitted = time.perf_counter()
    prepared = prepare_queries(model, modules, query_batch(queries), Preconditioner(factors, damping), rank=rank)
    scores = score_rows(model, modules, prepared, rows, batch_size=8)
    scored = time.perf_counter()
    return scores, fitted - start, scored - fitted, factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="training rows scored (and fitted on)")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fisher", choices=("empirical", "sampled"), default="empirical")
    parser.add_argument("--damping", type=float, default=1e-8)
    parser.add_argument("--rank", type=int, default=32, help="query batching rank")
    parser.add_argument("--dim-per-layer", type=int, default=256, help="gradient store: projected size per layer")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 rows, 2 queries")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.queries = 32, 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from influence_reference import kronfluence_scores

    from lmscope.influence.taps import tracked_linears

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    begin = time.perf_counter()
    checkpoint, rows, queries, spec = _setup(args.rows, args.queries, args.seed)
    model = checkpoint.model
    names = list(tracked_linears(model))
    results: dict[str, Any] = {"strategies": {}}
    # warm-up (untimed): first calls pay one-time costs (allocator, kernels, kronfluence's module wrapping)
    _lmscope(model, rows[:8], queries[:1], "identity", args.fisher, args.damping)
    kronfluence_scores(model, rows[:8], queries[:1], names, strategy="identity", damping=args.damping,
                       empirical_fisher=args.fisher == "empirical", batch_size=8)
    ekfac_scores = identity_scores = None
    ekfac_factors = None
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        ours, fit_s, score_s, factors = _lmscope(model, rows, queries, strategy, args.fisher, args.damping)
        timings: dict[str, float] = {}
        ref = kronfluence_scores(model, rows, queries, names, strategy=strategy, damping=args.damping,
                                 empirical_fisher=args.fisher == "empirical", batch_size=8, timings=timings)
        corr = _pearson(ours, ref)
        entry = {
            "lmscope": {"fit_s": fit_s, "score_s": score_s},
            "kronfluence": {"fit_s": timings["fit"], "score_s": timings["score"]},
            "pearson_min": min(corr), "pearson_median": float(np.median(corr)),
        }
        entry["fit_speedup"] = timings["fit"] / fit_s if fit_s > 0 else None
        entry["score_speedup"] = timings["score"] / score_s
        results["strategies"][strategy] = entry
        log(f"{strategy}: fit {fit_s:.2f} s vs {timings['fit']:.2f} s; score {score_s:.2f} s vs {timings['score']:.2f} s; "
            f"pearson min {min(corr):.5f}")
        if strategy == "ekfac":
            ekfac_scores, ekfac_factors, kron_ekfac, kron_score_s = ours, factors, ref, timings["score"]
        if strategy == "identity":
            identity_scores = ours

    if ekfac_factors is not None:
        low, _, low_s, _ = _lmscope(model, rows, queries, "ekfac", args.fisher, args.damping, rank=args.rank, factors=ekfac_factors)
        timings = {}
        kron_low = kronfluence_scores(model, rows, queries, names, strategy="ekfac", damping=args.damping,
                                      empirical_fisher=args.fisher == "empirical", batch_size=8, query_rank=args.rank, timings=timings)
        results["query_batching"] = {
            "rank": args.rank,
            "lmscope": {"score_s": low_s, "pearson_vs_full_min": min(_pearson(low, ekfac_scores))},
            "kronfluence": {"score_s": timings["score"], "pearson_vs_full_min": min(_pearson(kron_low, kron_ekfac))},
            "pearson_lmscope_vs_kronfluence_min": min(_pearson(low, kron_low)),
        }
        log(f"query batching r={args.rank}: {low_s:.2f} s vs {timings['score']:.2f} s")

    from lmscope.influence.objectives import query_batch
    from lmscope.influence.store import GradientStore

    modules = tracked_linears(model)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = GradientStore.build(model, modules, rows, Path(tmp) / "store", dim_per_layer=args.dim_per_layer, seed=args.seed)
        build_s = time.perf_counter() - start
        store.fisher()
        entry = {"dim": store.dim, "build_s": build_s}
        for strategy in ("identity", "fisher", "fisher"):  # fisher twice: the first query set also factorises F̂ + λI (cached)
            start = time.perf_counter()
            projected, _ = store.project_batch(model, modules, query_batch(queries))
            scores = store.scores(projected, strategy=strategy, damping="heuristic")
            key = f"{strategy}_query_s" if f"{strategy}_query_s" not in entry else f"{strategy}_first_query_s"
            if key.endswith("first_query_s"):
                entry[key], entry[f"{strategy}_query_s"] = entry[f"{strategy}_query_s"], time.perf_counter() - start
            else:
                entry[key] = time.perf_counter() - start
            if ekfac_scores is not None:
                entry[f"{strategy}_pearson_vs_ekfac_median"] = float(np.median(_pearson(scores, ekfac_scores)))
            if identity_scores is not None:
                entry[f"{strategy}_pearson_vs_identity_median"] = float(np.median(_pearson(scores, identity_scores)))
        if ekfac_factors is not None:
            entry["kronfluence_new_query_set_s"] = kron_score_s
            entry["speedup_vs_kronfluence_new_queries"] = kron_score_s / entry["fisher_query_s"]
        results["gradient_store"] = entry
        log(f"store: build {build_s:.1f} s; new queries {entry['fisher_query_s']:.3f} s")

    import kronfluence

    summary = {
        "model": spec, "rows": int(rows.shape[0]), "row_tokens": int(rows.shape[1]), "queries": len(queries),
        "tracked_layers": len(names), "fisher": args.fisher, "damping": args.damping, "results": results,
        "torch": torch.__version__, "kronfluence": kronfluence.__version__, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "wall_seconds": time.perf_counter() - begin,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{spec}: {summary['rows']} rows × {summary['row_tokens']} tokens, {summary['queries']} queries, {len(names)} layers, "
          f"{args.fisher} Fisher, damping {args.damping:g}, {summary['torch_threads']} threads")
    print(f"{'strategy':10} {'fit lmscope':>12} {'fit kronfl.':>12} {'score lmscope':>14} {'score kronfl.':>14} {'pearson min':>12}")
    for name, e in results["strategies"].items():
        print(f"{name:10} {e['lmscope']['fit_s']:11.2f}s {e['kronfluence']['fit_s']:11.2f}s {e['lmscope']['score_s']:13.2f}s "
              f"{e['kronfluence']['score_s']:13.2f}s {e['pearson_min']:12.5f}")
    if "query_batching" in results:
        qb = results["query_batching"]
        print(f"query batching, rank {qb['rank']}: lmscope {qb['lmscope']['score_s']:.2f} s, kronfluence {qb['kronfluence']['score_s']:.2f} s")
    gs = results["gradient_store"]
    print(f"gradient store: build {gs['build_s']:.1f} s (D = {gs['dim']}); a new query set: identity {gs['identity_query_s']:.3f} s, "
          f"fisher {gs['fisher_query_s']:.3f} s (the first {gs['fisher_first_query_s']:.3f} s, with the Cholesky factorisation)")


if __name__ == "__main__":
    main()
