"""``lmscope results``: the results schema, and SQL over results with DuckDB."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli import app
from lmscope.cli.options import JsonOption
from lmscope.cli.render import print_json, print_table

results_app = typer.Typer(help="Results: one long table (Parquet) and SQL over it.", no_args_is_help=True)
app.add_typer(results_app, name="results")


@results_app.command("query")
def query(
    sql: Annotated[str, typer.Argument(help='SQL over the view "results", e.g. "SELECT model, avg(value) FROM results GROUP BY model".')],
    path: Annotated[
        list[Path] | None,
        typer.Option("--path", "-p", help="Results files, run directories or globs; default: runs/*/results/*.parquet."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Run SQL over results with DuckDB; the table is the view named results."""
    from lmscope.results.query import query_results

    rows = query_results(sql, path or []).to_pylist()
    if json_output:
        print_json(rows)
    else:
        print_table(rows)


@results_app.command("schema")
def schema(json_output: JsonOption = False) -> None:
    """The required columns of the results schema and their types."""
    from lmscope.results.schema import SCHEMA

    rows = [{"column": field.name, "type": str(field.type)} for field in SCHEMA]
    if json_output:
        print_json(rows)
    else:
        print_table(rows, title="results schema (extra columns allowed)")
