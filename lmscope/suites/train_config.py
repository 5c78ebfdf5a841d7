"""What a mini suite is: the typed config of ``lmscope suite train``, read from TOML.

One :class:`SuiteTrainConfig` feeds the CLI, the TOML file and the API. Its defaults
*are* the default suite (``configs/suite-default.toml`` spells them out). A TOML file
holds the fields at top level or under ``[suite]``, and one ``[[sizes]]`` (or
``[[suite.sizes]]``) table per model size::

    name = "mini"
    corpus = "docs.jsonl.zst"
    steps = 256
    seeds = [0, 1]

    [[sizes]]
    label = "s"
    hidden_size = 32
    num_layers = 2
    heads = 2

Unknown keys, values of the wrong type and impossible combinations are refused up
front with one sentence naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError
from lmscope.tomlio import toml_value

RESERVED_NAMES = frozenset({"tokenizer", "corpus", "data", "checkpoints", "resume"})
"""Directory names inside a suite directory that a size label may not take."""

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")


@dataclass
class ModelSize:
    """One model size of the suite: a ``transformers`` ``GPTNeoXForCausalLM`` with Pythia's architecture.

    Pythia's choices are fixed for every size: parallel attention and MLP residual, rotary
    embeddings on a quarter of each head's dimensions, GeLU, untied input and output
    embeddings, LayerNorm, no dropout.
    """

    label: str
    """Name of the size: its directory in the suite (``SUITE_DIR/<label>``) and its name in plots and results."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of transformer layers."""
    heads: int
    """Attention heads per layer; ``hidden_size / heads`` (the head dimension) must be a multiple of 8, so that
    the rotary quarter of it has an even number of dimensions."""
    intermediate: int | None = None
    """Width of the MLP; ``None`` means 4 × ``hidden_size``, as in Pythia."""
    lr: float | None = None
    """Peak learning rate of this size; ``None`` means the suite's ``lr``. (Pythia lowers it as models grow.)"""

    def __post_init__(self) -> None:
        where = f"size {self.label!r}"
        _check_types(self, where)
        if not _LABEL.match(self.label) or "-seed" in self.label or self.label in RESERVED_NAMES:
            raise LmscopeError(
                f"size label {self.label!r} must be a plain directory name of letters, digits, '_' and '.', "
                f"without '-seed' and not one of {', '.join(sorted(RESERVED_NAMES))}."
            )
        for key in ("hidden_size", "num_layers", "heads"):
            if getattr(self, key) < 1:
                raise LmscopeError(f"{where}: {key} must be at least 1, not {getattr(self, key)}.")
        if self.intermediate is not None and self.intermediate < 1:
            raise LmscopeError(f"{where}: intermediate must be at least 1 (or left out for 4 × hidden_size).")
        if self.hidden_size % self.heads or (self.hidden_size // self.heads) % 8:
            raise LmscopeError(
                f"{where}: hidden_size {self.hidden_size} / heads {self.heads} must be a whole multiple of 8 "
                "(the rotary quarter of each head needs an even number of dimensions); change heads or hidden_size."
            )
        if self.lr is not None and not self.lr > 0:
            raise LmscopeError(f"{where}: lr must be positive, not {self.lr}.")

    @property
    def mlp_width(self) -> int:
        """The MLP width actually used."""
        return self.intermediate if self.intermediate is not None else 4 * self.hidden_size


def _default_sizes() -> list[ModelSize]:
    return [
        ModelSize(label="0.3m", hidden_size=32, num_layers=2, heads=2, lr=1e-2),
        ModelSize(label="0.6m", hidden_size=64, num_layers=2, heads=4, lr=1e-2),
        ModelSize(label="1.6m", hidden_size=128, num_layers=3, heads=4, lr=4e-3),
    ]


@dataclass
class SuiteTrainConfig:
    """A mini suite: models of several sizes (and seeds) trained on one corpus in one data order.

    The defaults are the default suite, sized to train in a few minutes on two CPU cores.
    """

    name: str = "default"
    """Suite name (recorded in ``suite.json``; part of the default output directory's name)."""
    corpus: str = "default"
    """Documents to train on: ``default`` (the Debian-documentation corpus) or a path to documents
    (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, Parquet, or a directory of text files)."""
    heldout_fraction: float = 0.05
    """Fraction of each domain's documents held out (never trained on; by hash of the document id)."""
    vocab_size: int = 4096
    """Vocabulary of the byte-level BPE tokenizer trained on the train split, ``<|endoftext|>`` included."""
    seq_len: int = 256
    """Tokens predicted per training row; each row stores ``seq_len + 1`` tokens, as Pythia's 2049."""
    batch_size: int = 8
    """Rows per optimizer update."""
    steps: int = 512
    """Optimizer updates per model; every model sees ``steps × batch_size × seq_len`` tokens."""
    sizes: list[ModelSize] = field(default_factory=_default_sizes)
    """The model sizes, smallest first."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Initialisation seeds; each size is trained once per seed (``SIZE`` for the first, ``SIZE-seedK`` for the others).
    Seeds change only the initial weights: the data order is the same for every run, fixed by ``data_seed``
    (Pythia's choice; PolyPythias also varied the data order, which this trainer does not)."""
    data_seed: int = 1234
    """Seed of the data order (document order before packing, and the permutation of packed rows)."""
    lr: float = 4e-3
    """Peak learning rate of sizes that do not set their own."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak learning rate (Pythia: 0.1)."""
    warmup_fraction: float = 0.05
    """Fraction of the updates spent warming the learning rate up linearly (at least one update)."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to weight matrices and embeddings, not to biases and LayerNorms."""
    beta1: float = 0.9
    """AdamW β₁."""
    beta2: float = 0.95
    """AdamW β₂."""
    eps: float = 1e-8
    """AdamW ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (``0`` turns clipping off)."""
    even_checkpoints: int = 16
    """Evenly spaced checkpoints ending at the last update (Pythia: 143); before the first of them, the
    log-spaced steps 1, 2, 4, … are checkpointed too, and step 0 always is."""
    resume_every: int = 32
    """Besides every checkpoint, save resume state every this many updates."""
    eval_tokens: int = 65536
    """Held-out tokens (whole documents, round-robin over domains) for the final learning check."""

    def __post_init__(self) -> None:
        if isinstance(self.sizes, list):
            self.sizes = [
                from_mapping(ModelSize, size, f"[[sizes]] #{i + 1}") if isinstance(size, dict) else size
                for i, size in enumerate(self.sizes)
            ]
        _check_types(self, "suite config")
        if not self.name or any(ch in self.name for ch in "/\\") or self.name.startswith("."):
            raise LmscopeError(f"suite name {self.name!r} must be a plain directory name (no slashes, not hidden).")
        if not self.corpus:
            raise LmscopeError("corpus is empty; give default or a path to documents.")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise LmscopeError(f"heldout_fraction {self.heldout_fraction} must be between 0 and 1 (exclusive), e.g. 0.05.")
        if not 258 <= self.vocab_size <= 65536:
            raise LmscopeError(
                f"vocab_size {self.vocab_size} must be between 258 (256 bytes, <|endoftext|> and one merge) and 65536."
            )
        for key in ("seq_len", "batch_size", "steps", "even_checkpoints", "resume_every", "eval_tokens"):
            if getattr(self, key) < 1:
                raise LmscopeError(f"{key} must be at least 1, not {getattr(self, key)}.")
        if self.seq_len < 2:
            raise LmscopeError(f"seq_len must be at least 2, not {self.seq_len}.")
        if not self.sizes:
            raise LmscopeError("sizes is empty; give at least one [[sizes]] table (label, hidden_size, num_layers, heads).")
        labels = [size.label for size in self.sizes]
        if len(set(labels)) != len(labels):
            raise LmscopeError(f"size labels must be unique; {', '.join(sorted({l for l in labels if labels.count(l) > 1}))} repeats.")
        if not self.seeds:
            raise LmscopeError("seeds is empty; give at least one seed, e.g. seeds = [0].")
        if len(set(self.seeds)) != len(self.seeds) or any(seed < 0 for seed in self.seeds):
            raise LmscopeError(f"seeds {self.seeds} must be distinct non-negative integers.")
        if self.data_seed < 0:
            raise LmscopeError(f"data_seed must be a non-negative integer, not {self.data_seed}.")
        if not self.lr > 0:
            raise LmscopeError(f"lr must be positive, not {self.lr}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise LmscopeError(f"min_lr_ratio {self.min_lr_ratio} must be between 0 and 1.")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise LmscopeError(f"warmup_fraction {self.warmup_fraction} must be in [0, 1).")
        if self.weight_decay < 0 or self.grad_clip < 0 or not self.eps > 0:
            raise LmscopeError("weight_decay and grad_clip must be non-negative and eps positive.")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise LmscopeError(f"beta1 {self.beta1} and beta2 {self.beta2} must be in [0, 1).")

    # --- derived quantities ------------------------------------------------------------

    @property
    def tokens_per_step(self) -> int:
        """Tokens trained per optimizer update: ``batch_size × seq_len`` (Pythia: 1024 × 2048)."""
        return self.batch_size * self.seq_len

    @property
    def rows(self) -> int:
        """Training rows consumed by every model: ``steps × batch_size``."""
        return self.steps * self.batch_size

    @property
    def warmup_steps(self) -> int:
        """Updates of linear warm-up: ``round(warmup_fraction × steps)``, at least 1."""
        return max(1, round(self.warmup_fraction * self.steps))

    def runs(self) -> list[tuple[str, ModelSize, int]]:
        """``(directory name, size, seed)`` of every model: ``SIZE`` for the first seed, ``SIZE-seedK`` for the others."""
        return [
            (size.label if seed == self.seeds[0] else f"{size.label}-seed{seed}", size, seed)
            for size in self.sizes
            for seed in self.seeds
        ]

    def size_lr(self, size: ModelSize) -> float:
        """The peak learning rate of ``size``."""
        return size.lr if size.lr is not None else self.lr

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (what ``suite.json`` records under ``config``)."""
        return dataclasses.asdict(self)

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        """12 hex digits of sha256 over the config (and ``extra``, e.g. the documents' hash): names cached suites."""
        payload = json.dumps({"config": self.to_dict(), "extra": extra or {}}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation`` (int, float, str, ``X | None``, ``list[X]``); ints are accepted as floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, converted = _type_ok(value, option)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_type,) = typing.get_args(annotation)
        if item_type is ModelSize:
            return all(isinstance(item, ModelSize) for item in value), value
        converted = []
        for item in value:
            ok, item = _type_ok(item, item_type)
            if not ok:
                return False, value
            converted.append(item)
        return True, converted
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is str:
        return isinstance(value, str), value
    return isinstance(value, annotation), value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("lmscope.suites.train_config.", "").replace("<class '", "").replace("'>", "")


def _check_types(obj: Any, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, converted = _type_ok(value, hints[f.name])
        if not ok:
            raise LmscopeError(f"{where}: {f.name} must be {_type_name(hints[f.name])}, not {value!r}.")
        setattr(obj, f.name, converted)


def from_mapping(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, refusing unknown and missing keys with one sentence."""
    if not isinstance(data, dict):
        raise LmscopeError(f"{where} must be a table of keys, not {data!r}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LmscopeError(f"{where} has unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}.")
    required = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
    ]
    if required:
        raise LmscopeError(f"{where} lacks the required key(s) {', '.join(required)}.")
    return cls(**data)


def config_from_dict(data: dict[str, Any], where: str = "suite config") -> SuiteTrainConfig:
    """A config from a mapping (a parsed TOML file, or ``suite.json``'s ``config``)."""
    body = dict(data.get("suite", data))
    if "suite" in data and len(data) > 1:
        others = ", ".join(sorted(set(data) - {"suite"}))
        raise LmscopeError(f"{where} has keys outside [suite] ({others}); put every key under [suite].")
    sizes = body.get("sizes")
    if sizes is not None:
        if not isinstance(sizes, list) or not all(isinstance(size, dict) for size in sizes):
            raise LmscopeError(f"{where}: sizes must be [[sizes]] tables, each with label, hidden_size, num_layers and heads.")
        body["sizes"] = [from_mapping(ModelSize, size, f"{where} [[sizes]] #{i + 1}") for i, size in enumerate(sizes)]
    return from_mapping(SuiteTrainConfig, body, where)


def load_train_config(path: str | os.PathLike[str] | None) -> SuiteTrainConfig:
    """Read a suite TOML file (``None``: the default suite)."""
    if path is None:
        return SuiteTrainConfig()
    path = Path(path)
    if not path.is_file():
        raise LmscopeError(f"suite config {str(path)!r} does not exist; give a TOML file (see configs/suite-default.toml).")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise LmscopeError(f"suite config {str(path)!r} is not valid TOML ({err}); fix the file.") from None
    return config_from_dict(data, where=str(path))


def config_to_toml(config: SuiteTrainConfig) -> str:
    """The config as TOML that :func:`load_train_config` reads back to an equal config (``None`` fields left out)."""
    lines = []
    for f in dataclasses.fields(config):
        if f.name != "sizes":
            lines.append(f"{f.name} = {toml_value(getattr(config, f.name))}")
    for size in config.sizes:
        lines += ["", "[[sizes]]"]
        lines += [f"{f.name} = {toml_value(getattr(size, f.name))}" for f in dataclasses.fields(size) if getattr(size, f.name) is not None]
    return "\n".join(lines) + "\n"
