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
    factors: Annotated[Path, typer.Option("--factors", help="Factors of this checkpoint (from `lmscope influence fit`).")],
    prompt: Annotated[list[str], typer.Option("--prompt", help="A query's prompt (repeat with --completion for several queries).")],
    completion: Annotated[list[str], typer.Option("--completion", help="The completion whose log-probability is measured.")],
    candidates: Annotated[str, typer.Option(help="filtered (BM25 top rows, plus rows sharing a span with the query when --index is given) or all.")] = "filtered",
    candidates_top: Annotated[int, typer.Option("--candidates-top", help="filtered: rows kept by BM25.")] = 256,
    limit: Annotated[int | None, typer.Option(help="all: score a seeded sample of this many rows.")] = None,
    index: Annotated[Path | None, typer.Option("--index", help="Suffix-array index of the suite's corpus (adds rows sharing a span with the query).")] = None,
    min_span: Annotated[int, typer.Option("--min-span", help="With --index: shortest shared span, in tokens.")] = 8,
    all_steps: Annotated[bool, typer.Option("--all-steps", help="Also score rows the checkpoint had not yet been trained on.")] = False,
    damping: Annotated[str, typer.Option(help="Damping: a number (default 1e-8, kronfluence's) or 'heuristic' (0.1 × mean eigenvalue per layer).")] = "1e-8",
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
    from lmscope.influence.job import ScoreSettings, open_checkpoint, score_queries, write_scores_parquet

    queries = _queries(prompt, completion)
    settings = ScoreSettings(damping=damping, candidates=candidates, candidates_top=candidates_top, limit=limit, seen_only=not all_steps,
                             rank=rank, top=top, batch_size=batch_size, min_span=min_span)
    fitted = Factors.load(factors)
    checkpoint = open_checkpoint(model, device=device, dtype=dtype)
    if fitted.source.get("model") not in (None, model):
        raise LmscopeError(f"the factors in {str(factors)!r} were fitted for {fitted.source['model']!r}, not {model!r}; fit them for this checkpoint.")
    opened_index = None
    if index is not None:
        from lmscope.cli.index import _open

        opened_index = _open(index, None, checkpoint.source)
    with progress_bars(enabled=not json_output) as progress:
        result = score_queries(checkpoint, fitted, queries, settings, index=opened_index, progress=progress)
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
        stdout.print(f"[bold]{_clean(q['prompt'])!r} → {_clean(q['completion'])!r}[/]: log p = {q['completion_logprob']:.3f}; "
                     f"{q['candidates']['n']} {q['candidates']['method']} candidates of {q['candidates']['pool']} rows "
                     f"({result['factors']['strategy']}, step{result['checkpoint_step']})", highlight=False)
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
