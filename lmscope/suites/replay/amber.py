"""LLM360 Amber: 360 data chunks of JSON lines, one chunk per checkpoint.

``LLM360/AmberDatasets`` publishes ``train/train_000.jsonl`` … ``train_359.jsonl``; each line
is one training row, ``{"token_ids": [2049 ints], "source": "arxiv"}``, and chunk ``K`` is
what training on ``ckpt_{K-1}`` consumed to produce ``ckpt_K`` (for ``K = 0``: from
initialisation). The catalog (:data:`lmscope.suites.catalog.AMBER_TOKENS_PER_CHUNK`) counts
Amber's steps in chunks trained — ``ckpt_K`` has step ``K + 1`` — so under the shared
convention step ``K``'s batch is chunk ``K``: the data trained between the checkpoints with
steps ``K`` and ``K + 1``.

A chunk is ~1.7M rows (20.8 GB of JSON). Rows are streamed: reading rows ``A:B`` skips
``A`` lines by counting newlines, then parses ``B - A`` lines. Positions are
``K · rows_per_chunk + line``; rows are line numbers (0-based) inside the chunk file.
Files named ``train_K.jsonl`` (unpadded), or compressed (``.jsonl.gz``, ``.jsonl.zst``), are read too.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.suites.catalog import AMBER_CHUNKS, AMBER_SEQUENCES_PER_CHUNK
from lmscope.suites.replay.base import RawRows, ReplaySource

_BLOCK = 1 << 22
_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz")


class AmberSource(ReplaySource):
    """Amber's chunks: step ``K`` is every line of ``train_K.jsonl``.

    Args:
        data: the directory holding ``train_000.jsonl`` … (or a ``train/`` directory inside it).
        chunks: number of chunks (steps) in the run.
        rows_per_chunk: nominal lines per chunk (positions are ``K · rows_per_chunk + line``);
            a chunk with more lines is refused.
        seq_len: trained positions per row; each line holds ``seq_len + 1`` token ids.
        eos_token_id: the token that ends documents, to cut rows into segments; ``None``
            (the default) leaves rows whole. Each segment's domain is the row's ``source``.
    """

    kind = "amber"

    def __init__(
        self,
        data: str | os.PathLike[str],
        chunks: int = AMBER_CHUNKS,
        rows_per_chunk: int = AMBER_SEQUENCES_PER_CHUNK,
        seq_len: int = 2048,
        eos_token_id: int | None = None,
    ) -> None:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise LmscopeError(f"Amber data directory {str(root)!r} does not exist; give the directory holding train_000.jsonl ….")
        if not any(root.glob("train_*.jsonl*")) and (root / "train").is_dir():
            root = root / "train"
        if not any(path.name.startswith("train_") and path.name.endswith(_SUFFIXES) for path in root.iterdir()):
            raise LmscopeError(
                f"Amber data directory {str(root)!r} holds no train_NNN.jsonl chunk; download them from LLM360/AmberDatasets (train/)."
            )
        self.root = root
        self.chunks = int(chunks)
        self.batch_size = int(rows_per_chunk)
        self.row_length = int(seq_len) + 1
        self.eos_token_id = eos_token_id

    @property
    def num_steps(self) -> int:
        return self.chunks

    def describe(self) -> str:
        return f"the Amber data in {str(self.root)!r}"

    def checkpoints_around(self, step: int) -> tuple[str, str]:
        """``("ckpt_{K-1}", "ckpt_K")`` for chunk ``K`` (``"initialisation"`` before chunk 0)."""
        return ("initialisation" if step == 0 else f"ckpt_{step - 1:03d}"), f"ckpt_{step:03d}"

    def chunk_path(self, step: int) -> Path:
        """The file of chunk ``step``: ``train_{step:03d}.jsonl`` (or unpadded, or compressed)."""
        for name in (f"train_{step:03d}", f"train_{step}"):
            for suffix in _SUFFIXES:
                path = self.root / (name + suffix)
                if path.is_file():
                    return path
        raise LmscopeError(
            f"Amber chunk {step} (train_{step:03d}.jsonl) is not in {str(self.root)!r}; download it from "
            f"LLM360/AmberDatasets (train/train_{step:03d}.jsonl)."
        )

    def _read(self, step: int, start: int, stop: int) -> RawRows:
        blocks = list(self._stream(step, start, stop, stop - start))
        if not blocks:
            path = self.chunk_path(step)
            raise LmscopeError(f"{str(path)!r} has fewer than {start + 1} lines, so rows {start}:{stop} do not exist; give rows within the file.")
        return blocks[0]

    def iter_tokens(self, step: int, block_rows: int = 4096) -> Iterator[RawRows]:
        """Every row of chunk ``step`` in one streaming pass, ``block_rows`` at a time."""
        step = self.check_step(step)
        yield from self._stream(step, 0, self.batch_size, block_rows)

    def _stream(self, step: int, start: int, stop: int, block_rows: int) -> Iterator[RawRows]:
        path = self.chunk_path(step)
        with _open(path) as handle:
            lines = _iter_lines(handle, start)
            line = start
            while line < stop:
                tokens, sources, numbers = [], [], []
                for raw in lines:
                    ids, source = self._parse(path, line, raw)
                    tokens.append(ids)
                    sources.append(source)
                    numbers.append(line)
                    line += 1
                    if len(numbers) == block_rows or line >= stop:
                        break
                if not numbers:
                    return
                rows = np.asarray(numbers, dtype=np.int64)
                yield RawRows(
                    positions=rows + step * self.batch_size,
                    rows=rows,
                    tokens=np.stack(tokens),
                    origins=[f"{path}:{n + 1}" for n in numbers],
                    row_domains=sources,
                )
                if len(numbers) < block_rows and line < stop:
                    return
            if line == self.batch_size and next(lines, b"").strip():
                raise LmscopeError(
                    f"{str(path)!r} has more than {self.batch_size} lines; pass rows_per_chunk (--rows-per-chunk) "
                    "with the chunk's real length."
                )

    def _parse(self, path: Path, line: int, raw: bytes) -> tuple[np.ndarray, str]:
        where = f"{path}:{line + 1}"
        try:
            record = json.loads(raw)
        except ValueError as err:
            raise LmscopeError(f"{where} is not a JSON object ({err}); the chunk is corrupt, so download it again.") from None
        if not isinstance(record, dict) or not isinstance(record.get("token_ids"), list):
            raise LmscopeError(f"{where} has no token_ids list; Amber lines look like {{\"token_ids\": [...], \"source\": \"...\"}}.")
        ids = record["token_ids"]
        if len(ids) != self.row_length:
            raise LmscopeError(
                f"{where} holds {len(ids)} token ids, not {self.row_length}; pass the seq_len the data was written with "
                f"(rows hold seq_len + 1 ids)."
            )
        try:
            array = np.asarray(ids, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            raise LmscopeError(f"{where} has token_ids that are not all integers; the chunk is corrupt.") from None
        if array.size and (array.min() < 0 or array.max() >= 2**32):
            raise LmscopeError(f"{where} has token ids outside 0 … 2³²-1; the chunk is corrupt.")
        source = record.get("source")
        return array.astype(np.uint32), source if isinstance(source, str) else None


def _open(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _skip_lines(handle: IO[bytes], count: int) -> bytes | None:
    """Read past ``count`` newlines; the bytes read after the last of them, or ``None`` at end of file first."""
    while count > 0:
        block = handle.read(_BLOCK)
        if not block:
            return None
        found = block.count(b"\n")
        if found < count:
            count -= found
            continue
        at = -1
        for _ in range(count):
            at = block.index(b"\n", at + 1)
        return block[at + 1 :]
    return b""


def _iter_lines(handle: IO[bytes], start: int) -> Iterator[bytes]:
    """Lines from line ``start`` on (without their newline); a blank line ends nothing, it is returned as is."""
    pending = _skip_lines(handle, start)
    if pending is None:
        return
    while True:
        block = handle.read(_BLOCK)
        pending += block
        *lines, pending = pending.split(b"\n")
        yield from lines
        if not block:
            if pending.strip():
                yield pending
            return
