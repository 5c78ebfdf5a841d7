"""Building a suffix-array index over a tokenized corpus, shard by shard, resumably (see :mod:`lmscope.index`)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

import lmscope
from lmscope.data.tokenized import TokenizedCorpus, is_tokenized_corpus
from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_directory, atomic_path, atomic_write_json, directory_lock
from lmscope.index.layout import (
    DEFAULT_SHARD_TOKENS,
    DOC_STARTS_FILE,
    DOCUMENTS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SUFFIX_ARRAY_FILE,
    TOKENS_FILE,
    ShardInfo,
    corpus_identity,
    corpus_vocab_size,
    read_manifest,
    shard_name,
    stream_dtype,
)
from lmscope.index.suffix_array import suffix_array, suffix_array_width, write_suffix_array
from lmscope.progress import Progress, no_progress

SUFFIX_ARRAY_METHOD = (
    "libdivsufsort (pydivsufsort) over the stream as big-endian bytes, keeping the suffixes that start on a token boundary; "
    "suffixes ordered by token id, a proper prefix first"
)


@dataclass
class BuildReport:
    """What :func:`build_index` did.

    Attributes:
        path: the index directory.
        manifest: the finished index manifest.
        shards_built: shards built by this call.
        shards_resumed: shards a previous, interrupted call had finished.
        seconds: wall time of this call.
        bytes: bytes of every file in the index.
    """

    path: Path
    manifest: dict[str, Any]
    shards_built: int
    shards_resumed: int
    seconds: float
    bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.manifest["corpus"]["n_tokens"], 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "n_documents": self.manifest["corpus"]["n_documents"],
            "n_tokens": self.manifest["corpus"]["n_tokens"],
            "shards": len(self.manifest["shards"]),
            "shards_built": self.shards_built,
            "shards_resumed": self.shards_resumed,
            "bytes": self.bytes,
            "bytes_per_token": round(self.bytes_per_token, 4),
            "seconds": round(self.seconds, 3),
            "stream_dtype": self.manifest["stream_dtype"],
            "separator": self.manifest["separator"],
        }


def open_corpus(corpus: str | os.PathLike[str] | TokenizedCorpus) -> TokenizedCorpus:
    """A tokenized corpus from itself, its directory, or a mini-suite directory (whose ``corpus/`` it opens)."""
    if isinstance(corpus, TokenizedCorpus):
        return corpus
    path = Path(corpus).expanduser()
    if not is_tokenized_corpus(path):
        from lmscope.suites.replay.mini import CORPUS_DIR, mini_suite_root

        suite = mini_suite_root(path) if path.is_dir() else None
        if suite is not None:
            return TokenizedCorpus.open(suite / CORPUS_DIR)
    return TokenizedCorpus.open(path)


def plan_shards(lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Cut documents (their token counts, in corpus order) into consecutive ``[start, stop)`` ranges of at most ``shard_tokens`` tokens.

    A document longer than ``shard_tokens`` gets a shard of its own.
    """
    bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    ranges, start = [], 0
    while start < len(lengths):
        stop = int(np.searchsorted(bounds, bounds[start] + shard_tokens, side="right")) - 1
        stop = min(max(stop, start + 1), len(lengths))
        ranges.append((start, stop))
        start = stop
    return ranges


def build_index(
    corpus: str | os.PathLike[str] | TokenizedCorpus,
    out_dir: str | os.PathLike[str],
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: Progress = no_progress,
) -> BuildReport:
    """Build (or finish building) the suffix-array index of a tokenized corpus in ``out_dir``.

    Args:
        corpus: a tokenized corpus, its directory, or a mini-suite directory (its ``corpus/``).
        out_dir: the index directory; must be new, empty, or an unfinished index of the same corpus
            built with the same ``shard_tokens`` (then only the missing shards are built).
        shard_tokens: at most this many corpus tokens per shard (a longer document gets a shard of
            its own). Building a shard takes about 16 bytes of memory per token (uint16 corpora).
        progress: receives ``("index shards", shards_done, n_shards)`` after every shard.
    """
    started = time.perf_counter()
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, (int, np.integer)) or shard_tokens <= 0:
        raise LmscopeError(f"--shard-tokens {shard_tokens!r} is not a positive number of tokens; give e.g. {DEFAULT_SHARD_TOKENS}.")
    shard_tokens = int(shard_tokens)
    source = open_corpus(corpus)
    if len(source) == 0:
        raise LmscopeError(f"corpus {str(source.path)!r} holds no documents; tokenize some documents before indexing it.")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LmscopeError(f"--out {str(out)!r} is a file; give a directory for the index.")
    vocab_size = corpus_vocab_size(source)
    dtype, separator = stream_dtype(source, vocab_size)
    lengths = source.documents.column("n_tokens").to_numpy().astype(np.int64)
    offsets = source.documents.column("token_offset").to_numpy().astype(np.int64)
    shards = []
    for k, (start, stop) in enumerate(plan_shards(lengths, shard_tokens)):
        n_tokens = int(lengths[start:stop].sum())
        n_positions = n_tokens + (stop - start)
        shards.append(ShardInfo(shard_name(k), start, stop, n_tokens, n_positions, suffix_array_width(n_positions)))
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lmscope_version": lmscope.__version__,
        "corpus": {
            "path": str(source.path.resolve()),
            "identity": corpus_identity(source),
            "n_documents": len(source),
            "n_tokens": source.n_tokens,
            "dtype": source.manifest.get("dtype"),
            "tokenizer": source.manifest.get("tokenizer"),
        },
        "vocab_size": vocab_size,
        "stream_dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "separator": separator,
        "shard_tokens": shard_tokens,
        "suffix_array": SUFFIX_ARRAY_METHOD,
        "shards": [shard.to_dict() for shard in shards],
        "finished": [],
        "complete": False,
    }
    with directory_lock(out):
        existing = read_manifest(out)
        if existing is None:
            _check_empty(out)
        else:
            _check_resumable(out, existing, manifest)
            manifest["finished"] = [s.name for s in shards if s.name in existing.get("finished", []) and (out / s.name).is_dir()]
        _remove_temporaries(out)
        if not (out / DOCUMENTS_FILE).is_file():
            table = source.documents.select(["doc_index", "id", "domain", "split"])
            with atomic_path(out / DOCUMENTS_FILE) as tmp:
                pq.write_table(table, tmp, compression="zstd")
        atomic_write_json(out / MANIFEST_FILE, manifest)
        done = set(manifest["finished"])
        resumed = len(done)
        progress("index shards", resumed, len(shards))
        for shard in shards:
            if shard.name in done:
                continue
            _build_shard(source, out / shard.name, shard, offsets, dtype, separator, vocab_size)
            manifest["finished"] = [s.name for s in shards if s.name in done or s.name == shard.name]
            done.add(shard.name)
            manifest["complete"] = len(done) == len(shards)
            atomic_write_json(out / MANIFEST_FILE, manifest)
            progress("index shards", 1, len(shards), tokens=shard.n_tokens)
        if not manifest["complete"]:  # every shard was already finished, but the flag was not yet written
            manifest["complete"] = True
            atomic_write_json(out / MANIFEST_FILE, manifest)
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file() and path.name != ".lock")
    return BuildReport(out, manifest, len(shards) - resumed, resumed, time.perf_counter() - started, size)


def _check_empty(out: Path) -> None:
    stray = sorted(path.name for path in out.iterdir() if path.name != ".lock" and not _is_temporary(path.name))
    if stray:
        raise LmscopeError(
            f"--out {str(out)!r} already holds files ({', '.join(stray[:3])}{' …' if len(stray) > 3 else ''}) but no index manifest; "
            "choose a new directory for the index."
        )


def _check_resumable(out: Path, existing: dict[str, Any], planned: dict[str, Any]) -> None:
    have, want = existing.get("corpus") or {}, planned["corpus"]
    if have.get("identity") != want["identity"]:
        raise LmscopeError(
            f"--out {str(out)!r} holds an index of another corpus ({have.get('path')!r}), not of {want['path']!r}; "
            "choose a new directory, or remove the old index first."
        )
    if existing.get("shard_tokens") != planned["shard_tokens"]:
        raise LmscopeError(
            f"--out {str(out)!r} holds an index built with --shard-tokens {existing.get('shard_tokens')}; rerun with that value to resume, "
            "or choose a new directory."
        )
    if existing.get("shards") != planned["shards"] or existing.get("separator") != planned["separator"]:
        raise LmscopeError(
            f"--out {str(out)!r} holds an index whose shard plan differs from this lmscope's; remove it and build the index again."
        )


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _remove_temporaries(out: Path) -> None:
    """Remove what a killed build left half-written (atomic writes leave only hidden ``.…tmp`` names)."""
    for path in out.iterdir():
        if _is_temporary(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _build_shard(
    corpus: TokenizedCorpus,
    target: Path,
    shard: ShardInfo,
    offsets: np.ndarray,
    dtype: np.dtype,
    separator: int,
    vocab_size: int,
) -> None:
    """Write one shard directory: its stream, suffix array and document starts, renamed into place whole."""
    first = int(offsets[shard.doc_start])
    tokens = np.asarray(corpus.tokens[first : first + shard.n_tokens])
    if len(tokens) and int(tokens.max()) >= vocab_size:
        bad = int(np.flatnonzero(tokens >= vocab_size)[0]) + first
        raise LmscopeError(
            f"corpus {str(corpus.path)!r} holds token id {int(corpus.tokens[bad])} at position {bad}, outside its vocabulary of "
            f"{vocab_size} ids; re-tokenize the corpus."
        )
    relative = offsets[shard.doc_start : shard.doc_stop] - first
    stream = np.insert(tokens.astype(dtype, copy=False), relative, np.asarray(separator, dtype=dtype))
    del tokens
    starts = (relative + np.arange(1, len(relative) + 1, dtype=np.int64)).astype("<u8")
    if len(stream) != shard.n_positions:  # pragma: no cover - the plan and the corpus disagree
        raise LmscopeError(f"shard {shard.name} has {len(stream)} positions, not the {shard.n_positions} planned; rebuild the index.")
    positions = suffix_array(stream)
    if target.exists():  # finished by a build killed before it could record it: build it again
        shutil.rmtree(target)
    with atomic_directory(target) as tmp:
        stream.tofile(tmp / TOKENS_FILE)
        del stream
        write_suffix_array(tmp / SUFFIX_ARRAY_FILE, positions, shard.sa_width)
        starts.tofile(tmp / DOC_STARTS_FILE)
