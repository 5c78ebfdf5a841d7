"""Contexts: documents cut into fixed-length windows by the documented policy."""

from __future__ import annotations

import numpy as np
import pytest

from lmscope.activations.contexts import iter_contexts
from lmscope.errors import LmscopeError

BOS, PAD = 1, 0


def _documents(lengths: list[int], seed: int = 0) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(index, rng.integers(3, 100, size=n).astype(np.uint16)) for index, n in enumerate(lengths)]


def test_windows_bos_positions_and_padding() -> None:
    docs = _documents([10, 3])
    contexts = list(iter_contexts(docs, ctx_len=5, n_tokens=1000, bos_token_id=BOS, pad_token_id=PAD))
    # document 0: windows of 4 tokens at 0, 4, 8 (the last one 2 tokens, padded); document 1: one window of 3
    assert [c.n_valid for c in contexts] == [5, 5, 3, 4]
    first, tail, short = contexts[0], contexts[2], contexts[3]
    assert first.tokens.tolist() == [BOS, *docs[0][1][:4].tolist()]
    assert first.doc_index.tolist() == [0] * 5 and first.position.tolist() == [-1, 0, 1, 2, 3]
    assert tail.tokens.tolist() == [BOS, *docs[0][1][8:].tolist(), PAD, PAD]
    assert tail.doc_index.tolist() == [0, 0, 0, -1, -1] and tail.position.tolist() == [-1, 8, 9, -1, -1]
    assert short.doc_index.tolist() == [1, 1, 1, 1, -1] and short.position.tolist() == [-1, 0, 1, 2, -1]
    assert all(c.tokens.dtype == np.int64 and c.position.dtype == np.int32 and len(c) == 5 for c in contexts)


def test_every_document_token_appears_once_at_its_position() -> None:
    docs = _documents([1, 7, 16, 33, 2, 50])
    seen: dict[int, dict[int, int]] = {}
    for context in iter_contexts(docs, ctx_len=8, n_tokens=10_000, bos_token_id=None):
        for token, doc, position in zip(context.tokens[: context.n_valid], context.doc_index, context.position):
            assert position not in seen.setdefault(int(doc), {})
            seen[int(doc)][int(position)] = int(token)
    for index, tokens in docs:
        assert [seen[index][p] for p in range(len(tokens))] == tokens.tolist()


def test_budget_counts_valid_positions_and_truncates_the_last_context() -> None:
    docs = _documents([40, 40])
    contexts = list(iter_contexts(docs, ctx_len=8, n_tokens=19, bos_token_id=BOS))
    assert sum(c.n_valid for c in contexts) == 19
    assert [c.n_valid for c in contexts] == [8, 8, 3]
    last = contexts[-1]
    assert last.position.tolist() == [-1, 14, 15, -1, -1, -1, -1, -1] and last.doc_index[3:].tolist() == [-1] * 5


def test_short_windows_below_min_tokens_are_skipped() -> None:
    docs = _documents([9, 2, 4])
    contexts = list(iter_contexts(docs, ctx_len=5, n_tokens=100, bos_token_id=BOS, min_tokens=3))
    # doc 0: windows of 4, 4 and a 1-token tail (skipped); doc 1 (2 tokens) skipped; doc 2 kept
    assert [(int(c.doc_index[0]), int(c.position[1])) for c in contexts] == [(0, 0), (0, 4), (2, 0)]


def test_deterministic() -> None:
    docs = _documents([13, 5, 29, 1])
    runs = [list(iter_contexts(iter(docs), ctx_len=6, n_tokens=40, bos_token_id=BOS)) for _ in range(2)]
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.position, b.position) and a.n_valid == b.n_valid


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(ctx_len=1, n_tokens=10, bos_token_id=BOS), "too short"),
        (dict(ctx_len=4, n_tokens=0), "budget"),
        (dict(ctx_len=4, n_tokens=10, min_tokens=5), "min_tokens"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(LmscopeError, match=message):
        list(iter_contexts(_documents([5]), **kwargs))


def test_bad_document_tokens_are_named() -> None:
    with pytest.raises(LmscopeError, match="document 7"):
        list(iter_contexts([(7, np.zeros((2, 2), dtype=np.int64))], ctx_len=4, n_tokens=10))
    with pytest.raises(LmscopeError, match="document 3"):
        list(iter_contexts([(3, np.array([0.5, 1.5]))], ctx_len=4, n_tokens=10))


def test_round_robin_by_domain_takes_turns_and_keeps_order() -> None:
    from lmscope.activations.job import round_robin_by_domain

    items = [(0, "a0", "a", None), (1, "a1", "a", None), (2, "a2", "a", None), (3, "b0", "b", None), (4, "c0", "c", None), (5, "b1", "b", None)]
    assert [item[1] for item in round_robin_by_domain(items)] == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert list(round_robin_by_domain([])) == []
