"""The one results schema: a long table every metric of every suite is written in.

Columns (required, in this order)::

    suite, model, size, seed, revision, step, tokens_seen, metric, domain, value

plus any number of extra columns a metric needs (e.g. ``layer``, ``head``). One row is
one number: ``value`` of ``metric`` on ``domain`` for ``model`` at ``revision``. Unknown
values are nulls, never sentinels, so that SQL aggregates stay honest.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path

SCHEMA = pa.schema(
    [
        ("suite", pa.string()),
        ("model", pa.string()),
        ("size", pa.string()),
        ("seed", pa.int64()),
        ("revision", pa.string()),
        ("step", pa.int64()),
        ("tokens_seen", pa.int64()),
        ("metric", pa.string()),
        ("domain", pa.string()),
        ("value", pa.float64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
REQUIRED_NON_NULL = ("model", "metric", "value")


def results_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts) as a table in the results schema; extra keys become extra columns after the required ones.

    A row missing a required column gets a null there; ``model``, ``metric`` and ``value``
    must be present and non-null.
    """
    rows = list(rows)
    extras: list[str] = []
    for row in rows:
        extras += [key for key in row if key not in COLUMNS and key not in extras]
    for index, row in enumerate(rows):
        for column in REQUIRED_NON_NULL:
            if row.get(column) is None:
                raise LmscopeError(f"result row {index} has no {column!r}; every row needs model, metric and value.")
    columns: dict[str, pa.Array] = {}
    for field in SCHEMA:
        values = [row.get(field.name) for row in rows]
        try:
            columns[field.name] = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
            raise LmscopeError(f"result column {field.name!r} has a value of the wrong type ({err}); it must be {field.type}.") from None
    for name in extras:
        columns[name] = pa.array([row.get(name) for row in rows])
    return pa.table(columns)


def write_results(rows: Iterable[Mapping[str, Any]] | pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write results atomically as Parquet at ``path``; returns the path."""
    table = rows if isinstance(rows, pa.Table) else results_table(rows)
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise LmscopeError(f"results table lacks column(s) {', '.join(missing)}; build it with results_table().")
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
