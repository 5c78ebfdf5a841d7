"""Rendering for the CLI: rich progress bars for library progress reports, JSON and tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lmscope.progress import Progress as ProgressCallback

stdout = Console()
stderr = Console(stderr=True)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressCallback]:
    """Yield a :class:`lmscope.progress.Progress` callback drawn as rich bars on stderr.

    Bars are hidden when ``enabled`` is false (``--json`` output) or stderr is not a terminal.
    """
    show = enabled and sys.stderr.isatty()
    bars = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[live]}"),
        console=stderr,
        disable=not show,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def report(task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
        live = "  ".join(f"{key}={_short(value)}" for key, value in fields.items())
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total, live=live)
        bars.update(tasks[task], advance=advance, live=live, **({"total": total} if total is not None else {}))

    with bars:
        yield report


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (for ``--json``)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> None:
    """Print a list of same-keyed dicts as a table."""
    if not rows:
        stdout.print("(none)")
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(str(key))
    for row in rows:
        table.add_row(*(escape(_short(value)) for value in row.values()))
    stdout.print(table)
