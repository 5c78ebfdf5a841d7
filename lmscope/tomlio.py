"""Writing the small TOML subset that lmscope configs use (``tomllib`` reads; the standard library has no writer)."""

from __future__ import annotations

import json
from typing import Any


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, int, float, str, list or string-keyed dict (an inline table) of those.

    JSON string escapes are valid TOML; keys are written quoted.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML literal for {type(value).__name__}")
