"""Pythia: the pre-shuffled, pre-tokenized Pile as a Megatron indexed dataset.

EleutherAI publishes the exact sequence of training rows (``EleutherAI/pile-standard-pythia-preshuffled``
and ``…-deduped-…``): ``document.idx`` plus ``document.bin`` (or its byte shards
``document-00000-of-00020.bin`` …), uint16 token ids, rows of 2049 tokens in training order.
Step N is rows ``[1024·N, 1024·N + 1024)`` — what Pythia's ``utils/batch_viewer.py`` reads for
iteration N — the batch trained between checkpoints ``stepN`` and ``step(N+1)``. Training ran
143,000 steps, so steps 0 … 142999 exist even where the files hold a few more rows.

The Pile's document ids are not in this data. Documents end with token 0
(``<|endoftext|>`` in Pythia's tokenizer), so rows are cut into EOS-delimited segments
without ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmscope.suites.catalog import PYTHIA_STEPS
from lmscope.suites.replay.base import RawRows, ReplaySource
from lmscope.suites.replay.megatron_rows import ConcatRows, RowStore, open_megatron_rows

PYTHIA_BATCH_SIZE = 1024
PYTHIA_SEQ_LEN = 2048
PYTHIA_EOS = 0
PYTHIA_TRAIN_STEPS = PYTHIA_STEPS[-1]
"""143000: the batches trained are steps 0 … 142999 (checkpoint step143000 is the final model)."""


class PythiaSource(ReplaySource):
    """Pythia's pre-shuffled data: step N is rows ``[B·N, B·N + B)`` of the Megatron dataset(s).

    Args:
        data: one Megatron path prefix (``…/document``; a directory holding ``document.idx``
            works too), or several whose rows are concatenated in the order given. Each is
            read from ``PREFIX.bin`` when it exists, else from its byte shards
            ``PREFIX-NNNNN-of-LLLLL.bin`` (see :mod:`lmscope.suites.replay.megatron_rows`).
        batch_size: rows per step (1024 for every Pythia model).
        seq_len: trained positions per row; rows hold ``seq_len + 1`` tokens (2048 → 2049).
        eos_token_id: the token that ends documents (0 in Pythia's tokenizer); ``None`` leaves rows whole.
        train_steps: steps trained; steps at or beyond it are refused even if the data holds them.
            ``None``: as many as the data holds.
    """

    kind = "pythia"

    def __init__(
        self,
        data: str | Path | Sequence[str | Path],
        batch_size: int = PYTHIA_BATCH_SIZE,
        seq_len: int = PYTHIA_SEQ_LEN,
        eos_token_id: int | None = PYTHIA_EOS,
        train_steps: int | None = PYTHIA_TRAIN_STEPS,
    ) -> None:
        prefixes = [data] if isinstance(data, (str, Path)) else list(data)
        self.batch_size = int(batch_size)
        self.row_length = int(seq_len) + 1
        self.eos_token_id = eos_token_id
        self.train_steps = train_steps
        self.prefixes = [str(p) for p in prefixes]
        stores: list[RowStore] = [open_megatron_rows(prefix, self.row_length) for prefix in prefixes]
        for store in stores:
            if len(store):
                store.read(np.zeros(1, np.int64))  # a wrong seq_len shows in the first row: say so before anything else
        self.store: RowStore = stores[0] if len(stores) == 1 else ConcatRows(stores)

    @property
    def num_rows(self) -> int:
        return len(self.store)

    @property
    def num_steps(self) -> int:
        steps = self.num_rows // self.batch_size
        return steps if self.train_steps is None else min(steps, self.train_steps)

    def describe(self) -> str:
        where = self.prefixes[0] if len(self.prefixes) == 1 else f"{self.prefixes[0]} (+{len(self.prefixes) - 1} more)"
        return f"the pythia data at {where!r}"

    def _read(self, step: int, start: int, stop: int) -> RawRows:
        rows = np.arange(self.batch_size * step + start, self.batch_size * step + stop, dtype=np.int64)
        return RawRows(positions=rows.copy(), rows=rows, tokens=self.store.read(rows))
