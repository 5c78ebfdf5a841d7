"""Fixed-length rows out of Megatron indexed datasets: one ``PREFIX.bin``, Pythia's byte shards, or several in a row.

Pythia publishes its pre-shuffled Pile as one ``document.idx`` and the bytes of
``document.bin`` cut into pieces ``document-00000-of-00020.bin`` … ``document-00020-of-00020.bin``
(EleutherAI's ``utils/shard_memmap.py``; its ``unshard_memmap.py`` concatenates them back).
:class:`ShardedMegatronRows` reads rows straight from the pieces, so the 600 GB copy that
unsharding makes is not needed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from lmscope.data.megatron import MegatronDataset, read_index
from lmscope.errors import LmscopeError

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.bin$")


class RowStore(Protocol):
    """Rows by index, each exactly ``row_length`` tokens."""

    row_length: int

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int64 indices) as a ``[len(rows), row_length]`` array."""
        ...


def _wrong_length(where: str, row: int, size: int, row_length: int) -> LmscopeError:
    return LmscopeError(
        f"{where} row {row} holds {size} tokens, not {row_length}; the sequence length given "
        f"({row_length - 1} + 1) does not match the data, so pass the seq_len it was written with."
    )


class MegatronRows:
    """Rows of one Megatron dataset (``PREFIX.bin`` + ``PREFIX.idx``), read with :class:`MegatronDataset`."""

    def __init__(self, prefix: str | os.PathLike[str], row_length: int) -> None:
        self.dataset = MegatronDataset(prefix)
        _check_integer(self.dataset.dtype, str(self.dataset.idx_path))
        self.row_length = row_length
        self.where = str(self.dataset.bin_path)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def dtype(self) -> np.dtype:
        return self.dataset.dtype

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.row_length), dtype=self.dataset.dtype)
        sizes = self.dataset.sizes
        for i, row in enumerate(rows.tolist()):
            if int(sizes[row]) != self.row_length:
                raise _wrong_length(self.where, row, int(sizes[row]), self.row_length)
            out[i] = self.dataset.get(row)
        return out


class ShardedMegatronRows:
    """Rows of a Megatron dataset whose ``.bin`` is cut into byte shards ``PREFIX-NNNNN-of-LLLLL.bin``.

    The shards are the bytes of ``PREFIX.bin`` in order (shard ``LLLLL`` is the last); the
    index is ``PREFIX.idx``. A row may straddle two shards.
    """

    def __init__(self, prefix: Path, shards: list[Path], row_length: int) -> None:
        self.idx_path = prefix.with_name(prefix.name + ".idx")
        self.dtype, self.sizes, self.pointers = read_megatron_index(self.idx_path)
        self.row_length = row_length
        self.shards = shards
        self._maps = [np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.empty(0, np.uint8) for path in shards]
        self._starts = np.concatenate([[0], np.cumsum([len(m) for m in self._maps])]).astype(np.int64)
        total = int(self._starts[-1])
        if len(self.sizes):
            extent = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
            if total < extent:
                raise LmscopeError(
                    f"the {len(shards)} shards of {str(prefix)!r} hold {total} bytes, but {str(self.idx_path)!r} places the last "
                    f"sequence up to byte {extent}; a shard is missing or truncated, so download it again."
                )
        self.where = f"{prefix}-*.bin"

    def __len__(self) -> int:
        return len(self.sizes)

    def _bytes(self, start: int, stop: int) -> bytes | np.ndarray:
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        shard = first
        while start < stop:
            base = int(self._starts[shard])
            end = min(stop, int(self._starts[shard + 1]))
            pieces.append(self._maps[shard][start - base : end - base])
            start = end
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.row_length), dtype=self.dtype)
        width = self.row_length * self.dtype.itemsize
        for i, row in enumerate(rows.tolist()):
            if int(self.sizes[row]) != self.row_length:
                raise _wrong_length(self.where, row, int(self.sizes[row]), self.row_length)
            start = int(self.pointers[row])
            out[i] = np.frombuffer(self._bytes(start, start + width), dtype=self.dtype)
        return out


class ConcatRows:
    """Several row stores one after another: row ``i`` of the whole is row ``i - offset_k`` of store ``k``."""

    def __init__(self, stores: list[RowStore]) -> None:
        self.stores = stores
        self.row_length = stores[0].row_length
        self._starts = np.concatenate([[0], np.cumsum([len(s) for s in stores])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, rows: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self._starts, rows, side="right") - 1
        parts = [self.stores[k].read(rows[which == k] - self._starts[k]) for k in np.unique(which).tolist()]
        if len(parts) == 1:
            return parts[0]
        out = np.empty((len(rows), self.row_length), dtype=np.result_type(*(p.dtype for p in parts)))
        for k, part in zip(np.unique(which).tolist(), parts):
            out[which == k] = part
        return out


def read_megatron_index(idx_path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """``(dtype, sizes, pointers)`` of a Megatron ``.idx`` file, memory-mapped, for when the ``.bin`` is sharded.

    The checks are :func:`lmscope.data.megatron.read_index`'s, plus integer token data.
    """
    if not idx_path.is_file():
        raise LmscopeError(f"Megatron index {str(idx_path)!r} does not exist; it comes with the data (Pythia: document.idx).")
    dtype, sizes, pointers, _, _ = read_index(idx_path)
    _check_integer(dtype, str(idx_path))
    return dtype, sizes, pointers


def find_shards(prefix: Path) -> list[Path]:
    """The byte shards ``PREFIX-00000-of-LLLLL.bin`` … ``PREFIX-LLLLL-of-LLLLL.bin`` in order, or ``[]`` when there are none.

    Raises :class:`LmscopeError` when some are missing or their counts disagree.
    """
    found: dict[int, tuple[int, Path]] = {}
    if not prefix.parent.is_dir():
        return []
    for path in prefix.parent.glob(prefix.name + "-*-of-*.bin"):
        match = _SHARD.search(path.name)
        if match and path.name[: match.start()] == prefix.name:
            found[int(match.group(1))] = (int(match.group(2)), path)
    if not found:
        return []
    lasts = {last for last, _ in found.values()}
    if len(lasts) != 1:
        raise LmscopeError(f"the shards of {str(prefix)!r} disagree on their count (…-of-{sorted(lasts)}); keep the shards of one download only.")
    last = lasts.pop()
    missing = [i for i in range(last + 1) if i not in found]
    if missing or max(found) > last:
        names = ", ".join(f"{prefix.name}-{i:05d}-of-{last:05d}.bin" for i in missing[:3])
        raise LmscopeError(f"{len(missing)} of the {last + 1} shards of {str(prefix)!r} are missing ({names}…); download them.")
    return [found[i][1] for i in range(last + 1)]


def open_megatron_rows(prefix: str | os.PathLike[str], row_length: int) -> MegatronRows | ShardedMegatronRows:
    """Rows of the Megatron dataset at ``prefix``: ``PREFIX.bin`` when it exists, else its byte shards.

    ``prefix`` may name a directory holding ``document.idx`` (Pythia's file name).
    """
    path = Path(prefix).expanduser()
    if path.is_dir() and (path / "document.idx").is_file():
        path = path / "document"
    if path.suffix in (".bin", ".idx"):
        path = path.with_suffix("")
    if path.with_name(path.name + ".bin").is_file():
        return MegatronRows(path, row_length)
    shards = find_shards(path)
    if shards:
        return ShardedMegatronRows(path, shards, row_length)
    raise LmscopeError(
        f"Megatron data {str(path)!r} has neither {path.name}.bin nor shards {path.name}-00000-of-NNNNN.bin beside "
        f"{path.name}.idx; give the path prefix shared by the .bin and .idx files."
    )


def _check_integer(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "iu":
        raise LmscopeError(f"{where} holds {dtype} values, not token ids; point at a tokenized dataset.")
