"""Read an activation store: validation, random access, row metadata and a shuffled stream.

The store layout and manifest schema are described in :mod:`lmscope.activations.store`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lmscope.activations.store import ACTIVATIONS_KEY, DOCUMENTS_FILE, FORMAT, FORMAT_VERSION, MANIFEST, ROW_COLUMNS
from lmscope.errors import LmscopeError
from lmscope.fsio import sha256_file

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64"}
_REBUILD = "rerun the capture that wrote the store (same arguments) to rebuild it"


class ActivationStore:
    """A finished activation store on disk, opened read-only.

    Rows are token positions, numbered ``0 .. n_rows-1`` in capture order; every hook
    has the same rows. Activations come back as torch tensors in the stored dtype.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self._row_starts = np.array([s["row_start"] for s in self._shards] + [manifest["n_rows"]], dtype=np.int64)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = False, allow_incomplete: bool = False) -> "ActivationStore":
        """Open the store at ``path`` and check it.

        Always checked: the manifest, that every shard file exists with the recorded size, and
        that each file's safetensors header holds the expected tensors. With ``verify=True``
        every file's sha256 is compared too (reads everything). ``allow_incomplete`` opens a
        store whose capture has not finished (only its listed shards are visible).
        """
        root = Path(path)
        manifest = _read_manifest(root)
        if not manifest["complete"] and not allow_incomplete:
            raise LmscopeError(
                f"activation store {root} is incomplete ({manifest['n_rows']} rows in {len(manifest['shards'])} shards so far); "
                "rerun the same capture command to finish it."
            )
        store = cls(root, manifest)
        store._check_files(verify)
        return store

    def _check_files(self, verify: bool) -> None:
        for shard in self._shards:
            n_rows = shard["row_end"] - shard["row_start"]
            expected = {name: (dtype, [n_rows]) for name, dtype in ROW_COLUMNS.items()}
            _check_file(self.root, shard["rows"], expected, verify)
            for hook, info in self.manifest["hooks"].items():
                entry = shard["hooks"].get(hook)
                if entry is None:
                    raise LmscopeError(f"{self.root / MANIFEST} lists shard {shard['index']} without hook {hook!r}; {_REBUILD}.")
                _check_file(self.root, entry, {ACTIVATIONS_KEY: (info["dtype"], [n_rows, *info["row_shape"]])}, verify)
        documents = self.manifest.get("documents")
        if documents is not None:
            _check_file(self.root, documents, None, verify)

    def verify(self) -> None:
        """Compare every file's sha256 with the manifest; LmscopeError naming the first that differs."""
        self._check_files(verify=True)

    # -- description ---------------------------------------------------------------------------

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def dtype(self) -> str:
        return str(self.manifest["config"]["dtype"])

    @property
    def meta(self) -> dict[str, Any]:
        """The caller's run description (model spec, revision, corpus...), as written."""
        return self.manifest["meta"]

    def row_shape(self, hook: str) -> tuple[int, ...]:
        """Shape of one row of ``hook`` (``(d,)`` for residual streams)."""
        return tuple(self._hook_info(hook)["row_shape"])

    def d(self, hook: str) -> int:
        """Values per row of ``hook``."""
        return int(self._hook_info(hook)["d"])

    def _hook_info(self, hook: str) -> dict[str, Any]:
        info = self.manifest["hooks"].get(hook)
        if info is None:
            raise LmscopeError(f"hook {hook!r} is not in the activation store {self.root}; it holds {', '.join(self.hooks)}.")
        return info

    # -- row metadata --------------------------------------------------------------------------

    @cached_property
    def metadata(self) -> dict[str, np.ndarray]:
        """Per-row ``token`` (int32), ``doc_index`` (int64), ``position`` (int32, -1 for BOS), ``context`` (int64).

        Loaded whole on first use (24 bytes per row).
        """
        parts = [self._shard_rows(i) for i in range(self.n_shards)]
        return {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, dtype) for name, dtype in ROW_COLUMNS.items()}

    @cached_property
    def documents(self) -> Any:
        """The ``pyarrow.Table`` of the rows' documents (``doc_index``, ``id``, ``domain``...), or ``None`` if not stored."""
        if self.manifest.get("documents") is None:
            return None
        import pyarrow.parquet as pq

        path = self.root / DOCUMENTS_FILE
        try:
            return pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for damaged files
            raise LmscopeError(f"document table {path} is unreadable ({err}); {_REBUILD}.") from None

    def document_ids(self, doc_index: Sequence[int] | np.ndarray) -> list[str]:
        """The document ids of ``doc_index`` values (e.g. ``store.metadata["doc_index"][rows]``)."""
        table = self.documents
        if table is None or "id" not in table.column_names:
            raise LmscopeError(f"activation store {self.root} has no document id table; resolve doc_index with the corpus in meta.")
        lookup = dict(zip(table.column("doc_index").to_pylist(), table.column("id").to_pylist()))
        try:
            return [lookup[int(i)] for i in np.asarray(doc_index).ravel()]
        except KeyError as err:
            raise LmscopeError(f"doc_index {err.args[0]} is not used by any row of activation store {self.root}.") from None

    # -- random access -------------------------------------------------------------------------

    def rows(self, hook: str, index: int | slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Activations of ``hook`` at rows ``index``: ``[*row_shape]`` for an int, ``[n, *row_shape]`` otherwise.

        A contiguous slice reads only the bytes it needs; index arrays may repeat and come in any order.
        """
        self._hook_info(hook)
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n_rows)
            if step == 1:
                return self._read_range(hook, start, max(start, stop))
            return self.rows(hook, np.arange(start, stop, step))
        if isinstance(index, (int, np.integer)):
            position = int(index) + (self.n_rows if index < 0 else 0)
            if not 0 <= position < self.n_rows:
                raise IndexError(f"row {index} is out of range for {self.n_rows} rows")
            return self._read_range(hook, position, position + 1)[0]
        indices = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        if indices.dtype == np.bool_:
            if indices.shape != (self.n_rows,):
                raise IndexError(f"a boolean row mask must have shape ({self.n_rows},), not {indices.shape}")
            indices = np.nonzero(indices)[0]
        elif indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise IndexError(f"row indices must be integers or a boolean mask, not {indices.dtype}")
        indices = indices.astype(np.int64).ravel()
        indices = np.where(indices < 0, indices + self.n_rows, indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_rows):
            raise IndexError(f"row indices must lie in [0, {self.n_rows})")
        out = torch.empty((indices.size, *self.row_shape(hook)), dtype=_torch_dtype(self.dtype))
        shard_of = np.searchsorted(self._row_starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            chosen = np.nonzero(shard_of == shard)[0]
            local = indices[chosen] - self._row_starts[shard]
            lo, hi = int(local.min()), int(local.max()) + 1
            block = self._read_shard(hook, int(shard), lo, hi)
            out[torch.from_numpy(chosen)] = block[torch.from_numpy(local - lo)]
        return out

    def _read_range(self, hook: str, start: int, stop: int) -> torch.Tensor:
        if start >= stop:
            return torch.empty((0, *self.row_shape(hook)), dtype=_torch_dtype(self.dtype))
        first = int(np.searchsorted(self._row_starts, start, side="right")) - 1
        last = int(np.searchsorted(self._row_starts, stop - 1, side="right")) - 1
        parts = []
        for shard in range(first, last + 1):
            base = int(self._row_starts[shard])
            lo, hi = max(start, base) - base, min(stop, int(self._row_starts[shard + 1])) - base
            parts.append(self._read_shard(hook, shard, lo, hi))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _read_shard(self, hook: str, shard: int, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """Rows ``[lo, hi)`` of one shard's activations (all rows by default)."""
        path = self.root / self._shards[shard]["hooks"][hook]["file"]
        try:
            with safe_open(path, framework="pt") as handle:
                if lo is None:
                    return handle.get_tensor(ACTIVATIONS_KEY)
                return handle.get_slice(ACTIVATIONS_KEY)[lo:hi]
        except Exception as err:  # safetensors raises its own error type for damaged files
            raise LmscopeError(f"activation shard {path} cannot be read ({err}); {_REBUILD}.") from None

    def _shard_rows(self, shard: int) -> dict[str, np.ndarray]:
        path = self.root / self._shards[shard]["rows"]["file"]
        try:
            with safe_open(path, framework="np") as handle:
                return {name: handle.get_tensor(name) for name in ROW_COLUMNS}
        except Exception as err:
            raise LmscopeError(f"row index shard {path} cannot be read ({err}); {_REBUILD}.") from None

    # -- streaming -----------------------------------------------------------------------------

    def stream(
        self,
        hook: str,
        batch_size: int,
        seed: int = 0,
        *,
        shuffle: bool = True,
        buffer_shards: int = 4,
        epoch: int = 0,
        drop_last: bool = False,
        with_metadata: bool = False,
    ) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
        """Yield one epoch of ``hook``'s rows as ``Tensor[batch_size, *row_shape]``, each row exactly once.

        Shuffling is a pure function of ``(seed, epoch)`` and the store: shards are visited in
        a random order; they are loaded into a mixing buffer until it holds about
        ``buffer_shards`` shards of rows; the buffer is permuted, half of it (whole batches)
        is yielded and the rest stays to mix with the next shards; at the end the remainder
        is permuted and yielded. Memory stays near ``buffer_shards + 1`` shards. With
        ``shuffle=False`` rows come in store order. The last batch is smaller unless
        ``drop_last``, which drops those rows.

        With ``with_metadata`` each item is ``(tensor, {"row", "token", "doc_index", "position"})``,
        numpy arrays aligned with the tensor's rows (``row`` is the global row number).
        """
        self._hook_info(hook)
        if batch_size < 1:
            raise LmscopeError(f"batch size {batch_size} must be at least 1.")
        if buffer_shards < 1:
            raise LmscopeError(f"buffer_shards={buffer_shards} must be at least 1.")
        if seed < 0 or epoch < 0:
            raise LmscopeError(f"seed {seed} and epoch {epoch} must be non-negative integers.")
        return self._stream(hook, batch_size, seed, shuffle, buffer_shards, epoch, drop_last, with_metadata)

    def _stream(
        self, hook: str, batch_size: int, seed: int, shuffle: bool, buffer_shards: int, epoch: int,
        drop_last: bool, with_metadata: bool,
    ) -> Iterator[Any]:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(self.n_shards) if shuffle else np.arange(self.n_shards)
        mean_rows = -(-self.n_rows // max(self.n_shards, 1))
        fill = max(buffer_shards * mean_rows, 2 * batch_size) if shuffle else batch_size
        buffer = _Buffer()
        for shard in order:
            buffer.append(*self._load_for_stream(hook, int(shard), with_metadata))
            while len(buffer) >= fill:
                if shuffle:
                    buffer.permute(rng)
                    n_out = max(len(buffer) // 2 // batch_size, 1) * batch_size
                else:
                    n_out = len(buffer) // batch_size * batch_size
                yield from buffer.take_batches(n_out, batch_size, with_metadata)
        if shuffle:
            buffer.permute(rng)
        n_out = len(buffer) // batch_size * batch_size if drop_last else len(buffer)
        yield from buffer.take_batches(n_out, batch_size, with_metadata)

    def _load_for_stream(self, hook: str, shard: int, with_metadata: bool) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        activations = self._read_shard(hook, shard)
        start, stop = int(self._row_starts[shard]), int(self._row_starts[shard + 1])
        meta = {"row": np.arange(start, stop, dtype=np.int64)}
        if with_metadata:
            rows = self._shard_rows(shard)
            meta.update(token=rows["token"], doc_index=rows["doc_index"], position=rows["position"])
        return activations, meta

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.root)!r}, hooks={self.hooks}, n_rows={self.n_rows}, dtype={self.dtype})"


class _Buffer:
    """Rows waiting to be yielded, with their metadata columns aligned."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.meta: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return 0 if self.x is None else int(self.x.shape[0])

    def append(self, x: torch.Tensor, meta: dict[str, np.ndarray]) -> None:
        if self.x is None:
            self.x, self.meta = x, meta
        else:
            self.x = torch.cat([self.x, x])
            self.meta = {k: np.concatenate([self.meta[k], meta[k]]) for k in self.meta}

    def permute(self, rng: np.random.Generator) -> None:
        if len(self) > 1:
            perm = rng.permutation(len(self))
            self.x = self.x[torch.from_numpy(perm)]
            self.meta = {k: v[perm] for k, v in self.meta.items()}

    def take_batches(self, n: int, batch_size: int, with_metadata: bool) -> Iterator[Any]:
        if n <= 0:
            return
        head, head_meta = self.x[:n], {k: v[:n] for k, v in self.meta.items()}
        self.x, self.meta = self.x[n:], {k: v[n:] for k, v in self.meta.items()}
        for start in range(0, n, batch_size):
            batch = head[start : start + batch_size]
            if with_metadata:
                yield batch, {k: v[start : start + batch_size] for k, v in head_meta.items()}
            else:
                yield batch


# -- validation helpers --------------------------------------------------------------------------


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise LmscopeError(f"activation store {root} does not exist; pass the --out directory of a capture.")
    if not path.is_file():
        raise LmscopeError(f"{root} is not an activation store (it has no {MANIFEST}); pass the --out directory of a capture.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LmscopeError(f"{path} is unreadable ({err}); {_REBUILD}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LmscopeError(f"{path} is not an activation store manifest; pass the --out directory of a capture.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LmscopeError(
            f"{path} has store format version {manifest.get('format_version')!r}; this lmscope reads version {FORMAT_VERSION}, "
            "so upgrade lmscope or recapture."
        )
    for key in ("config", "meta", "complete", "n_rows", "hooks", "shards"):
        if key not in manifest:
            raise LmscopeError(f"{path} lacks the field {key!r}; {_REBUILD}.")
    row = 0
    for number, shard in enumerate(manifest["shards"]):
        try:
            ok = shard["index"] == number and shard["row_start"] == row and shard["row_end"] >= row
            ok = ok and {"file", "bytes", "sha256"} <= set(shard["rows"]) and isinstance(shard["hooks"], dict)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise LmscopeError(f"{path} has a malformed entry for shard {number}; {_REBUILD}.")
        row = shard["row_end"]
    if row != manifest["n_rows"]:
        raise LmscopeError(f"{path} records {manifest['n_rows']} rows but its shards hold {row}; {_REBUILD}.")
    return manifest


def _check_file(root: Path, entry: Mapping[str, Any], expected: dict[str, tuple[str, list[int]]] | None, verify: bool) -> None:
    """Check one listed file: present, recorded size, well-formed safetensors header (if ``expected``), sha256 (if ``verify``)."""
    path = root / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LmscopeError(f"store file {path} is missing; {_REBUILD}.") from None
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "larger than recorded"
        raise LmscopeError(f"store file {path} is {what} ({size} bytes, the manifest records {entry['bytes']}); {_REBUILD}.")
    if expected is not None:
        problem = _header_problem(path, size, expected)
        if problem:
            raise LmscopeError(f"store file {path} is corrupt ({problem}); {_REBUILD}.")
    if verify and sha256_file(path) != entry["sha256"]:
        raise LmscopeError(f"store file {path} does not match its sha256 in the manifest (corrupt); {_REBUILD}.")


def _header_problem(path: Path, size: int, expected: dict[str, tuple[str, list[int]]]) -> str | None:
    """What is wrong with a safetensors file's header, or ``None`` if it holds ``expected`` tensors exactly."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return "shorter than a safetensors header"
            n_header = int.from_bytes(prefix, "little")
            if n_header > size - 8:
                return "header length points past the end of the file"
            header = json.loads(handle.read(n_header))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"unreadable safetensors header: {err}"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    header.pop("__metadata__", None)
    if set(header) != set(expected):
        return f"holds tensors {sorted(header)}, expected {sorted(expected)}"
    end = 0
    for name, (dtype, shape) in expected.items():
        info = header[name] if isinstance(header[name], dict) else {}
        if info.get("dtype") != _SAFETENSORS_DTYPES[dtype] or info.get("shape") != shape:
            return f"tensor {name!r} is {info.get('dtype')} {info.get('shape')}, expected {_SAFETENSORS_DTYPES[dtype]} {shape}"
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return f"tensor {name!r} has no data offsets"
        end = max(end, int(offsets[1]))
    if 8 + n_header + end != size:
        return f"data ends at byte {8 + n_header + end} but the file has {size}"
    return None
