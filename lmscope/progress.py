"""Progress reporting without printing.

Library code never prints. Long-running functions accept ``progress: Progress``
and call it as ``progress(task, advance, total)``; the CLI renders those calls as
rich progress bars, tests pass nothing.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
        """Report that ``advance`` more units of ``task`` (out of ``total``, if known) are done.

        ``fields`` carries live figures to show beside the bar (e.g. ``loss=2.31``).
        """


def no_progress(task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
    """A :class:`Progress` that ignores every report."""
