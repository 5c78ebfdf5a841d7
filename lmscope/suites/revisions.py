"""Revision names of checkpoints: step numbers, nearest matches, local checkpoint directories.

Kept free of heavy imports, so that catalogs and the CLI's listing commands start fast.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path


_STEP = re.compile(r"step(\d+)")


def _step_of(revision: str) -> int | None:
    match = _STEP.search(revision)
    return int(match.group(1)) if match else None


def nearest_revisions(wanted: str, available: list[str], n: int = 3) -> list[str]:
    """The ``n`` available revisions closest to ``wanted``: by step number when both have one, else by spelling."""
    step = _step_of(wanted)
    with_steps = [(rev, _step_of(rev)) for rev in available]
    if step is not None and any(s is not None for _, s in with_steps):
        ranked = sorted((abs(s - step), s, rev) for rev, s in with_steps if s is not None)
        return [rev for _, _, rev in ranked[:n]]
    return difflib.get_close_matches(wanted, available, n=n, cutoff=0.0)


def local_revisions(directory: Path) -> list[str]:
    """Checkpoint names of a local suite directory: HF model directories directly inside it or in ``checkpoints/``."""
    found: list[str] = []
    for parent in (directory, directory / "checkpoints"):
        if parent.is_dir():
            found += [child.name for child in parent.iterdir() if (child / "config.json").is_file()]
    return sorted(set(found), key=lambda rev: (_step_of(rev) is None, _step_of(rev) or 0, rev))
