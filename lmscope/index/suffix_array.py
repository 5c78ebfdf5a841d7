"""Suffix-array construction (libdivsufsort through ``pydivsufsort``) and the on-disk suffix-array reader.

**Construction.** libdivsufsort sorts the suffixes of a *byte* string. A token stream of
``w``-byte ids (``w`` = 2 for ``uint16``, 4 for ``uint32``) is written as big-endian bytes,
so that comparing two byte strings that start at multiples of ``w`` is the same as
comparing the token sequences: the most significant byte of each id comes first, and a
suffix that runs out first (a prefix of the other) sorts first in both. The byte suffix
array is then filtered to the suffixes that start on a token boundary and divided by
``w``. This is the same reduction ``pydivsufsort.divsufsort`` applies to a multi-byte numpy
array; it is done here, in chunks, so that peak memory stays near the byte suffix array
itself (4 bytes per stream byte while the stream has < 2³¹ bytes, else 8).

**Storage.** A suffix array is stored as ``n`` little-endian unsigned integers of the
smallest width that holds ``n - 1``, but never less than 4 bytes: 4 bytes below 2³²
positions, else 5 (up to 2⁴⁰). :class:`StoredSuffixArray` reads either width from a memmap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmscope.errors import LmscopeError

_FILTER_CHUNK = 1 << 22  # byte-suffix-array entries filtered per pass


def suffix_array(stream: np.ndarray) -> np.ndarray:
    """The suffix array of ``stream`` (1-D ``uint16`` or ``uint32``): shape ``(n,)``, a permutation of ``0 … n-1``.

    The dtype is ``uint32`` when ``n ≤ 2³²``, else ``uint64``.

    Suffix ``i`` is ``stream[i:]``; suffixes are ordered lexicographically by token id, a proper
    prefix before any longer sequence it starts.
    """
    import pydivsufsort

    stream = np.ascontiguousarray(stream)
    if stream.ndim != 1 or stream.dtype.kind != "u" or stream.dtype.itemsize not in (2, 4):
        raise LmscopeError(f"a suffix array is built over a 1-D uint16 or uint32 token stream, not {stream.dtype} of shape {stream.shape}.")
    n = len(stream)
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    width = stream.dtype.itemsize
    big_endian = stream.astype(f">u{width}")
    byte_sa = pydivsufsort.divsufsort(big_endian.view(np.uint8))
    del big_endian
    out = np.empty(n, dtype=np.uint32 if n <= 2**32 else np.uint64)
    shift = width.bit_length() - 1  # width is 2 or 4
    filled = 0
    for start in range(0, len(byte_sa), _FILTER_CHUNK):
        chunk = np.asarray(byte_sa[start : start + _FILTER_CHUNK])
        aligned = chunk[(chunk & (width - 1)) == 0] >> shift
        out[filled : filled + len(aligned)] = aligned
        filled += len(aligned)
    if filled != n:  # pragma: no cover - a broken library build
        raise LmscopeError(f"libdivsufsort returned {filled} token-aligned suffixes for a stream of {n} tokens; reinstall pydivsufsort.")
    return out


def suffix_array_width(n_positions: int) -> int:
    """Bytes per stored suffix-array entry for a stream of ``n_positions`` tokens: 4 below 2³², else 5."""
    if n_positions <= 2**32:
        return 4
    if n_positions <= 2**40:
        return 5
    raise LmscopeError(f"a shard of {n_positions} tokens is beyond the 2^40 positions a suffix array stores; lower --shard-tokens.")


def write_suffix_array(path: str | os.PathLike[str], positions: np.ndarray, width: int) -> None:
    """Write ``positions`` as ``width``-byte little-endian unsigned integers (4 or 5 bytes each)."""
    positions = np.asarray(positions)
    if width == 4:
        if len(positions) and int(positions.max()) >= 2**32:
            raise LmscopeError(f"suffix-array positions up to {int(positions.max())} do not fit 4 bytes; store them with 5.")
        positions.astype("<u4", copy=False).tofile(path)
        return
    if width != 5:
        raise LmscopeError(f"suffix-array width {width} is not supported; use 4 or 5 bytes.")
    with open(path, "wb") as sink:
        for start in range(0, len(positions), _FILTER_CHUNK):
            chunk = positions[start : start + _FILTER_CHUNK].astype("<u8")
            sink.write(np.ascontiguousarray(chunk.view(np.uint8).reshape(-1, 8)[:, :width]).tobytes())


class StoredSuffixArray:
    """A suffix array on disk, mapped into memory (never read whole).

    Args:
        path: the file written by :func:`write_suffix_array`.
        n: number of entries.
        width: bytes per entry (4 or 5).

    Attributes:
        entries: the raw entries as a plain ``np.ndarray`` over the file's memory map (a view of
            the ``np.memmap``, not a copy: only the pages read are loaded) — shape ``(n,)``
            ``<u4`` for width 4, ``(n, 5)`` ``uint8`` for width 5. A plain array, because
            ``np.memmap.__getitem__`` is a Python-level override that costs about 1 µs per call
            and several per slice (see :mod:`lmscope.index.search`).
    """

    def __init__(self, path: str | os.PathLike[str], n: int, width: int) -> None:
        self.path = Path(path)
        self.n = n
        self.width = width
        size = self.path.stat().st_size
        if size != n * width:
            raise LmscopeError(f"{self.path} holds {size} bytes but should hold {n} entries of {width} bytes; rebuild the index.")
        if width not in (4, 5):
            raise LmscopeError(f"{self.path} uses a suffix-array width of {width} bytes; this lmscope reads 4 or 5; rebuild the index.")
        shape = (n,) if width == 4 else (n, width)
        dtype = np.dtype("<u4") if width == 4 else np.dtype(np.uint8)
        if n == 0:
            self.entries: np.ndarray = np.zeros(shape, dtype=dtype)
        else:
            self.entries = np.asarray(np.memmap(self.path, dtype=dtype, mode="r", shape=shape))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if self.width == 4:
            return int(self.entries[i])
        return int.from_bytes(self.entries[i].tobytes(), "little")

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Entries ``start … stop-1`` as ``int64``."""
        if self.width == 4:
            return self.entries[start:stop].astype(np.int64)
        return _five_byte_values(self.entries[start:stop])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Entries at the indices ``rows`` (any shape of integers), as ``int64`` of the same shape."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.width == 4:
            return self.entries[rows].astype(np.int64)
        return _five_byte_values(self.entries[rows.reshape(-1)]).reshape(rows.shape)


def _five_byte_values(raw: np.ndarray) -> np.ndarray:
    """``[m, 5]`` little-endian bytes → ``m`` ``int64`` values."""
    wide = np.zeros((len(raw), 8), dtype=np.uint8)
    wide[:, : raw.shape[1]] = raw
    return wide.view("<u8").reshape(-1).astype(np.int64)
