"""Where lmscope keeps its caches: ``$LMSCOPE_HOME`` (default ``~/.cache/lmscope``)."""

from __future__ import annotations

import os
from pathlib import Path


def lmscope_home() -> Path:
    """The cache root, created on first use."""
    root = Path(os.environ.get("LMSCOPE_HOME", Path.home() / ".cache" / "lmscope")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
