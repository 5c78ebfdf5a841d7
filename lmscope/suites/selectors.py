"""Checkpoint selectors: one short string that picks checkpoints out of a suite's list.

A selector is one or more terms separated by commas; the result is the union of what each
term picks, in training order, without duplicates. Terms:

- ``all`` — every checkpoint.
- ``log:N`` — N checkpoints evenly spaced in log(step). The first and the last checkpoint are
  always included; the other N−2 are the checkpoints nearest in log(step) to the interior points
  of an N-point grid evenly spaced from the log of the smallest positive step to the log of the
  last (a step-0 checkpoint, whose log is −∞, stands in for the grid's first point). A target
  whose nearest checkpoint is already taken takes the nearest one not yet taken, so the answer
  always has exactly ``min(N, len(checkpoints))`` distinct checkpoints. Needs steps that
  increase along the list (one training stage).
- ``every:K`` — every K-th checkpoint of the list starting with the first (indices 0, K, 2K, …),
  plus the last, always.
- a revision name (``step1000``, ``ckpt_010``, ``stage1-step928646-tokens3896B``), or a bare
  step number (``1000``) — that checkpoint; one that does not exist is an error naming the
  nearest that do.
- ``A..B`` — every checkpoint with A ≤ step ≤ B, where A and B are step numbers or revision
  names (``1000..5000``, ``step1000..step5000``); either end may be left out (``..512``).

Examples: ``log:10``, ``every:10``, ``step1000,step2000``, ``0,1000,143000``, ``log:8,step143000``,
``..512``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from lmscope.errors import LmscopeError
from lmscope.suites.catalog import Checkpoint, nearest_existing

SELECTOR_FORMS = (
    "all, log:N (N checkpoints evenly spaced in log(step)), every:K, a comma list of revisions or steps "
    "(step1000,step2000 or 1000,2000), or a step range A..B"
)

_LOG = re.compile(r"^log:(\d+)$")
_EVERY = re.compile(r"^every:(\d+)$")


def select_checkpoints(checkpoints: Sequence[Checkpoint], selector: str, where: str | None = None) -> list[Checkpoint]:
    """The checkpoints that ``selector`` picks from ``checkpoints`` (in training order), in that order.

    ``where`` names the suite or model in error messages.

    Raises :class:`LmscopeError` for a selector that is not understood (listing the valid
    forms) and for a revision or step that is not in ``checkpoints`` (naming the nearest).
    """
    checkpoints = list(checkpoints)
    terms = [term.strip() for term in selector.split(",")]
    if not selector.strip() or any(not term for term in terms):
        raise LmscopeError(f"checkpoint selector {selector!r} has an empty term; use {SELECTOR_FORMS}.")
    if not checkpoints:
        raise LmscopeError("there are no checkpoints to select from; check the suite name or revision list.")
    chosen: set[int] = set()
    for term in terms:
        chosen.update(_select_term(checkpoints, term, f" in {where}" if where else ""))
    return [checkpoints[i] for i in sorted(chosen)]


def _select_term(checkpoints: list[Checkpoint], term: str, where: str) -> list[int]:
    if term == "all":
        return list(range(len(checkpoints)))
    if match := _LOG.match(term):
        return log_spaced(checkpoints, _positive(term, match.group(1)))
    if match := _EVERY.match(term):
        return every_kth(len(checkpoints), _positive(term, match.group(1)))
    if ":" in term:  # git refs (hub revisions) cannot contain ':', so this is a mistyped form
        raise LmscopeError(f"checkpoint selector term {term!r} is not understood; use {SELECTOR_FORMS}.")
    if ".." in term:
        low, _, high = term.partition("..")
        lo = _step_bound(checkpoints, low.strip(), term, where) if low.strip() else -math.inf
        hi = _step_bound(checkpoints, high.strip(), term, where) if high.strip() else math.inf
        picked = [i for i, c in enumerate(checkpoints) if lo <= c.step <= hi]
        if not picked:
            raise LmscopeError(f"step range {term!r} holds no checkpoints{where}; steps run from {_step_span(checkpoints)}.")
        return picked
    return [_find(checkpoints, term, where)]


def _positive(term: str, digits: str) -> int:
    value = int(digits)
    if value < 1:
        raise LmscopeError(f"checkpoint selector {term!r} needs a count of at least 1; use {SELECTOR_FORMS}.")
    return value


def log_spaced(checkpoints: Sequence[Checkpoint], n: int) -> list[int]:
    """Indices of ``n`` checkpoints evenly spaced in log(step); see the module docstring for the rule.

    With steps ``s_0 < … < s_last``, the end points are always in, and the other ``n - 2`` are the
    checkpoints nearest (in log step) to the interior points of an ``n``-point grid evenly spaced
    over ``[log s_first, log s_last]``, where ``s_first`` is the smallest positive step. When
    ``s_0 = 0`` (log 0 is −∞) the step-0 checkpoint stands in for the grid's first point. Each
    target takes the nearest checkpoint not yet chosen, so the result has exactly ``n`` distinct
    indices.
    """
    steps = [c.step for c in checkpoints]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise LmscopeError(
            "log:N needs checkpoints whose steps increase along the list, but this list mixes training stages "
            "whose steps restart; narrow it to one stage with a revision list, or use every:K."
        )
    count = len(steps)
    if n >= count:
        return list(range(count))
    if n == 1:
        return [count - 1]
    low = math.log(steps[1] if steps[0] == 0 else steps[0])
    high = math.log(steps[-1])
    targets = [low + (high - low) * k / (n - 1) for k in range(1, n - 1)]
    # only index 0 can be at step 0, and it is chosen from the start, so every free index has a log
    logs = [math.log(step) if step > 0 else -math.inf for step in steps]
    chosen = {0, count - 1}
    for target in targets:
        free = (i for i in range(count) if i not in chosen)
        chosen.add(min(free, key=lambda i: (abs(logs[i] - target), i)))
    return sorted(chosen)


def every_kth(count: int, k: int) -> list[int]:
    """Indices 0, k, 2k, … below ``count``, plus the last index."""
    return sorted(set(range(0, count, k)) | {count - 1})


def _find(checkpoints: list[Checkpoint], item: str, where: str) -> int:
    for i, checkpoint in enumerate(checkpoints):
        if checkpoint.revision == item:
            return i
    if item.isdigit():
        step = int(item)
        matches = [i for i, c in enumerate(checkpoints) if c.step == step]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(checkpoints[i].revision for i in matches)
            raise LmscopeError(f"step {step} is ambiguous{where} ({names}); give the revision name instead.")
        ranked = sorted(range(len(checkpoints)), key=lambda i: (abs(checkpoints[i].step - step), checkpoints[i].step))
        nearest = ", ".join(f"{checkpoints[i].step} ({checkpoints[i].revision})" for i in ranked[:3])
        raise LmscopeError(f"no checkpoint is at step {step}{where}; the nearest steps that exist are {nearest}.")
    nearest = ", ".join(nearest_existing(item, [c.revision for c in checkpoints]))
    raise LmscopeError(f"revision {item!r} does not exist{where}; the nearest that exist are {nearest}.")


def _step_bound(checkpoints: list[Checkpoint], bound: str, term: str, where: str) -> int:
    if bound.isdigit():
        return int(bound)
    for checkpoint in checkpoints:
        if checkpoint.revision == bound:
            return checkpoint.step
    nearest = ", ".join(nearest_existing(bound, [c.revision for c in checkpoints]))
    raise LmscopeError(
        f"range {term!r}: {bound!r} is neither a step number nor an existing revision{where}; the nearest that exist are {nearest}."
    )


def _step_span(checkpoints: list[Checkpoint]) -> str:
    steps = [c.step for c in checkpoints]
    return f"{min(steps)} to {max(steps)}"
