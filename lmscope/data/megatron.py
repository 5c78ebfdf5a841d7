"""Megatron / GPT-NeoX indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``), read zero-copy.

This is the ``MMapIndexedDataset`` format in which Pythia's pre-shuffled, pre-tokenized Pile
is published (uint16 token ids, 2049 per sequence). ``PREFIX.bin`` is every sequence's
elements back to back; ``PREFIX.idx`` is, all little-endian::

    offset          size    field
    0               9       magic  b"MMIDIDX\\x00\\x00"
    9               8       version, <Q, always 1
    17              1       dtype code, <B (see DTYPE_CODES)
    18              8       N, number of sequences, <Q
    26              8       D, number of document-index entries, <Q
    34              4·N     sizes: int32 element count of each sequence
    34 + 4N         8·N     pointers: int64 byte offset of each sequence in PREFIX.bin
    34 + 12N        8·D     doc_idx: int64; document d is sequences doc_idx[d] … doc_idx[d+1]-1
                            (it starts with 0 and, as Megatron writes it, ends with N)

Dtype codes. Codes 1–6 and 8 agree across Megatron-LM, GPT-NeoX and fairseq: 1 uint8,
2 int8, 3 int16, 4 int32, 5 int64, 6 float64 (GPT-NeoX/fairseq write ``np.float``, which is
float64), 8 uint16. Code 7 does not: Megatron-LM core reads it as float32, GPT-NeoX and
fairseq as float64 (``np.double``). Token data never uses it; a file with code 7 is read only
when the caller says which it means (``MegatronDataset(prefix, dtype=...)``), and the writer
never produces it. Pythia's Pile uses code 8 (uint16).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_LEGACY_MAGIC = b"TNTIDX\x00\x00"  # the older non-mmap IndexedDataset ("lazy"/"cached")
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N sequences, D doc-index entries

DTYPE_CODES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
"""The dtype codes read without help; code 7 is ambiguous (float32 or float64), see the module docstring."""

_AMBIGUOUS_CODE = 7
_AMBIGUOUS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _paths(path_prefix: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    prefix = Path(path_prefix).expanduser()
    if prefix.suffix in (".bin", ".idx"):
        prefix = prefix.with_suffix("")
    return prefix, prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")


def _code_for(dtype: np.dtype[Any]) -> int:
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    names = ", ".join(str(d) for d in DTYPE_CODES.values())
    raise LmscopeError(f"dtype {dtype} cannot be written to a Megatron dataset unambiguously; use one of {names}.")


def _resolve_dtype(code: int, dtype_arg: np.dtype[Any] | None, idx_path: Path) -> np.dtype[Any]:
    if code == _AMBIGUOUS_CODE:
        if dtype_arg is None or dtype_arg not in _AMBIGUOUS_DTYPES:
            raise LmscopeError(
                f"{str(idx_path)!r} has dtype code 7, which Megatron-LM reads as float32 and GPT-NeoX as "
                "float64; say which with dtype='float32' or dtype='float64'."
            )
        return dtype_arg
    if code not in DTYPE_CODES:
        known = ", ".join(f"{c} ({d})" for c, d in DTYPE_CODES.items())
        raise LmscopeError(f"{str(idx_path)!r} has unknown dtype code {code}; known codes are {known}.")
    dtype = DTYPE_CODES[code]
    if dtype_arg is not None and dtype_arg != dtype:
        raise LmscopeError(f"{str(idx_path)!r} holds {dtype} (code {code}), not the {dtype_arg} asked for; leave dtype out.")
    return dtype


def read_index(
    idx_path: Path, dtype: DTypeLike | None = None
) -> tuple[np.dtype[Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate and memory-map a ``.idx`` file: ``(dtype, sizes, pointers, doc_idx, mapped bytes)``.

    ``sizes`` is int32 ``[N]`` (tokens per sequence), ``pointers`` int64 ``[N]`` (byte offsets into
    the ``.bin``), ``doc_idx`` int64 ``[D]``; all three are views into the mapped file. Used on its
    own where the ``.bin`` is split into byte shards (Pythia's download).
    """
    dtype_arg = None if dtype is None else np.dtype(dtype)
    index_bytes = idx_path.stat().st_size
    with open(idx_path, "rb") as handle:
        head = handle.read(_HEADER.size)
    if not head.startswith(MAGIC) and not (len(head) < len(MAGIC) and MAGIC.startswith(head)):
        if head.startswith(_LEGACY_MAGIC):
            raise LmscopeError(
                f"{str(idx_path)!r} is an old non-mmap IndexedDataset (magic TNTIDX); re-export it as an "
                "mmap dataset (Megatron --dataset-impl mmap)."
            )
        raise LmscopeError(
            f"{str(idx_path)!r} is not a Megatron MMapIndexedDataset index: it starts with {head[:9]!r}, "
            f"not {MAGIC!r}; check that the path names a .idx file."
        )
    if len(head) < _HEADER.size:
        raise LmscopeError(
            f"{str(idx_path)!r} is truncated: {len(head)} bytes, shorter than the {_HEADER.size}-byte header; "
            "copy the file again."
        )
    _, version, code, count, doc_count = _HEADER.unpack(head)
    if version != VERSION:
        raise LmscopeError(f"{str(idx_path)!r} has index version {version}; only version {VERSION} is supported.")
    resolved = _resolve_dtype(code, dtype_arg, idx_path)
    expected = _HEADER.size + 12 * count + 8 * doc_count
    if index_bytes < expected:
        raise LmscopeError(
            f"{str(idx_path)!r} is truncated: {index_bytes} bytes, but its header announces {count} sequences "
            f"and {doc_count} document entries ({expected} bytes); copy the file again."
        )
    if index_bytes > expected:
        raise LmscopeError(
            f"{str(idx_path)!r} has {index_bytes - expected} bytes beyond the {count} sequences and "
            f"{doc_count} document entries its header announces; the file is corrupt or not this format."
        )
    mapped = np.memmap(idx_path, dtype=np.uint8, mode="r") if index_bytes else np.empty(0, np.uint8)
    offset = _HEADER.size
    sizes = np.frombuffer(mapped, dtype="<i4", count=count, offset=offset)
    pointers = np.frombuffer(mapped, dtype="<i8", count=count, offset=offset + 4 * count)
    doc_idx = np.frombuffer(mapped, dtype="<i8", count=doc_count, offset=offset + 12 * count)
    return resolved, sizes, pointers, doc_idx, mapped


class MegatronDataset:
    """A Megatron ``MMapIndexedDataset``, memory-mapped: ``ds[i]`` is a zero-copy view of sequence ``i``.

    Args:
        path_prefix: ``PREFIX`` of ``PREFIX.bin`` and ``PREFIX.idx`` (a path ending in ``.bin`` or
            ``.idx`` is accepted too).
        dtype: the element type, needed only for the ambiguous dtype code 7 (float32 or float64);
            for any other code it must match the file's, or be left out.

    Attributes:
        dtype: element type of the sequences.
        sizes: int32 array, element count of each sequence (a view of the index file).
        pointers: int64 array, byte offset of each sequence in the ``.bin`` file.
        doc_idx: int64 array, document boundaries in sequence indices.

    Raises :class:`LmscopeError`, naming the file, when either file is missing, the magic,
    version or dtype code is not this format's, or a file is shorter than its index says.
    """

    def __init__(self, path_prefix: str | os.PathLike[str], dtype: DTypeLike | None = None) -> None:
        self._init(path_prefix, dtype)

    def _init(self, path_prefix: str | os.PathLike[str], dtype: DTypeLike | None) -> None:
        self.prefix, self.idx_path, self.bin_path = _paths(path_prefix)
        self._dtype_arg = None if dtype is None else np.dtype(dtype)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise LmscopeError(
                    f"Megatron dataset file {str(path)!r} does not exist; give the path prefix shared by PREFIX.bin and PREFIX.idx."
                )
        self.dtype, self.sizes, self.pointers, self.doc_idx, self._idx_map = read_index(self.idx_path, self._dtype_arg)

        data_bytes = self.bin_path.stat().st_size
        if len(self.sizes):
            # Megatron writes sequences back to back, so the last one ends the data
            extent = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
            if data_bytes < extent:
                raise LmscopeError(
                    f"{str(self.bin_path)!r} is truncated: {data_bytes} bytes, but its index places the last sequence "
                    f"up to byte {extent}; copy the file again."
                )
        self._bin_map = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if data_bytes else np.empty(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        """Sequence ``index`` as a read-only view into the memory-mapped ``.bin`` (a list for a slice)."""
        if isinstance(index, slice):
            return [self.get(i) for i in range(*index.indices(len(self)))]
        return self.get(index)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.get(i)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Elements ``offset`` … ``offset + length`` of sequence ``index`` (to its end by default), zero-copy."""
        count = len(self)
        i = int(index)
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise IndexError(f"sequence {index} is out of range for {count} sequences")
        size = int(self.sizes[i])
        if not 0 <= offset <= size:
            raise IndexError(f"offset {offset} is outside sequence {i} of {size} elements")
        take = size - offset if length is None else min(length, size - offset)
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        end = start + take * self.dtype.itemsize
        if start < 0 or end > len(self._bin_map):
            raise LmscopeError(
                f"{str(self.idx_path)!r} places sequence {i} at bytes {start}…{end}, outside {str(self.bin_path)!r} "
                f"({len(self._bin_map)} bytes); the index and data files do not belong together."
            )
        return np.frombuffer(self._bin_map, dtype=self.dtype, count=take, offset=start)

    @property
    def num_documents(self) -> int:
        """Number of documents (``len(doc_idx) - 1``)."""
        return max(len(self.doc_idx) - 1, 0)

    def document_sequences(self, document: int) -> range:
        """The sequence indices of ``document``."""
        if not 0 <= document < self.num_documents:
            raise IndexError(f"document {document} is out of range for {self.num_documents} documents")
        return range(int(self.doc_idx[document]), int(self.doc_idx[document + 1]))

    @property
    def num_tokens(self) -> int:
        """Total elements over all sequences."""
        return int(self.sizes.sum(dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        # pickle the location, not the maps, so that DataLoader workers reopen the files
        return {"prefix": str(self.prefix), "dtype": None if self._dtype_arg is None else self._dtype_arg.str}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._init(state["prefix"], state["dtype"])

    def __repr__(self) -> str:
        return f"MegatronDataset({str(self.prefix)!r}, sequences={len(self)}, dtype={self.dtype})"


def write_megatron_dataset(
    path_prefix: str | os.PathLike[str],
    sequences: Iterable[ArrayLike],
    dtype: DTypeLike = np.uint16,
    doc_idx: Sequence[int] | None = None,
) -> tuple[Path, Path]:
    """Write ``PREFIX.bin`` and ``PREFIX.idx`` in the Megatron ``MMapIndexedDataset`` format.

    Sequences are streamed to disk one at a time; each file is written atomically.

    Args:
        path_prefix: ``PREFIX`` of the two files.
        sequences: 1-D sequences of numbers; every value must fit ``dtype``.
        dtype: element type; one of :data:`DTYPE_CODES` (uint16 for vocabularies under 65,536).
        doc_idx: document boundaries in sequence indices, starting with 0 and ending with the
            number of sequences; by default every sequence is its own document.

    Returns:
        ``(bin_path, idx_path)``.
    """
    prefix, idx_path, bin_path = _paths(path_prefix)
    target = np.dtype(dtype)
    code = _code_for(target)
    sizes: list[int] = []
    with atomic_path(bin_path) as tmp:  # an error below leaves no .bin behind
        with open(tmp, "wb") as out:
            for number, sequence in enumerate(sequences):
                elements = _as_elements(sequence, target, number)
                out.write(elements.tobytes())
                sizes.append(len(elements))
        count = len(sizes)
        documents = np.arange(count + 1, dtype=np.int64) if doc_idx is None else np.asarray(doc_idx, dtype=np.int64)
        if (
            documents.ndim != 1
            or len(documents) == 0
            or documents[0] != 0
            or documents[-1] != count
            or np.any(np.diff(documents) < 0)
        ):
            raise LmscopeError(
                f"doc_idx for {str(prefix)!r} must start with 0, never decrease and end with the number of "
                f"sequences ({count})."
            )
    size_array = np.asarray(sizes, dtype="<i4")
    pointers = np.zeros(count, dtype="<i8")
    if count > 1:
        np.cumsum(size_array[:-1].astype(np.int64) * target.itemsize, out=pointers[1:])
    header = _HEADER.pack(MAGIC, VERSION, code, count, len(documents))
    with atomic_path(idx_path) as tmp:
        with open(tmp, "wb") as out:
            out.write(header)
            out.write(size_array.tobytes())
            out.write(pointers.tobytes())
            out.write(documents.astype("<i8").tobytes())
    return bin_path, idx_path


def _as_elements(sequence: ArrayLike, dtype: np.dtype[Any], number: int) -> np.ndarray:
    array = np.asarray(sequence)
    if array.ndim != 1:
        raise LmscopeError(f"sequence {number} has shape {array.shape}; every sequence must be 1-D.")
    if array.size and dtype.kind in "iu":
        if array.dtype.kind not in "iub":
            raise LmscopeError(f"sequence {number} holds {array.dtype} values; {dtype} needs integers.")
        info = np.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise LmscopeError(
                f"sequence {number} holds values from {low} to {high}, outside {dtype} ({info.min}…{info.max}); "
                "choose a wider dtype."
            )
    return array.astype(dtype.newbyteorder("<"), copy=False)
