"""``lmscope study``: the main job, from a TOML config (or the default study) into a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from lmscope.cli import app
from lmscope.cli.options import JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout


@app.command("study")
def study(
    config: Path = typer.Argument(None, help="Study TOML file; leave out for the default study."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories go."),
    name: str = typer.Option(None, help="Override the study name (the run directory's name)."),
    model: str = typer.Option(None, help="Override the model spec."),
    device: str = typer.Option(None, help="Override the device: auto, cpu, cuda, cuda:N."),
    as_json: JsonOption = False,
) -> None:
    """Run a study: corpus, model, activations, suite, evaluation sweep, report.html; rerun to resume a killed one."""
    from lmscope.study import load_study_config, run_study

    cfg = load_study_config(config)
    for field_name, value in (("name", name), ("model", model), ("device", device)):
        if value is not None:
            setattr(cfg, field_name, value)
    cfg.__post_init__()
    with progress_bars(enabled=not as_json) as progress:
        summary = run_study(cfg, runs_dir, progress=progress)
    if as_json:
        print_json(summary)
        return
    corpus = summary["corpus"]
    stdout.print(
        f"[bold]study {summary['study']}[/]: model {summary['model']} ({summary['model_type']}, {summary['n_layers']} layers) "
        f"on {summary['device']}; corpus {corpus['documents']:,} documents, {corpus['tokens']:,} tokens, "
        f"domains {', '.join(corpus['domains'])}",
        highlight=False,
    )
    print_table(summary["activations"], title="activations captured")
    by_domain = ", ".join(f"{domain} {rows:,}" for domain, rows in summary["activation_rows_by_domain"].items())
    stdout.print(f"captured token positions by domain: {by_domain}", highlight=False)
    suite = summary.get("suite")
    if suite:
        print_table(suite["models"], title=f"mini suite: {suite['steps']} steps × {suite['tokens_per_step']:,} tokens, "
                    f"{suite['checkpoints']} checkpoints (unigram baseline {suite['unigram_bits_per_byte']:.3f} bits/byte)")
        stdout.print(f"step 0 trained on {suite['step0_rows']} rows from {suite['step0_documents']} documents, tokens by domain: "
                     f"{', '.join(f'{d} {n:,}' for d, n in suite['step0_domains'].items())}; suite at {suite['path']}",
                     highlight=False)
    evaluation = summary.get("evaluation")
    if evaluation:
        stdout.print(f"evaluated {', '.join(evaluation['models'])} at steps {', '.join(map(str, evaluation['steps']))} on "
                     f"{', '.join(evaluation['metrics'])}: {evaluation['rows']:,} result rows in "
                     f"{runs_dir / summary['study'] / evaluation['results']}", highlight=False)
    sae = summary.get("sae")
    if sae:
        rec, spl = sae["reconstruction"], sae["spliced"]
        recovered = spl.get("ce_recovered_zero")
        stdout.print(f"SAE on {sae['model']} {sae['config']['hook']}: FVU {rec['fvu']:.3f}, L0 {rec['l0']:.1f}, "
                     f"{rec['dead_features']} dead; loss recovered "
                     + (f"{recovered:.1%}" if recovered is not None else "n/a") + f"; saved at {sae['sae']}", highlight=False)
    timings = "  ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in summary["timings"].items())
    stdout.print(f"timings: {timings}\nrun directory: {runs_dir / summary['study']}", highlight=False)
    stdout.print(f"[bold]report: {summary['report']}[/]", highlight=False)


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., help="A study's run directory (runs/<name>)."),
    as_json: JsonOption = False,
) -> None:
    """Redraw a study's report.html and figures from its summary and results, without recomputing anything."""
    from lmscope.errors import LmscopeError
    from lmscope.report.build import build_report

    if not (run_dir / "summary.json").is_file():
        raise LmscopeError(f"{str(run_dir)!r} is not a finished study run (no summary.json); run `lmscope study` first.")
    path = build_report(run_dir)
    if as_json:
        print_json({"report": str(path), "figures": sorted(str(p) for p in (run_dir / "figures").glob("*.png"))})
        return
    stdout.print(f"report: {path}", highlight=False)
