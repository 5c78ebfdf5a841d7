"""Naming a replay source: a mini-suite directory, a ``replay.json`` data layout, or a suite name with flags.

:func:`open_source` takes what the user wrote and returns a :class:`ReplaySource`:

- a **mini suite** directory (``suite.json`` with ``"format": "lmscope-mini-suite"``);
- a directory holding a **replay.json** (or the file itself), which describes where a
  published run's data lies::

      {"format": "pythia", "data": "document"}
      {"format": "olmo", "global_indices": "global_indices.npy", "data": ["part-000-00000.npy", …],
       "batch_size": 2048, "seq_len": 2048, "dtype": "uint16", "eos_token_id": 50279}
      {"format": "amber", "data": "train"}

  Relative paths are relative to the file's directory; keys are the fields of
  :class:`PythiaLayout`, :class:`OlmoLayout` and :class:`AmberLayout`;
- a **suite name** — ``pythia``, ``pythia-deduped``, ``olmo``, ``olmo-2``, ``amber``, or a
  model id of one (``EleutherAI/pythia-160m``) — with the layout's fields given as overrides
  (the CLI's ``--data``, ``--batch-size`` … flags). Overrides also win over ``replay.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmscope.errors import LmscopeError
from lmscope.suites.catalog import AMBER_CHUNKS, AMBER_SEQUENCES_PER_CHUNK
from lmscope.suites.replay.amber import AmberSource
from lmscope.suites.replay.base import ReplaySource
from lmscope.suites.replay.mini import MiniSuiteSource, mini_suite_root
from lmscope.suites.replay.olmo import OlmoSource
from lmscope.suites.replay.pythia import PYTHIA_BATCH_SIZE, PYTHIA_EOS, PYTHIA_SEQ_LEN, PYTHIA_TRAIN_STEPS, PythiaSource

LAYOUT_FILE = "replay.json"


@dataclass
class PythiaLayout:
    """Where Pythia's pre-shuffled data lies."""

    format: ClassVar[str] = "pythia"
    data: list[str] = field(default_factory=list)
    """Megatron path prefixes (``…/document``; or a directory holding ``document.idx``), rows concatenated in order;
    each is read from ``PREFIX.bin`` or its byte shards ``PREFIX-NNNNN-of-LLLLL.bin``."""
    batch_size: int = PYTHIA_BATCH_SIZE
    """Rows per step."""
    seq_len: int = PYTHIA_SEQ_LEN
    """Trained positions per row; rows hold ``seq_len + 1`` tokens."""
    eos_token_id: int | None = PYTHIA_EOS
    """The token ending each document (0 = ``<|endoftext|>``); ``"none"`` leaves rows whole."""
    train_steps: int | None = PYTHIA_TRAIN_STEPS
    """Steps trained (143000); ``null``: as many as the data holds."""

    def open(self) -> PythiaSource:
        _need(self.data, "data", "the Megatron path prefix of the pre-shuffled data (…/document)")
        return PythiaSource(self.data, self.batch_size, self.seq_len, self.eos_token_id, self.train_steps)


@dataclass
class OlmoLayout:
    """Where an OLMo run's data order and token files lie (see :mod:`lmscope.suites.replay.olmo`)."""

    format: ClassVar[str] = "olmo"
    global_indices: str | None = None
    """The epoch's ``global_indices.npy`` (raw uint32, or a NumPy ``.npy``)."""
    data: list[str] = field(default_factory=list)
    """The token files, in the training config's order."""
    batch_size: int | None = None
    """Global batch size in instances (the config's ``global_train_batch_size``); required."""
    seq_len: int = 2048
    """Tokens per instance (the config's ``max_sequence_length``)."""
    dtype: str = "uint16"
    """Token dtype of the files (``memmap_dtype``): uint16 or uint32."""
    indices_dtype: str = "uint32"
    """Dtype of a raw ``global_indices`` file."""
    eos_token_id: int | None = None
    """The token ending each document (50279 for OLMo 1), to cut instances into segments."""
    start_step: int = 0
    """Global step of the first batch in ``global_indices`` (0 for the first epoch)."""

    def open(self) -> OlmoSource:
        _need(self.global_indices, "global_indices", "the run's train_data/global_indices.npy")
        _need(self.data, "data", "the token files of the training config, in order")
        _need(self.batch_size, "batch_size", "the global batch size in instances (e.g. 2048 for OLMo-1B)")
        return OlmoSource(
            self.global_indices,  # type: ignore[arg-type]
            self.data,
            self.batch_size,  # type: ignore[arg-type]
            self.seq_len,
            self.dtype,
            self.indices_dtype,
            self.eos_token_id,
            self.start_step,
        )


@dataclass
class AmberLayout:
    """Where LLM360 Amber's data chunks lie."""

    format: ClassVar[str] = "amber"
    data: list[str] = field(default_factory=list)
    """The directory holding ``train_000.jsonl`` … ``train_359.jsonl`` (one entry)."""
    chunks: int = AMBER_CHUNKS
    """Number of data chunks (steps)."""
    rows_per_chunk: int = AMBER_SEQUENCES_PER_CHUNK
    """Nominal lines per chunk."""
    seq_len: int = 2048
    """Trained positions per row; each line holds ``seq_len + 1`` token ids."""
    eos_token_id: int | None = None
    """The token ending each document, to cut rows into segments; unset (or ``"none"``) leaves rows whole."""

    def open(self) -> AmberSource:
        _need(self.data, "data", "the directory holding train_000.jsonl …")
        if len(self.data) != 1:
            raise LmscopeError(f"Amber data is one directory of chunks, not {len(self.data)} paths; give a single --data DIR.")
        return AmberSource(self.data[0], self.chunks, self.rows_per_chunk, self.seq_len, self.eos_token_id)


Layout = PythiaLayout | OlmoLayout | AmberLayout
LAYOUTS: dict[str, type[PythiaLayout] | type[OlmoLayout] | type[AmberLayout]] = {
    "pythia": PythiaLayout,
    "olmo": OlmoLayout,
    "amber": AmberLayout,
}
_PATH_FIELDS = ("data", "global_indices")
_INT_FIELDS = ("batch_size", "seq_len", "train_steps", "chunks", "rows_per_chunk", "start_step", "eos_token_id")


def _need(value: Any, name: str, what: str) -> None:
    if value is None or value == []:
        flag = "--" + name.replace("_", "-")
        raise LmscopeError(f"the data layout lacks {name}: give {what} with {flag} or in {LAYOUT_FILE}.")


def make_layout(kind: str, values: dict[str, Any], base_dir: Path | None = None, where: str = "the data layout") -> Layout:
    """A layout of ``kind`` (``pythia``, ``olmo``, ``amber``) from a mapping of its fields, validated.

    ``None`` values are left at their defaults; relative paths are taken from ``base_dir``.
    """
    if kind not in LAYOUTS:
        raise LmscopeError(f"{where} has format {kind!r}; known formats are {', '.join(LAYOUTS)}.")
    cls = LAYOUTS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - {"format"})
    if unknown:
        raise LmscopeError(f"{where} sets {', '.join(unknown)}, which a {kind} layout does not have; its fields are {', '.join(sorted(names))}.")
    clean: dict[str, Any] = {}
    for name, value in values.items():
        if name == "format" or value is None:
            continue
        if name == "eos_token_id" and isinstance(value, str) and value.lower() == "none":
            clean[name] = None  # "none": no EOS token, rows are left whole
            continue
        if name in _PATH_FIELDS:
            value = _paths(value, name, base_dir, where)
            if name == "global_indices":
                if len(value) != 1:
                    raise LmscopeError(f"{where}: global_indices is one file, not {len(value)}.")
                value = value[0]
        elif name in _INT_FIELDS:
            lowest = 0 if name in ("start_step", "eos_token_id") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                kind = "a non-negative" if lowest == 0 else "a positive"
                raise LmscopeError(f"{where}: {name} must be {kind} integer, not {value!r}.")
        elif not isinstance(value, str):
            raise LmscopeError(f"{where}: {name} must be a string, not {value!r}.")
        clean[name] = value
    return cls(**clean)


def _paths(value: Any, name: str, base_dir: Path | None, where: str) -> list[str]:
    items = [value] if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(items, list) or not all(isinstance(item, (str, os.PathLike)) for item in items):
        raise LmscopeError(f"{where}: {name} must be a path or a list of paths, not {value!r}.")
    out = []
    for item in items:
        path = Path(item).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        out.append(str(path))
    return out


def read_layout_file(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Layout:
    """The layout a ``replay.json`` describes, with ``overrides`` (non-``None`` values) applied."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmscopeError(f"data layout file {str(path)!r} does not exist; check the path.") from None
    except json.JSONDecodeError as err:
        raise LmscopeError(f"{path}:{err.lineno} is not valid JSON ({err.msg}); fix the file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LmscopeError(f"data layout file {str(path)!r} could not be read ({err}).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("format"), str):
        raise LmscopeError(f"{path} must hold a JSON object with a \"format\": one of {', '.join(LAYOUTS)}.")
    layout = make_layout(raw["format"], raw, path.parent, where=str(path))
    return _override(layout, overrides or {}, where=str(path))


def _override(layout: Layout, overrides: dict[str, Any], where: str) -> Layout:
    given = {name: value for name, value in overrides.items() if value is not None and value != []}
    if not given:
        return layout
    patch = make_layout(layout.format, given, None, where=f"the options given with {where}")
    return dataclasses.replace(layout, **{name: getattr(patch, name) for name in given})


_SUITE_FORMATS = {"pythia": "pythia", "pythia-deduped": "pythia", "olmo": "olmo", "olmo-2": "olmo", "amber": "amber"}


def open_source(suite: str | os.PathLike[str], **overrides: Any) -> ReplaySource:
    """The replay source ``suite`` names (see the module docstring); ``overrides`` set layout fields.

    Raises :class:`LmscopeError` when ``suite`` is none of the accepted forms, when overrides are given
    for a mini suite, or when the layout is incomplete or its files are missing or malformed.
    """
    given = {name: value for name, value in overrides.items() if value is not None and value != []}
    text = os.fspath(suite)
    path = Path(text).expanduser()
    mini = mini_suite_root(path) if path.is_dir() and not (path / LAYOUT_FILE).is_file() else None
    if mini is not None:
        if given:
            raise LmscopeError(
                f"{text!r} is a mini suite, which describes its own data; drop {', '.join('--' + n.replace('_', '-') for n in sorted(given))}."
            )
        return MiniSuiteSource(mini)
    if path.is_dir() and (path / LAYOUT_FILE).is_file():
        return read_layout_file(path / LAYOUT_FILE, given).open()
    if path.is_file() and path.suffix == ".json":
        return read_layout_file(path, given).open()
    kind = _SUITE_FORMATS.get(text.lower())
    if kind is None and text.count("/") == 1 and not path.exists():
        from lmscope.suites.catalog import catalog_suite

        found = catalog_suite(text)
        kind = found.family if found is not None else None
    if kind is not None:
        return make_layout(kind, given, Path.cwd(), where=f"the {text} data layout").open()
    if path.is_dir() and (path / "suite.json").is_file():
        raise LmscopeError(f"{text!r} has a suite.json that is not a mini suite's (no \"format\": \"lmscope-mini-suite\"); check the directory.")
    if path.is_dir():
        raise LmscopeError(
            f"{text!r} is neither a mini suite (suite.json) nor a directory with a {LAYOUT_FILE} data layout; write one, "
            "or name the suite (pythia, olmo, amber) and give its data with --data."
        )
    raise LmscopeError(
        f"{text!r} names no replay source: give a mini-suite directory, a directory holding {LAYOUT_FILE}, or a suite "
        "name (pythia, pythia-deduped, olmo, olmo-2, amber) with --data PATH."
    )
