"""SQL over results with DuckDB: every results Parquet file is one view named ``results``."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from lmscope.errors import LmscopeError

DEFAULT_PATTERN = "runs/*/results/*.parquet"


def result_files(paths: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """Parquet files named by ``paths`` (files, directories searched recursively, or glob patterns); default: every run's results."""
    patterns = [str(p) for p in paths] or [DEFAULT_PATTERN]
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            files += sorted(str(p) for p in Path(pattern).rglob("*.parquet") if not p.name.startswith("."))
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            files += sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise LmscopeError(
            f"no results Parquet files match {', '.join(patterns)}; run `lmscope study` first or pass --path with a run directory."
        )
    return list(dict.fromkeys(files))


def query_results(sql: str, paths: Sequence[str | os.PathLike[str]] = ()) -> pa.Table:
    """Run ``sql`` with the results of ``paths`` exposed as the view ``results`` (files unioned by column name)."""
    import duckdb

    files = result_files(paths)
    connection = duckdb.connect()
    try:
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        connection.execute(f"CREATE VIEW results AS SELECT * FROM read_parquet([{listing}], union_by_name = true)")
        relation = connection.sql(sql)
        if relation is None:  # a statement with no result set
            return pa.table({})
        # DuckDB 2 names it to_arrow_table; DuckDB 1 calls it arrow.
        return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LmscopeError(f"the query failed: {first}; the view is named results (columns: see `lmscope results schema`).") from None
    finally:
        connection.close()
