"""``lmscope influence``: fit curvature factors for a suite checkpoint, and ask which training rows made it say something."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmscope.cli import app
from lmscope.cli.options import DeviceOption, DtypeOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout
from lmscope.errors import LmscopeError

influence_app = typer.Typer(help="Influence functions (EK-FAC and simpler curvature): which training rows, seen when, made the model say this.",
                            no_args_is_help=True)
app.add_typer(influence_app, name="influence")

CHECKPOINT_HELP = "A mini-suite checkpoint, SUITE_DIR/SIZE@stepN (its suite's data order gives the training rows)."


def _clean(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", " ")


@influence_app.command("fit")
def fit(
    model: Annotated[str, typer.Argument(help=CHECKPOINT_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Directory for the factors (rerun to resume a killed fit; reused when complete).")],
    strategy: Annotated[str, typer.Option(help="identity, diagonal, kfac or ekfac.")] = "ekfac",
    modules: Annotated[str, typer.Option(help="Linear layers: blocks (attention and MLP), mlp, attention or all (with the unembedding).")] = "blocks",
    fisher: Annotated[str, typer.Option(help="sampled (targets drawn from the model: the true Fisher) or empirical (the data's targets).")] = "sampled",
    rows: Annotated[int, typer.Option(help="Training rows the factors are fitted on: a seeded sample of those the checkpoint had seen.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward and backward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the row sample and of the sampled targets.")] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
) -> None:
    """Fit the curvature factors (covariances, eigenbases, corrected eigenvalues) of a checkpoint on rows it was trained on."""
    from lmscope.influence.factors import FactorSettings
    from lmscope.influence.job import fit_checkpoint, open_checkpoint

    settings = FactorSettings(strategy=strategy, modules=modules, fisher=fisher, batch_size=batch_size, seed=seed)
    checkpoint = open_checkpoint(model, device=device, dtype=dtype)
    with progress_bars(enabled=not json_output) as progress:
        factors = fit_checkpoint(checkpoint, out, settings, n_rows=rows, progress=progress)
    summary = {
        "factors": str(out),
        "model": model,
        "strategy": factors.settings.strategy,
        "layers": len(factors.layers),
        "rows": factors.n_sequences,
        "tokens": factors.n_tokens,
        "seconds": factors.source.get("seconds"),
    }
    if json_output:
        print_json(summary)
        return
    stdout.print(f"{summary['strategy']} factors of {len(factors.layers)} layers fitted on {summary['rows']} rows "
                 f"({summary['tokens']:,} tokens) in {summary['seconds']} s → {out}", highlight=False)


def _queries(prompt: list[str], completion: list[str]) -> list[Any]:
    from lmscope.influence.job import Query

    if not prompt or len(prompt) != len(completion):
        raise LmscopeError(f"give each query as one --prompt and one --completion (got {len(prompt)} prompts and {len(completion)} completions).")
    return [Query(p, c) for p, c in zip(prompt, completion)]


def _top_tokens(row: dict[str, Any], n: int = 4) -> str:
    pairs = sorted(zip(row["token_scores"], row["tokens"]), key=lambda pair: -abs(pair[0]))[:n]
    return " ".join(f"{_clean(text)!r}" for _, text in pairs)


@influence_app.command("score")
def score(
    model: Annotated[str, typer.Argument(help=CHECKPOINT_HELP)],
    prompt: Annotated[list[str], typer.Option("--prompt", help="A query's prompt (repeat with --completion for several queries).")],
    completion: Annotated[list[str], typer.Option("--completion", help="The completion whose log-probability is measured.")],
    factors: Annotated[Path | None, typer.Option("--factors", help="Factors of this checkpoint (from `lmscope influence fit`).")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Instead of --factors: score every row of a gradient store "
                                               "(from `lmscope influence store`), without recomputing training gradients.")] = None,
    store_strategy: Annotated[str, typer.Option("--store-strategy", help="With --store: identity (projected gradient dot products) or "
                                                "fisher (preconditioned by the projected Fisher).")] = "fisher",
    candidates: Annotated[str, typer.Option(help="filtered (BM25 top rows, plus rows sharing a span with the query when --index is given) or all.")] = "filtered",
    candidates_top: Annotated[int, typer.Option("--candidates-top", help="filtered: rows kept by BM25.")] = 256,
    limit: Annotated[int | None, typer.Option(help="all: score a seeded sample of this many rows.")] = None,
    index: Annotated[Path | None, typer.Option("--index", help="Suffix-array index of the suite's corpus (adds rows sharing a span with the query).")] = None,
    min_span: Annotated[int, typer.Option("--min-span", help="With --index: shortest shared span, in tokens.")] = 8,
    all_steps: Annotated[bool, typer.Option("--all-steps", help="Also score rows the checkpoint had not yet been trained on.")] = False,
    damping: Annotated[str | None, typer.Option(help="Damping: a number or 'heuristic' (0.1 × mean eigenvalue per layer); default 1e-8 "
                                                "(kronfluence's) with --factors, heuristic with --store.")] = None,
    rank: Annotated[int | None, typer.Option(help="Query batching: keep the top RANK singular directions of each preconditioned query gradient.")] = None,
    top: Annotated[int, typer.Option(help="Proponents and opponents shown per query.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward and backward pass.")] = 8,
    out: Annotated[Path | None, typer.Option("--out", help="Also write influence.json and scores.parquet (every candidate's score) here.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
) -> None:
    """Score training rows for each query: top proponents (raise log p(completion | prompt)) and opponents, with steps, documents and token highlights."""
    from lmscope.influence.factors import Factors
    from lmscope.influence.job import DEFAULT_DAMPING, ScoreSettings, open_checkpoint, score_queries, score_with_store, write_scores_parquet
    from lmscope.influence.precondition import parse_damping

    queries = _queries(prompt, completion)
    if (factors is None) == (store is None):
        raise LmscopeError("give exactly one of --factors DIR (fitted curvature) or --store DIR (a gradient store).")
    if store_strategy not in ("identity", "fisher"):
        raise LmscopeError(f"--store-strategy {store_strategy!r} is unknown; choose identity or fisher.")
    chosen_damping = parse_damping(damping) if damping is not None else (DEFAULT_DAMPING if factors is not None else "heuristic")
    settings = ScoreSettings(damping=chosen_damping, candidates=candidates, candidates_top=candidates_top, limit=limit,
                             seen_only=not all_steps, rank=rank, top=top, batch_size=batch_size, min_span=min_span)
    fitted = Factors.load(factors) if factors is not None else None
    checkpoint = open_checkpoint(model, device=device, dtype=dtype)
    if fitted is not None and fitted.source.get("model") not in (None, model):
        raise LmscopeError(f"the factors in {str(factors)!r} were fitted for {fitted.source['model']!r}, not {model!r}; fit them for this checkpoint.")
    opened_index = None
    if index is not None:
        from lmscope.cli.index import _open

        opened_index = _open(index, None, checkpoint.source)
    with progress_bars(enabled=not json_output) as progress:
        if fitted is not None:
            result = score_queries(checkpoint, fitted, queries, settings, index=opened_index, progress=progress)
        else:
            result = score_with_store(checkpoint, store, queries, strategy=store_strategy, damping=chosen_damping, top=top, batch_size=batch_size)
    if out is not None:
        from lmscope.fsio import atomic_write_json

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "influence.json", result)
        write_scores_parquet(result, out / "scores.parquet")
        result["written"] = [str(out / "influence.json"), str(out / "scores.parquet")]
    if json_output:
        print_json(result)
        return
    for q in result["queries"]:
        how = result["factors"]["strategy"] if "factors" in result else f"gradient store, {result['store']['strategy']}"
        stdout.print(f"[bold]{_clean(q['prompt'])!r} → {_clean(q['completion'])!r}[/]: log p = {q['completion_logprob']:.3f}; "
                     f"{q['candidates']['n']} {q['candidates']['method']} candidates of {q['candidates']['pool']} rows "
                     f"({how}, step{result['checkpoint_step']})", highlight=False)
        for title, rows in (("proponents", q["proponents"]), ("opponents", q["opponents"])):
            table = [{
                "rank": r,
                "score": row["score"],
                "step": row["step"],
                "seen": "yes" if row["seen"] else "no",
                "documents": "; ".join(f"{d['doc_id']} ({d['domain']})" for d in row["documents"] if d.get("doc_id")),
                "top tokens": _top_tokens(row),
            } for r, row in enumerate(rows, start=1)]
            print_table(table, title=title)
    if out is not None:
        stdout.print(f"written: {', '.join(result['written'])}", highlight=False)


@influence_app.command("store")
def store_command(
    model: Annotated[str, typer.Argument(help=CHECKPOINT_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Directory of the gradient store (rerun to resume a killed build).")],
    rows: Annotated[int | None, typer.Option(help="Rows stored: a seeded sample of those the checkpoint had seen (default: all of them).")] = None,
    dim_per_layer: Annotated[int, typer.Option("--dim-per-layer", help="Projected size per layer, a perfect square (k × k).")] = 256,
    modules: Annotated[str, typer.Option(help="Linear layers: blocks, mlp, attention or all.")] = "blocks",
    seed: Annotated[int, typer.Option(help="Seed of the projections and of the row sample.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward and backward pass.")] = 8,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
) -> None:
    """Project every training row's gradient (LoGra-style seeded projections) into an on-disk store, for fast repeated queries."""
    from lmscope.influence.job import build_checkpoint_store, open_checkpoint

    checkpoint = open_checkpoint(model, device=device, dtype=dtype)
    with progress_bars(enabled=not json_output) as progress:
        built = build_checkpoint_store(checkpoint, out, n_rows=rows, dim_per_layer=dim_per_layer, modules=modules, seed=seed,
                                       batch_size=batch_size, progress=progress)
    summary = {"store": str(out), "model": model, "rows": built.n_rows, "dim": built.dim, "dtype": built.dtype}
    if json_output:
        print_json(summary)
        return
    stdout.print(f"gradient store of {built.n_rows:,} rows × {built.dim:,} dimensions → {out}", highlight=False)


@influence_app.command("across")
def across(
    size_dir: Annotated[str, typer.Argument(help="One model of a mini suite: SUITE_DIR/SIZE.")],
    prompt: Annotated[list[str], typer.Option("--prompt", help="A query's prompt (repeat with --completion for several queries).")],
    completion: Annotated[list[str], typer.Option("--completion", help="The completion whose log-probability is measured.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (factors per checkpoint, scores; rerun to reuse).")],
    select: Annotated[str, typer.Option(help="Checkpoints: log:N, a list of steps, A..B.")] = "log:3",
    strategy: Annotated[str, typer.Option(help="identity, diagonal, kfac or ekfac.")] = "ekfac",
    fit_rows: Annotated[int, typer.Option("--fit-rows", help="Rows each checkpoint's factors are fitted on.")] = 256,
    candidates_top: Annotated[int, typer.Option("--candidates-top", help="Rows scored: the top rows by BM25 against the queries.")] = 256,
    damping: Annotated[str, typer.Option(help="A number or 'heuristic'.")] = "1e-8",
    top: Annotated[int, typer.Option(help="Rows shown per query.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward and backward pass.")] = 8,
    device: DeviceOption = "auto",
    json_output: JsonOption = False,
) -> None:
    """Score the same rows at several checkpoints (each with its own factors) and rank them by influence summed over training."""
    from lmscope.influence.across import influence_across_training
    from lmscope.influence.factors import FactorSettings
    from lmscope.influence.job import ScoreSettings
    from lmscope.suites.catalog import resolve_suite
    from lmscope.suites.selectors import select_checkpoints

    queries = _queries(prompt, completion)
    suite, _ = resolve_suite(size_dir)
    steps = [c.step for c in select_checkpoints(suite.checkpoints(), select, "--select")]
    with progress_bars(enabled=not json_output) as progress:
        result = influence_across_training(size_dir, steps, queries, out, fit=FactorSettings(strategy=strategy, batch_size=batch_size),
                                           score=ScoreSettings(damping=damping, candidates_top=candidates_top, top=top, batch_size=batch_size),
                                           fit_rows=fit_rows, device=device, progress=progress)
    if json_output:
        print_json(result)
        return
    for q in result["queries"]:
        logprobs = ", ".join(f"{k} {v:.2f}" for k, v in q["completion_logprob"].items())
        stdout.print(f"[bold]{_clean(q['prompt'])!r} → {_clean(q['completion'])!r}[/]: log p {logprobs}", highlight=False)
        print_table([{"rank": r, "summed": row["total"], **{k: v for k, v in row["scores"].items()}, "trained at step": row["step"],
                      "seen by": ", ".join(row["seen_by"]) or "none",
                      "documents": "; ".join(f"{d['doc_id']} ({d['domain']})" for d in row["documents"])}
                     for r, row in enumerate(q["top"], start=1)], title="rows by influence summed over checkpoints")
    stdout.print(f"written: {out / 'across.json'}, {out / 'scores.parquet'}", highlight=False)


@influence_app.command("lds")
def lds(
    suite_dir: Annotated[Path, typer.Argument(help="A mini suite directory (from `lmscope suite train`).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (rerun to resume: finished retrainings are kept).")],
    size: Annotated[str | None, typer.Option(help="Model size to retrain (default: the suite's smallest).")] = None,
    steps: Annotated[int, typer.Option(help="Updates of the shortened run (the first N of the suite's data order and schedule).")] = 64,
    subsets: Annotated[int, typer.Option(help="Random subsets retrained (M).")] = 16,
    fraction: Annotated[float, typer.Option(help="Share of the run's rows each subset keeps.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the subsets.")] = 0,
    methods: Annotated[str, typer.Option(help="Comma-separated: identity, diagonal, kfac, ekfac.")] = "identity,diagonal,kfac,ekfac",
    damping: Annotated[str, typer.Option(help="A number or 'heuristic'.")] = "1e-8",
    modules: Annotated[str, typer.Option(help="Linear layers: blocks, mlp, attention or all.")] = "blocks",
    fisher: Annotated[str, typer.Option(help="sampled or empirical.")] = "sampled",
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A query's prompt (with --completion); default: held-out documents.")] = None,
    completion: Annotated[list[str] | None, typer.Option("--completion", help="The completion whose loss is measured.")] = None,
    heldout_queries: Annotated[int, typer.Option("--heldout-queries", help="Without --prompt: queries cut from this many held-out documents.")] = 4,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Held-out queries: prompt length in tokens.")] = 32,
    completion_tokens: Annotated[int, typer.Option("--completion-tokens", help="Held-out queries: completion length in tokens.")] = 16,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per pass when fitting and scoring.")] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    json_output: JsonOption = False,
) -> None:
    """Linear datamodeling score: retrain on random half subsets of a shortened run, and rank-correlate each method's predicted
    change of the completion's log-probability with the actual one (Spearman, per query)."""
    from lmscope.influence.lds import LdsSettings, heldout_queries as cut_heldout, plot_lds, run_lds

    settings = LdsSettings(size=size, n_steps=steps, n_subsets=subsets, fraction=fraction, seed=seed,
                           methods=tuple(m.strip() for m in methods.split(",") if m.strip()), damping=damping, modules=modules,
                           fisher=fisher, batch_size=batch_size, device=device)
    if prompt or completion:
        queries: list[Any] = _queries(prompt or [], completion or [])
    else:
        queries = cut_heldout(suite_dir, heldout_queries, prompt_tokens, completion_tokens)
    with progress_bars(enabled=not json_output) as progress:
        result = run_lds(suite_dir, queries, settings, out, progress=progress)
    if json_output:
        print_json(result)
        return
    print_table([{"method": name, "mean LDS": entry["mean_lds"], "queries": entry["n_finite"],
                  "per query": ", ".join(f"{v:.2f}" for v in entry["per_query"])} for name, entry in result["methods"].items()],
                title=f"LDS over {subsets} retrained subsets ({steps} steps of {result['size']})")
    stdout.print(f"written: {out / 'lds.json'}, {out / 'lds.parquet'}, {out / 'lds.png'}", highlight=False)
