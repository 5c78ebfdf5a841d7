"""``lmscope suites``: list the known suites and a suite's checkpoints (revision, step, tokens seen)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli import app
from lmscope.cli.render import print_json, print_table
from lmscope.errors import LmscopeError
from lmscope.suites import catalog
from lmscope.suites.selectors import SELECTOR_FORMS

suites_app = typer.Typer(
    help="Suite catalogs: models, and checkpoints as (revision, step, tokens seen).",
    no_args_is_help=True,
)
app.add_typer(suites_app, name="suites")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]


@suites_app.command("list")
def list_suites(json_output: JsonOption = False) -> None:
    """List the built-in suites (local suite directories are named by path)."""
    suites = catalog.list_suites()
    if json_output:
        print_json([suite.to_dict() for suite in suites])
        return
    print_table(
        [
            {
                "suite": suite.name,
                "family": suite.family,
                "sizes": ", ".join(model.size for model in suite.models),
                "checkpoints": len(suite.revisions) if suite.revisions else "parsed from names",
                "tokens/step": suite.tokens_per_step if suite.tokens_per_step else "-",
            }
            for suite in suites
        ],
        title="suites",
    )


@suites_app.command("checkpoints")
def checkpoints(
    name: Annotated[str, typer.Argument(help="Suite name (pythia, olmo-2, amber…), model id, or local suite directory.")],
    select: Annotated[str | None, typer.Option("--select", "-s", help=f"Checkpoint selector: {SELECTOR_FORMS}.")] = None,
    revisions_file: Annotated[
        Path | None,
        typer.Option("--revisions-file", help="Text file of revision names, one per line (needed for OLMo)."),
    ] = None,
    from_hub: Annotated[
        bool, typer.Option("--from-hub", help="List the model's revisions from the Hugging Face hub (needs network).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """List the checkpoints of a suite, a model of one, or a local suite directory."""
    if revisions_file is not None and from_hub:
        raise LmscopeError("--revisions-file and --from-hub both give the revision list; use one of them.")
    revisions = None
    if revisions_file is not None:
        revisions = catalog.read_revisions_file(revisions_file)
    elif from_hub:
        if name.count("/") != 1 or Path(name).expanduser().is_dir():
            raise LmscopeError(f"--from-hub needs a hub model id such as allenai/OLMo-2-1124-7B, not {name!r}.")
        revisions = catalog.hub_revisions(name)
    rows = [checkpoint.to_dict() for checkpoint in catalog.suite_checkpoints(name, select=select, revisions=revisions)]
    if json_output:
        print_json(rows)
    else:
        print_table(rows, title=f"{name} — {len(rows)} checkpoints")


@suites_app.command("audit")
def audit(
    spec: Annotated[str, typer.Argument(help="A catalogued model (EleutherAI/pythia-70m; reads the HF cache only) or SUITE_DIR/SIZE.")],
    select: Annotated[str | None, typer.Option("--select", "-s", help=f"Checkpoint selector: {SELECTOR_FORMS}.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Hash each checkpoint's weights; report missing, byte-identical and non-finite checkpoints."""
    from lmscope.cli.render import progress_bars, stdout
    from lmscope.suites.audit import audit_checkpoints, audit_summary

    with progress_bars(enabled=not json_output) as progress:
        rows = audit_checkpoints(spec, select, progress=progress)
    summary = audit_summary(rows)
    if json_output:
        print_json({"spec": spec, "summary": summary, "checkpoints": [row.to_dict() for row in rows]})
        return
    print_table(
        [
            {"revision": r.revision, "step": r.step, "status": r.status, "sha256": (r.weights_sha256 or "-")[:12],
             "nonfinite": r.nonfinite, "same as": r.duplicate_of or ""}
            for r in rows
        ],
        title=f"audit of {spec}",
    )
    stdout.print(
        f"{summary['present']}/{summary['checkpoints']} present, {summary['distinct_weights']} distinct weights; "
        f"missing: {', '.join(summary['missing']) or 'none'}; "
        f"duplicate groups: {len(summary['duplicate_groups'])} ({summary['equal_to_final']} revisions equal the final weights); "
        f"non-finite: {', '.join(summary['nonfinite']) or 'none'}",
        highlight=False,
    )
