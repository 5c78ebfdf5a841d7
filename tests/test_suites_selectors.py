"""Checkpoint selectors: log:N, every:K, explicit lists, ranges, and their error messages."""

from __future__ import annotations

import math

import pytest

from lmscope.errors import LmscopeError
from lmscope.suites.catalog import Checkpoint, suite_checkpoints
from lmscope.suites.selectors import select_checkpoints


def _steps(steps: list[int]) -> list[Checkpoint]:
    return [Checkpoint(f"step{s}", s, None) for s in steps]


def _pick(checkpoints: list[Checkpoint], selector: str) -> list[int]:
    return [c.step for c in select_checkpoints(checkpoints, selector)]


PYTHIA = suite_checkpoints("pythia")


def test_log_on_a_dense_list_is_the_geometric_sequence() -> None:
    # with every step available, log spacing is exactly 10^(4k/(N-1)): independent of the code
    dense = _steps(list(range(1, 10_001)))
    assert _pick(dense, "log:5") == [1, 10, 100, 1000, 10_000]
    # a step-0 checkpoint stands in for the grid's first point (log 0 is -inf)
    dense0 = _steps(list(range(0, 10_001)))
    assert _pick(dense0, "log:6") == [0] + [round(10 ** (4 * k / 5)) for k in range(1, 5)] + [10_000]


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 40, 100, 153])
def test_log_picks_n_distinct_checkpoints_with_both_ends(n: int) -> None:
    picked = select_checkpoints(PYTHIA, f"log:{n}")
    steps = [c.step for c in picked]
    assert len(steps) == n == len(set(steps))
    assert steps == sorted(steps)
    assert steps[0] == 0 and steps[-1] == 143_000


def test_log_interior_points_are_nearest_the_log_grid() -> None:
    # every interior target exp(t) has, among checkpoints, no strictly closer free one
    picked = _pick(PYTHIA, "log:5")
    assert picked == [0, 16, 512, 7000, 143_000]
    grid = [math.exp(math.log(143_000) * k / 4) for k in (1, 2, 3)]
    for chosen, target in zip(picked[1:-1], grid):
        best = min((c.step for c in PYTHIA if c.step > 0), key=lambda s: abs(math.log(s) - math.log(target)))
        assert chosen == best


def test_log_edge_counts() -> None:
    assert _pick(PYTHIA, "log:1") == [143_000]
    assert len(select_checkpoints(PYTHIA, "log:1000")) == 154


def test_log_refuses_lists_whose_steps_restart() -> None:
    mixed = [Checkpoint("stage1-step10", 10, None), Checkpoint("stage2-ingredient1-step5", 5, None)]
    with pytest.raises(LmscopeError, match="increase"):
        select_checkpoints(mixed, "log:2")


def test_every_k_starts_at_the_first_and_keeps_the_last() -> None:
    assert _pick(PYTHIA, "every:50") == [0, 40_000, 90_000, 140_000, 143_000]
    assert len(select_checkpoints(PYTHIA, "every:1")) == 154
    assert _pick(PYTHIA, "every:1000") == [0, 143_000]
    assert _pick(_steps([0, 1, 2, 3, 4]), "every:2") == [0, 2, 4]


def test_explicit_lists_by_revision_or_step_union_and_ranges() -> None:
    assert _pick(PYTHIA, "step1000,step2000") == [1000, 2000]
    assert _pick(PYTHIA, "2000, 1000,1000") == [1000, 2000]
    assert _pick(PYTHIA, "log:2,512") == [0, 512, 143_000]
    assert _pick(PYTHIA, "..8") == [0, 1, 2, 4, 8]
    assert _pick(PYTHIA, "step1000..step3000") == [1000, 2000, 3000]
    assert _pick(PYTHIA, "142500..") == [143_000]
    assert len(select_checkpoints(PYTHIA, "all")) == 154
    amber = suite_checkpoints("amber", "ckpt_000,ckpt_359")
    assert [c.revision for c in amber] == ["ckpt_000", "ckpt_359"]


@pytest.mark.parametrize("selector", ["lg:5", "log:0", "log:x", "every:0", "", "step0,,step1", "first:3"])
def test_bad_selectors_list_the_valid_forms(selector: str) -> None:
    with pytest.raises(LmscopeError, match=r"log:N|at least 1|empty term"):
        select_checkpoints(PYTHIA, selector)


def test_unknown_revisions_and_steps_name_the_nearest() -> None:
    with pytest.raises(LmscopeError, match="step1500.*step1000, step2000"):
        suite_checkpoints("EleutherAI/pythia-70m", "step1500")
    with pytest.raises(LmscopeError, match=r"step 1500 in pythia.*1000 \(step1000\), 2000 \(step2000\)"):
        suite_checkpoints("pythia", "1500")
    with pytest.raises(LmscopeError, match="ckpt_359"):
        suite_checkpoints("amber", "ckpt_400")
    with pytest.raises(LmscopeError, match="holds no checkpoints"):
        select_checkpoints(PYTHIA, "600..900")
