"""Schedules of a mini suite: which steps are checkpointed, and the learning rate of every update.

Step semantics (Pythia's): update ``n`` (1-based) is the ``n``-th optimizer step; checkpoint
``stepN`` holds the weights after updates ``1 … N``, so ``step0`` is the initialisation.
"""

from __future__ import annotations

import math

from lmscope.errors import LmscopeError


def checkpoint_steps(total_steps: int, even_count: int) -> list[int]:
    """Pythia's checkpoint schedule, scaled to a run of ``total_steps`` updates.

    Pythia checkpoints step 0, the powers of two 1, 2, 4, …, 512, then every 1000 steps to
    143000: 143 evenly spaced checkpoints, and the log-spaced ones below the first of them.
    Scaled: the ``even_count`` steps ``round(k × total_steps / even_count)`` for
    ``k = 1 … even_count`` (all of them when ``even_count ≥ total_steps``), step 0, and every
    power of two below the first evenly spaced step.

    >>> checkpoint_steps(384, 16)
    [0, 1, 2, 4, 8, 16, 24, 48, 72, 96, 120, 144, 168, 192, 216, 240, 264, 288, 312, 336, 360, 384]
    >>> checkpoint_steps(143000, 143)[:12]
    [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    """
    if total_steps < 1 or even_count < 1:
        raise LmscopeError(f"a schedule needs at least one step and one checkpoint, not {total_steps} and {even_count}.")
    count = min(even_count, total_steps)
    even = sorted({round(k * total_steps / count) for k in range(1, count + 1)})
    log_spaced = []
    power = 1
    while power < even[0]:
        log_spaced.append(power)
        power *= 2
    return sorted({0, *log_spaced, *even})


def learning_rate(update: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """The learning rate of update ``update`` (1-based): linear warm-up, then cosine decay (Pythia's shape).

    - ``update ≤ warmup_steps``: ``peak × update / warmup_steps`` (the first update already moves);
    - after: ``peak × (r + (1 − r) × ½(1 + cos(π p)))`` with ``r = min_ratio`` and
      ``p = (update − warmup_steps) / (total_steps − warmup_steps)``, so the last update uses
      ``r × peak`` (Pythia: r = 0.1).
    """
    if not 1 <= update <= total_steps:
        raise LmscopeError(f"update {update} is outside 1…{total_steps}.")
    if update <= warmup_steps:
        return peak * update / warmup_steps
    if total_steps == warmup_steps:
        return peak
    progress = (update - warmup_steps) / (total_steps - warmup_steps)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
