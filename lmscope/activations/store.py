"""Write activations at named hook points into a sharded, resumable on-disk store.

Layout of a store directory::

    manifest.json                       the commit point: config, hooks, every finished shard
    rows/shard_00000.safetensors        per-row index: token, doc_index, position, context
    <hook>/shard_00000.safetensors      "activations" [rows, *row_shape] for that hook
    documents.parquet                   doc_index -> caller's columns (id, domain), when given
    .lock                               held while a writer runs

A row is one valid token position (BOS included, padding excluded); rows are the
contexts' valid positions in order, context by context, position by position.

Shard ``k`` always holds the same contexts: shards are cut at batch boundaries,
closing after the batch that brings them to ``shard_tokens`` rows or more, and
batches are ``batch_size`` consecutive contexts. Each shard's files are written
atomically, then the manifest is rewritten atomically to list it; a shard exists
for readers only once the manifest lists it. A rerun with the same arguments
checks every listed shard's sha256, recomputes from the first damaged one, checks
that the contexts of the kept shards hash to what was recorded, deletes files no
manifest lists, and carries on: the result equals an uninterrupted run.

See :func:`write_activations` for the manifest schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from lmscope import __version__
from lmscope.activations.contexts import Context
from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path, atomic_write_bytes, atomic_write_json, sha256_file
from lmscope.progress import Progress, no_progress

FORMAT = "lmscope.activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROWS_DIR = "rows"
DOCUMENTS_FILE = "documents.parquet"
LOCK_FILE = ".lock"
ACTIVATIONS_KEY = "activations"
ROW_COLUMNS: dict[str, str] = {"token": "int32", "doc_index": "int64", "position": "int32", "context": "int64"}

STORE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

# Hooks whose tensors are not per-token rows ([batch, heads, q, k]).
_UNSTORABLE_SUFFIXES = ("hook_pattern", "hook_attn_scores")
_HOOK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_SHARD_FILE = re.compile(r"^shard_(\d+)\.safetensors$")

Capture = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
"""Runs the model on ``LongTensor[batch, ctx_len]`` and returns ``{hook: Tensor[batch, ctx_len, ...]}``."""


def canonical_dtype(dtype: str) -> str:
    """``float32``, ``float16`` or ``bfloat16`` for a dtype name or alias; LmscopeError otherwise."""
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in STORE_DTYPES:
        raise LmscopeError(f"unknown activation dtype {dtype!r}; use one of {', '.join(STORE_DTYPES)}.")
    return name


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def config_sha256(config: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """Hash of everything that determines a store's contents (writer arguments and caller meta)."""
    text = json.dumps({"format_version": FORMAT_VERSION, "config": config, "meta": meta}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_activations(
    capture: Capture,
    contexts: Iterable[Context],
    hooks: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    shard_tokens: int = 16384,
    dtype: str = "float32",
    meta: Mapping[str, Any] | None = None,
    documents: Mapping[int, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    total_tokens: int | None = None,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Run ``capture`` over ``contexts`` and store the activations of ``hooks`` in ``out_dir``; resumable.

    Args:
        capture: called with ``LongTensor[b, ctx_len]`` (CPU) under ``torch.no_grad``; returns a
            mapping holding, for every hook, a tensor ``[b, ctx_len, ...]`` on any device.
        contexts: the model inputs, in order (see :func:`lmscope.activations.contexts.iter_contexts`);
            all of the same length. A rerun must pass the same contexts.
        hooks: hook names to store (TransformerLens names); attention patterns are refused.
        out_dir: the store directory: new, empty, or a store written with the same arguments (resumed).
        batch_size: contexts per ``capture`` call.
        shard_tokens: a shard closes after the batch that brings it to this many rows or more.
        dtype: storage dtype, ``float32``, ``float16`` or ``bfloat16``.
        meta: JSON-serialisable description of the run (model spec, revision, corpus, budget...);
            written to the manifest and part of the config hash: a rerun with different meta is refused.
        documents: ``doc_index -> {column: value}`` (e.g. ``{"id": ..., "domain": ...}``), read once all
            contexts are consumed; the rows' documents are written to ``documents.parquet``.
        overwrite: replace an existing store in ``out_dir`` instead of resuming it.
        total_tokens: expected number of rows, for the progress bar only.
        progress: progress callback (task ``"capture activations"``, unit: rows).

    Returns:
        The final manifest::

            format, format_version          "lmscope.activations", 1
            written_by                      lmscope version of the last writer
            config_sha256                   sha256 of {format_version, config, meta}
            config                          {hooks, dtype, batch_size, shard_tokens}
            meta                            the caller's meta, verbatim
            complete                        true once every context is stored
            ctx_len, n_rows, n_contexts     totals over the listed shards
            hooks                           {hook: {dir, dtype, row_shape, d, shape}}; d = values per row
            row_index                       {dir: "rows", columns: {token, doc_index, position, context}}
            shards                          [{index, row_start, row_end, context_start, context_end,
                                              contexts_sha256, rows: {file, bytes, sha256},
                                              hooks: {hook: {file, bytes, sha256}}}]
            documents                       {file, bytes, sha256, n_documents, columns} or null
    """
    hooks = _check_hooks(hooks)
    dtype = canonical_dtype(dtype)
    if batch_size < 1:
        raise LmscopeError(f"batch size {batch_size} must be at least 1.")
    if shard_tokens < 1:
        raise LmscopeError(f"shard_tokens={shard_tokens} must be at least 1.")
    meta = _json_roundtrip(dict(meta or {}))
    config = {"hooks": hooks, "dtype": dtype, "batch_size": int(batch_size), "shard_tokens": int(shard_tokens)}
    digest = config_sha256(config, meta)

    root = Path(out_dir)
    _refuse_foreign_directory(root)  # before the lock file is created in it
    with _writer_lock(root):
        manifest = _open_for_writing(root, config, meta, digest, overwrite, progress)
        return _StoreWriter(root, manifest, capture, documents, total_tokens, progress).run(iter(contexts))


class _StoreWriter:
    """The write loop of one :func:`write_activations` call."""

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        capture: Capture,
        documents: Mapping[int, Mapping[str, Any]] | None,
        total_tokens: int | None,
        progress: Progress,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.capture = capture
        self.documents = documents
        self.total_tokens = total_tokens
        self.progress = progress
        self.hooks: list[str] = manifest["config"]["hooks"]
        self.dtype = STORE_DTYPES[manifest["config"]["dtype"]]
        self.batch_size: int = manifest["config"]["batch_size"]
        self.shard_tokens: int = manifest["config"]["shard_tokens"]
        self.doc_indices: set[int] = set()

    def run(self, contexts: Iterator[Context]) -> dict[str, Any]:
        self._skip_stored(contexts)
        if self.manifest["complete"]:
            if next(contexts, None) is not None:
                raise self._contexts_differ("more contexts than the finished store holds")
            if self.documents is not None and self.manifest["documents"] is None:
                self._finish()
            return self.manifest
        self._capture_rest(contexts)
        if self.manifest["n_rows"] == 0:
            raise LmscopeError("the contexts yielded no tokens to capture; check the corpus split and the token budget.")
        self._finish()
        return self.manifest

    # -- resume --------------------------------------------------------------------------------

    def _skip_stored(self, contexts: Iterator[Context]) -> None:
        """Consume the contexts of the shards already stored, checking they are the same contexts."""
        for shard in self.manifest["shards"]:
            digest = hashlib.sha256()
            n_rows = 0
            for _ in range(shard["context_end"] - shard["context_start"]):
                context = next(contexts, None)
                if context is None:
                    raise self._contexts_differ(f"fewer contexts than shard {shard['index']} was written from")
                self._check_length(context)
                context.update_hash(digest)
                n_rows += context.n_valid
                self._note_documents(context)
            if digest.hexdigest() != shard["contexts_sha256"] or n_rows != shard["row_end"] - shard["row_start"]:
                raise self._contexts_differ(f"shard {shard['index']} was written from other contexts")
            self.progress("capture activations", shard["row_end"] - shard["row_start"], self.total_tokens, shard=shard["index"])

    def _contexts_differ(self, what: str) -> LmscopeError:
        return LmscopeError(
            f"{self.root} holds activations of different contexts ({what}) although the arguments match; "
            "use a new --out or --overwrite to replace it."
        )

    # -- capture -------------------------------------------------------------------------------

    def _capture_rest(self, contexts: Iterator[Context]) -> None:
        shards = self.manifest["shards"]
        row_start = shards[-1]["row_end"] if shards else 0
        context_start = shards[-1]["context_end"] if shards else 0
        pending = _PendingShard(len(shards), row_start, context_start, self.hooks)
        while batch := list(islice(contexts, self.batch_size)):
            for context in batch:
                self._check_length(context)
                self._note_documents(context)
            activations = self._run_batch(batch)
            pending.add(batch, activations)
            self.progress("capture activations", sum(c.n_valid for c in batch), self.total_tokens, shard=pending.index)
            if pending.n_rows >= self.shard_tokens:
                self._commit(pending)
                pending = _PendingShard(pending.index + 1, pending.row_end, pending.context_end, self.hooks)
        if pending.n_contexts:
            self._commit(pending)

    def _run_batch(self, batch: list[Context]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack([c.tokens for c in batch]).astype(np.int64, copy=False))
        valid = torch.from_numpy(np.stack([np.arange(len(c)) < c.n_valid for c in batch]))
        with torch.no_grad():
            outputs = self.capture(ids)
        if not isinstance(outputs, Mapping):
            raise LmscopeError(f"the capture function returned {type(outputs).__name__}; it must return a dict of hook name -> tensor.")
        rows: dict[str, torch.Tensor] = {}
        for hook in self.hooks:
            if hook not in outputs:
                raise LmscopeError(
                    f"the capture returned no tensor for hook {hook!r}; it returned {', '.join(sorted(map(str, outputs))) or 'nothing'}."
                )
            tensor = outputs[hook]
            if not isinstance(tensor, torch.Tensor):
                raise LmscopeError(f"the capture returned {type(tensor).__name__} for hook {hook!r}; it must return tensors.")
            if tensor.ndim < 3 or tuple(tensor.shape[:2]) != tuple(ids.shape):
                raise LmscopeError(
                    f"hook {hook!r} gave a tensor of shape {tuple(tensor.shape)} for input {tuple(ids.shape)}; "
                    "the store holds per-token activations shaped [batch, pos, ...]."
                )
            tensor = tensor.detach().to(self.dtype).cpu()[valid]
            self._check_row_shape(hook, tuple(tensor.shape[1:]))
            rows[hook] = tensor
        return rows

    def _check_length(self, context: Context) -> None:
        ctx_len = self.manifest["ctx_len"]
        if ctx_len is None:
            self.manifest["ctx_len"] = len(context)
        elif len(context) != ctx_len:
            raise LmscopeError(f"a context has {len(context)} tokens but the store's contexts have {ctx_len}; pass contexts of one length.")

    def _check_row_shape(self, hook: str, row_shape: tuple[int, ...]) -> None:
        info = self.manifest["hooks"].get(hook)
        if info is None:
            self.manifest["hooks"][hook] = {
                "dir": hook,
                "dtype": self.manifest["config"]["dtype"],
                "row_shape": list(row_shape),
                "d": int(np.prod(row_shape)),
                "shape": [0, *row_shape],
            }
        elif tuple(info["row_shape"]) != row_shape:
            raise LmscopeError(
                f"hook {hook!r} now gives rows of shape {row_shape} but the store holds {tuple(info['row_shape'])}; "
                "use a new --out or --overwrite."
            )

    def _note_documents(self, context: Context) -> None:
        if self.documents is not None:
            self.doc_indices.update(np.unique(context.doc_index[: context.n_valid]).tolist())

    # -- commit --------------------------------------------------------------------------------

    def _commit(self, pending: "_PendingShard") -> None:
        """Write one shard's files atomically, then list it in the manifest (the commit point)."""
        name = shard_name(pending.index)
        header = {"shard": pending.index, "row_start": pending.row_start, "row_end": pending.row_end,
                  "config_sha256": self.manifest["config_sha256"]}
        entry: dict[str, Any] = {
            "index": pending.index,
            "row_start": pending.row_start,
            "row_end": pending.row_end,
            "context_start": pending.context_start,
            "context_end": pending.context_end,
            "contexts_sha256": pending.digest.hexdigest(),
        }
        entry["rows"] = _write_tensors(self.root, f"{ROWS_DIR}/{name}", pending.row_index(), {**header, "content": "rows"})
        entry["hooks"] = {
            hook: _write_tensors(self.root, f"{hook}/{name}", {ACTIVATIONS_KEY: pending.activations(hook)}, {**header, "hook": hook})
            for hook in self.hooks
        }
        self.manifest["shards"].append(entry)
        self._update_totals()
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def _update_totals(self) -> None:
        shards = self.manifest["shards"]
        n_rows = shards[-1]["row_end"] if shards else 0
        self.manifest["n_rows"] = n_rows
        self.manifest["n_contexts"] = shards[-1]["context_end"] if shards else 0
        for info in self.manifest["hooks"].values():
            info["shape"] = [n_rows, *info["row_shape"]]

    def _finish(self) -> None:
        if self.documents is not None:
            self.manifest["documents"] = self._write_documents()
        self.manifest["complete"] = True
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def _write_documents(self) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        indices = sorted(self.doc_indices)
        records = []
        for doc_index in indices:
            if doc_index not in self.documents:
                raise LmscopeError(
                    f"the document table has no entry for doc_index {doc_index}, which the contexts use; pass a complete table."
                )
            records.append(dict(self.documents[doc_index]))
        columns = sorted({key for record in records for key in record})
        table = pa.table({"doc_index": pa.array(indices, pa.int64()), **{c: [r.get(c) for r in records] for c in columns}})
        path = self.root / DOCUMENTS_FILE
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return {"file": DOCUMENTS_FILE, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                "n_documents": len(indices), "columns": ["doc_index", *columns]}


class _PendingShard:
    """Rows of the shard being filled, kept in memory until it is committed."""

    def __init__(self, index: int, row_start: int, context_start: int, hooks: Sequence[str]) -> None:
        self.index = index
        self.row_start = row_start
        self.context_start = context_start
        self.n_rows = 0
        self.n_contexts = 0
        self.digest = hashlib.sha256()
        self._columns: dict[str, list[np.ndarray]] = {name: [] for name in ROW_COLUMNS}
        self._activations: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}

    @property
    def row_end(self) -> int:
        return self.row_start + self.n_rows

    @property
    def context_end(self) -> int:
        return self.context_start + self.n_contexts

    def add(self, batch: list[Context], activations: Mapping[str, torch.Tensor]) -> None:
        for context in batch:
            n = context.n_valid
            context.update_hash(self.digest)
            self._columns["token"].append(context.tokens[:n].astype(np.int32))
            self._columns["doc_index"].append(context.doc_index[:n].astype(np.int64))
            self._columns["position"].append(context.position[:n].astype(np.int32))
            self._columns["context"].append(np.full(n, self.context_end, dtype=np.int64))
            self.n_contexts += 1
            self.n_rows += n
        for hook, tensor in activations.items():
            self._activations[hook].append(tensor)

    def row_index(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.concatenate(parts)) for name, parts in self._columns.items()}

    def activations(self, hook: str) -> torch.Tensor:
        return torch.cat(self._activations[hook]).contiguous()


def _write_tensors(root: Path, relative: str, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> dict[str, Any]:
    """Write a safetensors file atomically; return its manifest entry ``{file, bytes, sha256}``."""
    # One metadata key: safetensors writes a metadata map in arbitrary order, a single key keeps bytes reproducible.
    data = save_safetensors(tensors, metadata={"lmscope": json.dumps(header, sort_keys=True)})
    atomic_write_bytes(root / relative, data)
    return {"file": relative, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- opening a directory for writing -------------------------------------------------------------


def _check_hooks(hooks: Sequence[str]) -> list[str]:
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(hooks)
    if not hooks:
        raise LmscopeError("no hooks were given; name at least one hook point, e.g. blocks.0.hook_resid_post.")
    if len(set(hooks)) != len(hooks):
        raise LmscopeError(f"hooks {hooks} name the same hook twice; list each hook once.")
    for hook in hooks:
        if hook.endswith(_UNSTORABLE_SUFFIXES):
            raise LmscopeError(
                f"hook {hook!r} is an attention pattern [batch, heads, q, k], not per-token rows; "
                "store a per-token hook such as hook_z instead."
            )
        if not _HOOK_NAME.match(hook) or hook == ROWS_DIR:
            raise LmscopeError(
                f"hook name {hook!r} cannot name a store directory; use TransformerLens hook names such as blocks.0.hook_resid_post."
            )
    return hooks


def _json_roundtrip(meta: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(meta, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise LmscopeError(f"the run metadata is not JSON-serialisable ({err}); pass strings, numbers, lists and dicts.") from None


class _writer_lock:
    """An exclusive lock on ``root/.lock`` for the duration of a write (released by the OS if killed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.handle: Any = None

    def __enter__(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise LmscopeError(f"{self.root} is a file, not a directory; choose a directory for --out.")
        self.root.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.root / LOCK_FILE, "a+b")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise LmscopeError(f"another process is writing activations into {self.root}; wait for it or choose a new --out.") from None

    def __exit__(self, *exc: object) -> None:
        self.handle.close()  # closing releases the flock


def _is_scratch(name: str) -> bool:
    """Files a writer may leave behind without a manifest: the lock and temporary files."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp"))


def _new_manifest(config: dict[str, Any], meta: dict[str, Any], digest: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "written_by": f"lmscope {__version__}",
        "config_sha256": digest,
        "config": config,
        "meta": meta,
        "complete": False,
        "ctx_len": None,
        "n_rows": 0,
        "n_contexts": 0,
        "hooks": {},
        "row_index": {"dir": ROWS_DIR, "columns": dict(ROW_COLUMNS)},
        "shards": [],
        "documents": None,
    }


def _open_for_writing(
    root: Path, config: dict[str, Any], meta: dict[str, Any], digest: str, overwrite: bool, progress: Progress
) -> dict[str, Any]:
    """Return the manifest to continue from: a new one, or the verified part of an existing store."""
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        _refuse_foreign_directory(root)
        return _start_fresh(root, config, meta, digest)
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LmscopeError(
            f"{manifest_path} is unreadable ({err}), so {root} is not a store that can be resumed or overwritten; "
            "choose a new --out, or delete the directory to start over."
        ) from None
    if old.get("format") != FORMAT:
        raise LmscopeError(f"{root} holds a manifest.json that is not an activation store's; choose a new or empty --out.")
    if overwrite or not (old.get("shards") or old.get("complete")):  # a store without shards holds nothing to keep
        shutil.rmtree(root / ROWS_DIR, ignore_errors=True)
        for hook in old.get("config", {}).get("hooks", []):
            if _HOOK_NAME.match(str(hook)) and hook != ROWS_DIR:
                shutil.rmtree(root / hook, ignore_errors=True)
        (root / DOCUMENTS_FILE).unlink(missing_ok=True)
        _remove_scratch(root)
        manifest_path.unlink()
        return _start_fresh(root, config, meta, digest)
    if old.get("format_version") != FORMAT_VERSION or old.get("config_sha256") != digest:
        differ = _differences(old, config, meta)
        raise LmscopeError(
            f"{root} holds activations written with different arguments ({differ}); "
            "use a new --out, or --overwrite to replace them."
        )
    return _verify_for_resume(root, old, progress)


def _refuse_foreign_directory(root: Path) -> None:
    """LmscopeError unless ``root`` is absent, empty (but for scratch files) or holds a store manifest."""
    if not root.is_dir() or (root / MANIFEST).exists():
        return
    others = sorted(p.name for p in root.iterdir() if not _is_scratch(p.name))
    if others:
        raise LmscopeError(
            f"{root} is not empty and holds no activation store ({others[0]!r} and {len(others) - 1} more entries); "
            "choose a new or empty --out."
        )


def _start_fresh(root: Path, config: dict[str, Any], meta: dict[str, Any], digest: str) -> dict[str, Any]:
    manifest = _new_manifest(config, meta, digest)
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def _differences(old: dict[str, Any], config: dict[str, Any], meta: dict[str, Any]) -> str:
    if old.get("format_version") != FORMAT_VERSION:
        return f"store format {old.get('format_version')} vs {FORMAT_VERSION}"
    old_config, old_meta = old.get("config") or {}, old.get("meta") or {}
    keys = [k for k in sorted(set(old_config) | set(config)) if old_config.get(k) != config.get(k)]
    keys += [f"meta.{k}" for k in sorted(set(old_meta) | set(meta)) if old_meta.get(k) != meta.get(k)]
    return "differs in " + ", ".join(keys) if keys else "config hash differs"


def _verify_for_resume(root: Path, manifest: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Keep the longest prefix of listed shards whose files are intact; delete every unlisted file."""
    shards = manifest.get("shards", [])
    total = len(shards)
    kept: list[dict[str, Any]] = []
    for shard in shards:
        files = [shard["rows"], *shard["hooks"].values()]
        if not all(_file_intact(root, entry) for entry in files):
            break
        kept.append(shard)
        progress("verify stored shards", 1, total)
    documents = manifest.get("documents")
    if manifest.get("complete") and documents is not None and not _file_intact(root, documents):
        manifest["complete"] = False
    if len(kept) < total or not manifest.get("complete"):
        manifest["shards"] = kept
        manifest["complete"] = False
        manifest["documents"] = None
        n_rows = kept[-1]["row_end"] if kept else 0
        manifest["n_rows"] = n_rows
        manifest["n_contexts"] = kept[-1]["context_end"] if kept else 0
        for info in manifest["hooks"].values():
            info["shape"] = [n_rows, *info["row_shape"]]
        atomic_write_json(root / MANIFEST, manifest)
    if not manifest["complete"]:
        _remove_unlisted(root, manifest)
    manifest["written_by"] = f"lmscope {__version__}"
    return manifest


def _file_intact(root: Path, entry: Mapping[str, Any]) -> bool:
    path = root / entry["file"]
    try:
        return path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]
    except OSError:
        return False


def _remove_unlisted(root: Path, manifest: dict[str, Any]) -> None:
    """Delete shard files past the listed ones, a stale document table and temporary files."""
    n_listed = len(manifest["shards"])
    for directory in [ROWS_DIR, *manifest["config"]["hooks"]]:
        folder = root / directory
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _SHARD_FILE.match(path.name)
            if (match and int(match.group(1)) >= n_listed) or _is_scratch(path.name):
                path.unlink(missing_ok=True)
    (root / DOCUMENTS_FILE).unlink(missing_ok=True)
    _remove_scratch(root)


def _remove_scratch(root: Path) -> None:
    for path in root.iterdir():
        if path.is_file() and path.name != LOCK_FILE and _is_scratch(path.name):
            path.unlink(missing_ok=True)
