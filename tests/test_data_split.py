"""The held-out split: a pure, documented function of the document id."""

from __future__ import annotations

import hashlib
import random

import pytest

from lmscope.data.split import assign_split, check_fraction, is_heldout, split_score
from lmscope.errors import LmscopeError


def test_score_follows_the_documented_formula():
    for doc_id in ["doc-1", "python-docs/library/os.rst.txt", "東京", ""]:
        digest = hashlib.sha256(b"lmscope-heldout-v1\x00" + doc_id.encode()).digest()
        assert split_score(doc_id) == int.from_bytes(digest[:8], "big") / 2**64
        assert 0.0 <= split_score(doc_id) < 1.0


def test_split_is_deterministic_and_order_free():
    ids = [f"doc-{i}" for i in range(2000)]
    first = [assign_split(i, 0.1) for i in ids]
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    by_id = {i: assign_split(i, 0.1) for i in shuffled}
    assert first == [by_id[i] for i in ids]


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_fraction_is_roughly_right_in_every_domain(fraction):
    n = 4000
    for domain in ["python-docs", "manpages", "web"]:
        held = sum(is_heldout(f"{domain}/{i}", fraction) for i in range(n))
        sigma = (n * fraction * (1 - fraction)) ** 0.5
        assert abs(held - n * fraction) < 5 * sigma, (domain, held)


def test_raising_the_fraction_only_moves_documents_to_heldout():
    ids = [f"x{i}" for i in range(1000)]
    small = {i for i in ids if is_heldout(i, 0.05)}
    large = {i for i in ids if is_heldout(i, 0.10)}
    assert small <= large
    assert not any(is_heldout(i, 0.0) for i in ids) and all(is_heldout(i, 1.0) for i in ids)


def test_fraction_is_validated():
    assert check_fraction(0.05) == 0.05
    with pytest.raises(LmscopeError, match="outside \\[0, 1\\]"):
        check_fraction(1.5)
