"""``lmscope eval``: metrics across checkpoints × sizes × seeds, cached and resumable, in the results schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli import app
from lmscope.cli.options import DeviceOption, DtypeOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout


@app.command("eval")
def evaluate(
    target: Annotated[str, typer.Argument(help="A suite directory (or one size of it), a catalogued model, or any model spec.")],
    select: Annotated[str | None, typer.Option("--select", "-s", help="Checkpoint selector: all, log:N, every:K, lists, ranges.")] = None,
    metrics: Annotated[str, typer.Option(help="Comma-separated metrics: bpb, memorization, icl, induction, lens (logit lens), "
                                               "tuned_lens.")] = "bpb",
    corpus: Annotated[Path | None, typer.Option(help="Tokenized corpus (default: the suite's own corpus/).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default runs/eval-<target name>).")] = None,
    ctx: Annotated[int | None, typer.Option(help="Bits-per-byte window length (default: the model's context).")] = None,
    stride: Annotated[int | None, typer.Option(help="Sliding-window stride (default ctx // 2).")] = None,
    documents_per_domain: Annotated[int | None, typer.Option("--documents-per-domain",
                                                             help="Bits per byte: held-out documents scored per domain.")] = 16,
    max_documents: Annotated[int | None, typer.Option("--max-documents", help="Bits per byte: at most this many documents in all.")] = None,
    memorization_sequences: Annotated[int, typer.Option("--memorization-sequences",
                                                        help="Memorization: training sequences sampled across the data order.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 8,
    plot: Annotated[bool, typer.Option(help="Also write the figures the results support (PNG, next to the results).")] = True,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    json_output: JsonOption = False,
) -> None:
    """Evaluate checkpoints; rerun to compute only what is missing (a killed sweep resumes)."""
    import pyarrow.parquet as pq

    from lmscope.errors import LmscopeError
    from lmscope.evals.sweep import run_sweep

    target_path = Path(target).expanduser()
    if corpus is None:
        for candidate in (target_path / "corpus", target_path.parent / "corpus"):
            if (candidate / "manifest.json").is_file():
                corpus = candidate
                break
        else:
            raise LmscopeError(f"{target!r} has no corpus/ of its own; pass --corpus with a corpus tokenized for this model.")
    out = out or Path("runs") / f"eval-{target_path.name or 'model'}"
    with progress_bars(enabled=not json_output) as progress:
        path = run_sweep(target, corpus, out, select=select, metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
                         bpb_ctx=ctx, bpb_stride=stride, documents_per_domain=documents_per_domain,
                         max_documents=max_documents, memorization_sequences=memorization_sequences, batch_size=batch_size,
                         device=device, dtype=dtype, progress=progress)
    table = pq.read_table(path)
    plots = []
    if plot and any(v is not None for v in table.column("tokens_seen").to_pylist()):
        from lmscope.report.figures import sweep_figures

        plots = [str(figure.png) for figure in sweep_figures(table, out)]
    if json_output:
        print_json({"results": str(path), "plots": plots, "rows": table.to_pylist()})
        return
    rows = [r for r in table.to_pylist() if r["domain"] == "all" and r.get("layer") is None and r.get("head") is None]
    print_table([{"model": r["model"], "revision": r["revision"], "tokens_seen": r["tokens_seen"], "metric": r["metric"],
                  "value": r["value"]} for r in rows], title="all domains (per-domain, per-layer, per-head and per-sequence rows "
                                                             "are in the results file)")
    stdout.print(f"results: {path}" + "".join(f"\nplot: {p}" for p in plots), highlight=False)
