"""The held-out split: a pure function of the document id, shared by every stage.

A document is held out when ``u(id) < fraction``, where ``u(id)`` is the first 8
bytes of ``sha256(SALT + id)`` read as a big-endian integer and divided by 2**64,
so uniform in [0, 1). Because ``u`` depends on nothing but the id, the split is
the same on every machine, in every order of reading, and for every tokenizer;
within each domain a fraction ``≈ fraction`` of documents is held out, and
raising ``fraction`` only moves documents from train to held-out.

Bump :data:`SPLIT_VERSION` (and the salt) if this rule ever changes.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "heldout"]

SPLITS: tuple[Split, Split] = ("train", "heldout")
SPLIT_VERSION = 1
SPLIT_METHOD = "sha256(salt + id)[:8] / 2**64 < heldout_fraction"
_SALT = b"lmscope-heldout-v1\x00"


def split_score(doc_id: str) -> float:
    """The document's position in [0, 1): ``int(sha256(salt + id)[:8]) / 2**64``."""
    digest = hashlib.sha256(_SALT + doc_id.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Whether the document with this id is held out when a ``fraction`` of each domain is."""
    return split_score(doc_id) < fraction


def assign_split(doc_id: str, fraction: float) -> Split:
    """``"heldout"`` or ``"train"`` for a document id (see the module docstring for the rule)."""
    return "heldout" if split_score(doc_id) < fraction else "train"


def check_fraction(fraction: float) -> float:
    """Validate a held-out fraction (0 ≤ fraction ≤ 1)."""
    from lmscope.errors import LmscopeError

    if not 0.0 <= float(fraction) <= 1.0:
        raise LmscopeError(f"held-out fraction {fraction!r} is outside [0, 1]; give e.g. 0.05 for 5 % of each domain.")
    return float(fraction)
