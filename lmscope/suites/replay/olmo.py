"""OLMo: fixed-length instances cut from raw token files, visited in the order of ``global_indices.npy``.

What is implemented — the data order of AI2's OLMo trainer (``olmo/data/memmap_dataset.py``,
``olmo/data/iterable_dataset.py``) as its README's "inspecting training data" recipe reads it:

- **Token files.** The training config lists token files (``….npy``). Despite the name they
  have no NumPy header: each is a flat little-endian array of token ids (``uint16`` for OLMo 1's
  GPT-NeoX-derived tokenizer, ``uint32`` for larger vocabularies). File ``k`` of ``T_k``
  tokens yields ``T_k // seq_len`` instances of ``seq_len`` tokens (a remainder is dropped);
  the instances of all files are numbered one after another, in the config's order, so
  instance ``i`` is file ``k``, tokens ``[j·seq_len, (j+1)·seq_len)`` for the right ``k, j``.
- **Order.** ``global_indices.npy`` is one epoch's permutation of instance indices, written by
  the trainer as a raw ``uint32`` memmap (no header, despite the name); a real NumPy ``.npy``
  is read too. The batch of step ``s`` is instances
  ``global_indices[(s - start_step)·B : (s - start_step + 1)·B]`` with ``B`` the global batch
  size in instances (e.g. 2048 for OLMo-1B at ``seq_len`` 2048). Step ``s``'s batch is trained
  between checkpoints ``step{s}`` and ``step{s+1}``, as for Pythia.
- **Per epoch, and restarts.** The permutation is a pure function of (seed, epoch), so a
  trainer that restarts mid-epoch resumes at the same place in the same array — replay is
  unaffected. A new epoch uses a new permutation (another ``global_indices`` file); give
  ``start_step``, the global step of that file's first batch, to keep step numbers global.
  A run whose global batch size changed mid-epoch does not follow ``s·B`` and needs its own
  offset (``start_step`` counts whole batches of the current size).

Instances are ``seq_len`` tokens, not ``seq_len + 1``: OLMo trains on ``seq_len - 1``
next-token targets per instance. No document ids are stored; give ``eos_token_id``
(50279 for OLMo 1's tokenizer) to cut instances at document ends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmscope.errors import LmscopeError
from lmscope.suites.replay.base import RawRows, ReplaySource

_NPY_MAGIC = b"\x93NUMPY"
_TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4"), "uint64": np.dtype("<u8")}
_INDEX_DTYPES = {"uint32": np.dtype("<u4"), "uint64": np.dtype("<u8")}


def _dtype(name: str, table: dict[str, np.dtype], what: str) -> np.dtype:
    if str(name) not in table:
        raise LmscopeError(f"{what} {name!r} is not supported; use one of {', '.join(table)}.")
    return table[str(name)]


def _has_npy_header(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(_NPY_MAGIC)) == _NPY_MAGIC


def open_global_indices(path: str | os.PathLike[str], dtype: str = "uint32") -> np.ndarray:
    """OLMo's ``global_indices.npy``, memory-mapped: a raw ``dtype`` array, or a NumPy ``.npy`` if it has the header."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmscopeError(f"OLMo data order file {str(path)!r} does not exist; download the run's train_data/global_indices.npy.")
    if _has_npy_header(path):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise LmscopeError(f"{str(path)!r} has a NumPy header but could not be read ({err}); download it again.") from None
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise LmscopeError(f"{str(path)!r} holds a {array.dtype} array of shape {array.shape}; OLMo's data order is a 1-D array of instance indices.")
        return array
    itemtype = _dtype(dtype, _INDEX_DTYPES, "global_indices dtype")
    size = path.stat().st_size
    if size % itemtype.itemsize:
        raise LmscopeError(
            f"{str(path)!r} is {size} bytes, not a whole number of {itemtype} indices; it is truncated or holds another dtype "
            f"(OLMo writes uint32; pass indices_dtype)."
        )
    return np.memmap(path, dtype=itemtype, mode="r") if size else np.zeros(0, itemtype)


class OlmoSource(ReplaySource):
    """OLMo's training data order: step ``s`` is ``global_indices[(s - start_step)·B : …+B]``, instances of ``seq_len`` tokens.

    Args:
        global_indices: path of the epoch's ``global_indices.npy``.
        data: the token files in the training config's order.
        batch_size: global batch size in instances.
        seq_len: tokens per instance (the config's ``max_sequence_length``).
        dtype: token dtype of the files, ``uint16`` or ``uint32`` (the config's ``memmap_dtype``).
        indices_dtype: dtype of a raw (headerless) ``global_indices`` file; OLMo writes ``uint32``.
        eos_token_id: the token that ends documents, to cut instances into segments; ``None`` leaves them whole.
        start_step: the global step of the first batch in ``global_indices`` (0 for the first epoch).
    """

    kind = "olmo"

    def __init__(
        self,
        global_indices: str | os.PathLike[str],
        data: Sequence[str | os.PathLike[str]],
        batch_size: int,
        seq_len: int = 2048,
        dtype: str = "uint16",
        indices_dtype: str = "uint32",
        eos_token_id: int | None = None,
        start_step: int = 0,
    ) -> None:
        if isinstance(data, (str, os.PathLike)):
            data = [data]
        if not data:
            raise LmscopeError("OLMo replay needs the token files of the training config, in order; give at least one with --data.")
        self.batch_size = int(batch_size)
        self.row_length = int(seq_len)
        self.eos_token_id = eos_token_id
        self.start_step = int(start_step)
        self.token_dtype = _dtype(dtype, _TOKEN_DTYPES, "token dtype")
        self.indices_path = Path(global_indices).expanduser()
        self.indices = open_global_indices(self.indices_path, indices_dtype)
        self.paths = [Path(p).expanduser() for p in data]
        self._maps: list[np.ndarray] = []
        counts = []
        for path in self.paths:
            if not path.is_file():
                raise LmscopeError(f"OLMo token file {str(path)!r} does not exist; download it, or fix the list of --data files.")
            size = path.stat().st_size
            if size % self.token_dtype.itemsize:
                raise LmscopeError(
                    f"OLMo token file {str(path)!r} is {size} bytes, not a whole number of {self.token_dtype} tokens; "
                    "it is truncated or the dtype is wrong (uint16 for OLMo 1, uint32 for larger vocabularies)."
                )
            if size and _has_npy_header(path):
                raise LmscopeError(
                    f"{str(path)!r} starts with a NumPy .npy header, but OLMo reads its token files as raw arrays; "
                    "write the tokens with np.memmap (or tofile), as Dolma's tokenizer does."
                )
            tokens = np.memmap(path, dtype=self.token_dtype, mode="r") if size else np.zeros(0, self.token_dtype)
            self._maps.append(tokens)
            counts.append(len(tokens) // self.row_length)
        self.instances_per_file = np.asarray(counts, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self.instances_per_file)]).astype(np.int64)

    @property
    def num_instances(self) -> int:
        return int(self._starts[-1])

    @property
    def num_steps(self) -> int:
        return self.start_step + len(self.indices) // self.batch_size

    def describe(self) -> str:
        return f"the OLMo data order {str(self.indices_path)!r}"

    def check_step(self, step: int) -> int:
        step = super().check_step(step)
        if step < self.start_step:
            raise LmscopeError(
                f"step {step} comes before {str(self.indices_path)!r}, whose first batch is step {self.start_step}; "
                "use the global_indices file of the epoch that holds it."
            )
        return step

    def instances(self, indices: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Instances ``indices`` of the concatenated token files: ``[n, seq_len]`` tokens and ``file:instance`` origins."""
        indices = np.asarray(indices, dtype=np.int64)
        bad = indices[(indices < 0) | (indices >= self.num_instances)]
        if len(bad):
            raise LmscopeError(
                f"{str(self.indices_path)!r} names instance {int(bad[0])}, but the {len(self.paths)} token files hold "
                f"{self.num_instances} instances of {self.row_length} tokens; the file list, its order, seq_len or dtype "
                "does not match the training config."
            )
        files = np.searchsorted(self._starts, indices, side="right") - 1
        out = np.empty((len(indices), self.row_length), dtype=self.token_dtype)
        origins = []
        for i, (index, k) in enumerate(zip(indices.tolist(), files.tolist())):
            j = index - int(self._starts[k])
            out[i] = self._maps[k][j * self.row_length : (j + 1) * self.row_length]
            origins.append(f"{self.paths[k]}:{j}")
        return out, origins

    def _read(self, step: int, start: int, stop: int) -> RawRows:
        first = (step - self.start_step) * self.batch_size
        positions = np.arange(step * self.batch_size + start, step * self.batch_size + stop, dtype=np.int64)
        rows = np.asarray(self.indices[first + start : first + stop], dtype=np.int64)
        tokens, origins = self.instances(rows)
        return RawRows(positions=positions, rows=rows, tokens=tokens, origins=origins)
