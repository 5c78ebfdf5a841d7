"""The results schema and DuckDB queries, checked against plain-Python computations on the same rows."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lmscope.errors import LmscopeError
from lmscope.results.query import query_results
from lmscope.results.schema import COLUMNS, results_table, write_results


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"suite": "pythia", "model": f"EleutherAI/pythia-{size}", "size": size, "seed": 0, "revision": f"step{step}",
         "step": step, "tokens_seen": step * 2_097_152, "metric": metric, "domain": domain, "value": rng.random()}
        for size in ("70m", "160m") for step in (0, 1000, 2000) for metric in ("bpb", "icl") for domain in ("web", "code")
    ][:n]


def test_written_results_have_the_schema_and_extras(tmp_path: Path) -> None:
    rows = _rows(24, 0)
    rows[0]["layer"] = 3  # an extra column on one row only
    path = write_results(rows, tmp_path / "r.parquet")
    table = pq.read_table(path)
    assert tuple(table.column_names[: len(COLUMNS)]) == COLUMNS and table.column_names[-1] == "layer"
    assert table.column("layer").to_pylist()[:2] == [3, None]
    assert table.column("value").to_pylist() == [row["value"] for row in rows]


def test_query_matches_a_brute_force_aggregate_across_files(tmp_path: Path) -> None:
    first, second = _rows(24, 1), _rows(24, 2)
    write_results(first, tmp_path / "run-a" / "results" / "a.parquet")
    write_results([{**row, "head": 1} for row in second], tmp_path / "run-b" / "results" / "b.parquet")
    table = query_results(
        "SELECT model, metric, avg(value) AS mean, count(*) AS n FROM results GROUP BY model, metric ORDER BY model, metric",
        [tmp_path],
    )
    expected: dict[tuple[str, str], list[float]] = {}
    for row in first + second:
        expected.setdefault((row["model"], row["metric"]), []).append(row["value"])
    got = {(r["model"], r["metric"]): (r["mean"], r["n"]) for r in table.to_pylist()}
    assert got.keys() == expected.keys()
    for key, values in expected.items():
        assert got[key][1] == len(values) and got[key][0] == pytest.approx(sum(values) / len(values), rel=1e-12)
    heads = query_results("SELECT count(*) AS n FROM results WHERE head = 1", [tmp_path]).to_pylist()
    assert heads == [{"n": len(second)}]


def test_bad_rows_and_queries_are_named(tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="result row 0 has no 'metric'"):
        results_table([{"model": "m", "value": 1.0}])
    with pytest.raises(LmscopeError, match="column 'step' has a value of the wrong type"):
        results_table([{"model": "m", "metric": "x", "value": 1.0, "step": "late"}])
    write_results(_rows(4, 3), tmp_path / "r.parquet")
    with pytest.raises(LmscopeError, match='the query failed: .*"nope"'):
        query_results("SELECT nope FROM results", [tmp_path])
    with pytest.raises(LmscopeError, match="no results Parquet files match"):
        query_results("SELECT 1", [tmp_path / "empty-*"])


def test_results_query_cli_json(tmp_path: Path) -> None:
    write_results(_rows(24, 4), tmp_path / "results" / "r.parquet")
    sql = "SELECT size, max(step) AS last FROM results GROUP BY size ORDER BY size"
    result = subprocess.run([sys.executable, "-m", "lmscope.cli", "results", "query", sql, "--path", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"size": "160m", "last": 2000}, {"size": "70m", "last": 2000}]
    bad = subprocess.run([sys.executable, "-m", "lmscope.cli", "results", "query", "SELEC", "--path", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "the query failed" in bad.stderr and "Traceback" not in bad.stderr
