"""Train a mini suite: GPT-NeoX models (Pythia's architecture) of several sizes, on one corpus, in one data order.

A suite directory holds everything a study of training needs — the tokenizer, the
tokenized corpus, the training rows in training order with the provenance of every token,
and every model's checkpoints::

    SUITE_DIR/
      suite.json              what the suite is (see :func:`suite_metadata`); "status": "complete" when done
      tokenizer/              byte-level BPE trained on the train split (Hugging Face format)
      corpus/                 the documents tokenized with it (lmscope tokenized-corpus format)
      data/                   train.bin/.idx (rows in training order), segments.parquet, order.json
                              (see lmscope.suites.data_order)
      <SIZE>/                 the first seed's model of each size; <SIZE>-seed<K>/ for the other seeds
        suite.json            {"size", "seed", "tokens_per_step"}
        checkpoints/stepN/    HF model directory + tokenizer files + optimizer.pt + trainer_state.json
        train_log.parquet     one row per update: step, tokens_seen, loss, lr, grad_norm, seconds, size, seed, batch_sha256
        resume/stepN/         resume state while training (removed when the model is done)
      train_log.png           loss vs tokens seen, one line per model
      learning_check.json     held-out bits per byte of every final model, and of a unigram model

**Steps** (Pythia's): update ``n`` (1-based) consumes training rows
``[batch_size·(n−1), batch_size·n)``; checkpoint ``stepN`` holds the weights after updates
``1 … N``, so ``step0`` is the initialisation and ``tokens_seen = N × tokens_per_step``.
Checkpoints follow :func:`lmscope.suites.schedule.checkpoint_steps`.

**Training**: AdamW (β 0.9/0.95, weight decay on matrices and embeddings), linear warm-up then
cosine decay to 10 % of the peak (:func:`lmscope.suites.schedule.learning_rate`), global
gradient-norm clipping, fp32, no dropout; the loss is the mean next-token cross-entropy
over the ``seq_len`` targets of each row (attention crosses document boundaries inside a
row, as in Pythia).

**Determinism and resumption**: a model's only randomness is its initialisation
(``torch.manual_seed(seed)`` right before the model is built); the data order is fixed on
disk. With ``torch.use_deterministic_algorithms(True)`` and the same machine, thread count,
device and library versions, the same config gives bitwise-identical checkpoints. Resume
state (weights, optimizer and scheduler state, the log so far) is written atomically at
every checkpoint and every ``resume_every`` updates; a rerun after a kill continues from
the latest and ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import lmscope
from lmscope.errors import LmscopeError
from lmscope.fsio import directory_lock
from lmscope.fsio import atomic_directory, atomic_path, atomic_write_json, sha256_file
from lmscope.home import lmscope_home
from lmscope.progress import Progress, no_progress
from lmscope.suites.data_order import ORDER_FILE, ROW_OF_STEP, TrainingRows, batch_sha256, build_training_data
from lmscope.suites.schedule import checkpoint_steps, learning_rate
from lmscope.suites.train_config import ModelSize, SuiteTrainConfig

FORMAT = "lmscope-mini-suite"
FORMAT_VERSION = 1
TRAINER_VERSION = 1
"""Bump when the same config would train different weights (it is part of the default suite's cache name)."""

SUITE_FILE = "suite.json"
LOG_FILE = "train_log.parquet"
PLOT_FILE = "train_log.png"
CHECK_FILE = "learning_check.json"
TOKENIZER_INFO = "lmscope_tokenizer.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

LOG_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("tokens_seen", pa.int64(), nullable=False),
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("lr", pa.float64(), nullable=False),
        pa.field("grad_norm", pa.float64(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("size", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("batch_sha256", pa.string(), nullable=False),
    ]
)
"""``train_log.parquet``: one row per update ``step`` (1-based): the mean loss of that update's batch
(before the update), the learning rate it used, the global gradient norm before clipping, its wall
seconds, and the sha256 of the token ids it was fed (:func:`lmscope.suites.data_order.batch_sha256`)."""


# --- models ---------------------------------------------------------------------------------


def neox_config(size: ModelSize, vocab_size: int, seq_len: int, eos_token_id: int) -> Any:
    """The ``GPTNeoXConfig`` of a size: Pythia's architecture (parallel residual, rotary on ¼ of each head, untied embeddings, no dropout)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.heads,
        intermediate_size=size.mlp_width,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=seq_len,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attention_bias=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def build_model(config: Any, seed: int) -> Any:
    """A freshly initialised ``GPTNeoXForCausalLM``: ``torch.manual_seed(seed)``, then the constructor (the caller's RNG state is kept)."""
    from transformers import GPTNeoXForCausalLM

    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    return model


def count_parameters(size: ModelSize, vocab_size: int, seq_len: int) -> int:
    """Parameters of a size (embeddings included), counted on the meta device without allocating."""
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(neox_config(size, vocab_size, seq_len, 0))
    return sum(p.numel() for p in model.parameters())


def _optimizer(model: Any, config: SuiteTrainConfig, size: ModelSize) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    peak = config.size_lr(size)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        foreach=False,
    )

    def factor(updates_done: int) -> float:  # LambdaLR's argument: updates taken so far; the next is updates_done + 1
        update = min(updates_done + 1, config.steps)
        return learning_rate(update, config.steps, config.warmup_steps, peak, config.min_lr_ratio) / peak

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the duration, restored afterwards."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# --- one model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRun:
    """One model of the suite: its directory name, size and seed."""

    directory: str
    size: ModelSize
    seed: int


def _step_dirs(parent: Path) -> dict[int, Path]:
    found = {}
    if parent.is_dir():
        for child in parent.iterdir():
            if child.is_dir() and child.name.startswith("step") and child.name[4:].isdigit():
                found[int(child.name[4:])] = child
    return found


def _remove_temporaries(directory: Path) -> None:
    """Remove what a killed atomic write left in ``directory`` (``.NAME.*.tmp``), so that no listing mistakes it for a checkpoint."""
    if directory.is_dir():
        for leftover in directory.glob(".*.tmp"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _save_checkpoint(target: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], tokenizer_dir: Path) -> None:
    with atomic_directory(target) as tmp:
        model.save_pretrained(str(tmp))
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": state["step"]}, tmp / "optimizer.pt")
        atomic_write_json(tmp / "trainer_state.json", {**state, "weights_sha256": sha256_file(tmp / "model.safetensors")})


def _save_resume(model_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, log: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    resume = model_dir / "resume"
    target = resume / f"step{step}"
    if not target.exists():
        with atomic_directory(target) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}, tmp / "optimizer.pt")
            pq.write_table(pa.Table.from_pylist(log, schema=LOG_SCHEMA), tmp / "log.parquet")
    for older, path in _step_dirs(resume).items():
        if older < step:
            shutil.rmtree(path, ignore_errors=True)


def _load_resume(path: Path, model: Any, optimizer: Any, scheduler: Any) -> list[dict[str, Any]]:
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    state = torch.load(path / "optimizer.pt", weights_only=True, map_location=device)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return pq.read_table(path / "log.parquet").to_pylist()


def _model_summary(run: ModelRun, model_dir: Path, config: SuiteTrainConfig) -> dict[str, Any]:
    log = pq.read_table(model_dir / LOG_FILE).to_pydict()
    tail = max(1, config.steps // 20)
    return {
        "model": run.directory,
        "size": run.size.label,
        "seed": run.seed,
        "steps": config.steps,
        "tokens": config.steps * config.tokens_per_step,
        "final_loss": float(np.mean(log["loss"][-tail:])),
        "train_seconds": float(np.sum(log["seconds"])),
    }


def model_done(model_dir: Path, config: SuiteTrainConfig) -> bool:
    """Whether a model directory holds its training log and its final checkpoint (what a finished model has)."""
    return (model_dir / LOG_FILE).is_file() and (model_dir / "checkpoints" / f"step{config.steps}" / "config.json").is_file()


def train_model(
    suite_dir: Path,
    run: ModelRun,
    config: SuiteTrainConfig,
    rows: TrainingRows,
    eos_token_id: int,
    device: torch.device,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Train (or finish, or skip when done) one model of the suite; return its summary.

    Resumes from the latest ``resume/stepN`` state when there is one. A checkpoint that
    already exists is not written again.
    """
    model_dir = suite_dir / run.directory
    tokenizer_dir = suite_dir / "tokenizer"
    schedule = checkpoint_steps(config.steps, config.even_checkpoints)
    checkpoints = set(schedule)
    ckpt_dir = model_dir / "checkpoints"
    task = f"train {run.directory}"
    if model_done(model_dir, config):
        shutil.rmtree(model_dir / "resume", ignore_errors=True)
        progress(task, config.steps, config.steps)
        return _model_summary(run, model_dir, config)
    model_dir.mkdir(parents=True, exist_ok=True)
    for directory in (model_dir, ckpt_dir, model_dir / "resume"):
        _remove_temporaries(directory)
    atomic_write_json(model_dir / SUITE_FILE, {"size": run.size.label, "seed": run.seed, "tokens_per_step": config.tokens_per_step})

    neox = neox_config(run.size, config.vocab_size, config.seq_len, eos_token_id)
    model = build_model(neox, run.seed).to(device)
    model.train()
    optimizer, scheduler = _optimizer(model, config, run.size)
    log: list[dict[str, Any]] = []
    start = 0
    resumable = _step_dirs(model_dir / "resume")
    if resumable:
        start = max(resumable)
        log = _load_resume(resumable[start], model, optimizer, scheduler)
        if len(log) != start:
            raise LmscopeError(f"{resumable[start]} holds a log of {len(log)} updates for step {start}; remove {model_dir} to retrain it.")
    base_state = {
        "size": run.size.label,
        "seed": run.seed,
        "data_seed": config.data_seed,
        "init": f"torch.manual_seed({run.seed}) immediately before GPTNeoXForCausalLM(config)",
        "tokens_per_step": config.tokens_per_step,
        "rows_per_step": config.batch_size,
        "rng": {"init_seed": run.seed, "runtime_rng_used": False, "data_order": "precomputed in data/ from data_seed"},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "deterministic_algorithms": True,
    }

    def checkpoint(step: int) -> None:
        target = ckpt_dir / f"step{step}"
        if (target / "config.json").is_file():
            return
        last = log[-1] if log else None
        state = {
            "step": step,
            "tokens_seen": step * config.tokens_per_step,
            "loss": None if last is None else last["loss"],
            "lr": None if last is None else last["lr"],
            **base_state,
        }
        _save_checkpoint(target, model, optimizer, scheduler, state, tokenizer_dir)

    progress(task, start, config.steps)
    if start in checkpoints:
        checkpoint(start)  # the resume state may be newer than a checkpoint that a kill interrupted
    vocab = neox.vocab_size
    parameters = [p for p in model.parameters()]
    clip = config.grad_clip if config.grad_clip > 0 else float("inf")
    for update in range(start + 1, config.steps + 1):
        clock = time.perf_counter()
        tokens = rows.batch(update)
        batch = torch.from_numpy(tokens.astype(np.int64)).to(device)
        lr = float(optimizer.param_groups[0]["lr"])
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if not np.isfinite(loss_value):
            raise LmscopeError(f"the loss of {run.directory} became {loss_value} at update {update}; lower its lr and retrain.")
        seconds = time.perf_counter() - clock
        log.append({
            "step": update,
            "tokens_seen": update * config.tokens_per_step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "seconds": seconds,
            "size": run.size.label,
            "seed": run.seed,
            "batch_sha256": batch_sha256(tokens),
        })
        progress(task, 1, config.steps, loss=round(loss_value, 3), tok_s=int(config.tokens_per_step / seconds))
        if update in checkpoints:
            checkpoint(update)
        if update < config.steps and (update in checkpoints or update % config.resume_every == 0):
            _save_resume(model_dir, update, model, optimizer, scheduler, log)
    with atomic_path(model_dir / LOG_FILE) as tmp:
        pq.write_table(pa.Table.from_pylist(log, schema=LOG_SCHEMA), tmp)
    shutil.rmtree(model_dir / "resume", ignore_errors=True)
    return _model_summary(run, model_dir, config)


# --- the suite ------------------------------------------------------------------------------


def documents_source(config: SuiteTrainConfig, progress: Progress = no_progress) -> Path:
    """The documents file or directory the config names (building the default corpus if needed)."""
    if config.corpus == "default":
        from lmscope.data.default_corpus import ensure_default_documents

        return ensure_default_documents(progress=progress)
    path = Path(config.corpus).expanduser()
    if not path.exists():
        raise LmscopeError(
            f"corpus {config.corpus!r} does not exist; give default or a path to .jsonl(.gz/.zst), Parquet or a directory of text files."
        )
    return path.resolve()


def _source_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies the documents: the default corpus's content hash, else path, size and mtime."""
    from lmscope.data.default_corpus import read_documents_manifest

    manifest = read_documents_manifest(path.parent) if path.is_file() else None
    if manifest is not None and path.name == manifest.get("documents_file", {}).get("name"):
        return {"sha256": manifest["documents_file"]["sha256"]}
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size if path.is_file() else None, "mtime_ns": stat.st_mtime_ns}


def suite_dir_for(config: SuiteTrainConfig, documents: Path) -> Path:
    """The cache location of a suite: ``$LMSCOPE_HOME/suites/<name>-<hash of config, documents and trainer version>``."""
    extra = {"trainer_version": TRAINER_VERSION, "documents": _source_fingerprint(documents)}
    return lmscope_home() / "suites" / f"{config.name}-{config.fingerprint(extra)}"


def suite_metadata(config: SuiteTrainConfig, status: str, **extra: Any) -> dict[str, Any]:
    """The content of ``SUITE_DIR/suite.json``.

    Keys: ``name``, ``format`` (``lmscope-mini-suite``), ``format_version``, ``status``
    (``training`` or ``complete``), ``tokens_per_step``, ``seq_len``, ``batch_size``, ``steps``,
    ``row_of_step``, ``checkpoint_steps``, ``sizes`` (label → hidden_size, num_layers, heads,
    intermediate, params, lr), ``seeds``, ``data_seed``, ``models`` (directory → size, seed),
    ``config`` (the resolved config), ``trainer_version``, ``lmscope_version``, and whatever
    ``extra`` adds (tokenizer, data, documents, timings).
    """
    return {
        "name": config.name,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": status,
        "tokens_per_step": config.tokens_per_step,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
        "steps": config.steps,
        "row_of_step": ROW_OF_STEP,
        "checkpoint_steps": checkpoint_steps(config.steps, config.even_checkpoints),
        "sizes": {
            size.label: {
                "hidden_size": size.hidden_size,
                "num_layers": size.num_layers,
                "heads": size.heads,
                "intermediate": size.mlp_width,
                "params": count_parameters(size, config.vocab_size, config.seq_len),
                "lr": config.size_lr(size),
            }
            for size in config.sizes
        },
        "seeds": list(config.seeds),
        "data_seed": config.data_seed,
        "vary_data_order": False,
        "models": {directory: {"size": size.label, "seed": seed} for directory, size, seed in config.runs()},
        "config": config.to_dict(),
        "trainer_version": TRAINER_VERSION,
        "lmscope_version": lmscope.__version__,
        **extra,
    }


def _claim(suite_dir: Path, config: SuiteTrainConfig) -> dict[str, Any]:
    """Check that ``suite_dir`` is new, or holds this very suite; return the previous ``suite.json`` (or ``{}``)."""
    path = suite_dir / SUITE_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        if previous.get("format") != FORMAT or previous.get("config") != config.to_dict() or previous.get("trainer_version") != TRAINER_VERSION:
            raise LmscopeError(
                f"{suite_dir} holds a different suite (other config or trainer version); choose another --out, or delete it to start over."
            )
        return previous
    foreign = sorted(entry.name for entry in suite_dir.iterdir() if not entry.name.startswith("."))
    if foreign:
        raise LmscopeError(f"{suite_dir} is not empty ({', '.join(foreign[:3])}) and holds no suite; choose a new or empty --out directory.")
    return {}


def _tokenizer_info(suite_dir: Path, config: SuiteTrainConfig, documents: Path, progress: Progress) -> dict[str, Any]:
    from lmscope.suites.tokenizer_training import train_tokenizer

    tokenizer_dir = suite_dir / "tokenizer"
    if not (tokenizer_dir / TOKENIZER_INFO).is_file():
        shutil.rmtree(tokenizer_dir, ignore_errors=True)  # a directory without its info file is from an interrupted write
        scratch = suite_dir / ".tokenizer-new"
        shutil.rmtree(scratch, ignore_errors=True)
        info = train_tokenizer(documents, scratch, config.vocab_size, config.heldout_fraction, progress=progress)
        atomic_write_json(scratch / TOKENIZER_INFO, info)
        os.replace(scratch, tokenizer_dir)
    return json.loads((tokenizer_dir / TOKENIZER_INFO).read_text(encoding="utf-8"))


def _learning_check(suite_dir: Path, config: SuiteTrainConfig, corpus: Any, device: torch.device, progress: Progress) -> dict[str, Any]:
    from lmscope.suites.learning_check import heldout_bits_per_byte, unigram_bits_per_byte

    path = suite_dir / CHECK_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from transformers import GPTNeoXForCausalLM

    runs = config.runs()
    progress("learning check", 0, len(runs) + 1)
    unigram = unigram_bits_per_byte(corpus, config.eval_tokens, vocab_size=config.vocab_size)
    progress("learning check", 1, len(runs) + 1)
    models = {}
    for directory, size, seed in runs:
        final = suite_dir / directory / "checkpoints" / f"step{config.steps}"
        model = GPTNeoXForCausalLM.from_pretrained(str(final), dtype=torch.float32).to(device)
        result = heldout_bits_per_byte(model, corpus, config.eval_tokens, ctx=config.seq_len)
        models[directory] = {"size": size.label, "seed": seed, "step": config.steps, **result.to_dict()}
        progress("learning check", 1, len(runs) + 1, bpb=round(result.bits_per_byte, 3))
    check = {
        "split": "heldout",
        "method": "see lmscope.suites.learning_check: same documents and tokens for every model and the unigram",
        "unigram": unigram.to_dict(),
        "models": models,
    }
    atomic_write_json(path, check)
    return check


def train_suite(
    config: SuiteTrainConfig,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "auto",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Train a mini suite into ``out_dir`` (default :func:`suite_dir_for`), resuming whatever a killed run left.

    Returns a summary: ``suite_dir``, ``models`` (per model: size, seed, params, steps,
    tokens, final loss, held-out bits per byte, seconds), the unigram bits per byte and timings.
    Rerunning a finished suite only reads it back. A directory holding another suite is refused.
    """
    from lmscope.data.tokenize_job import tokenize_corpus
    from lmscope.data.tokenized import TokenizedCorpus, is_tokenized_corpus
    from lmscope.models.loading import resolve_device
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lmscope reports its own progress; HF's bars would interleave
    started = time.perf_counter()
    torch_device = resolve_device(device)
    documents = documents_source(config, progress)
    suite_dir = Path(out_dir).expanduser() if out_dir is not None else suite_dir_for(config, documents)
    if suite_dir.exists() and not suite_dir.is_dir():
        raise LmscopeError(f"{suite_dir} exists and is not a directory; choose another --out.")
    suite_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with directory_lock(suite_dir):
        previous = _claim(suite_dir, config)
        _remove_temporaries(suite_dir)
        if previous.get("status") != "complete":
            atomic_write_json(suite_dir / SUITE_FILE, suite_metadata(config, "training", documents={"source": str(documents)}))
        clock = time.perf_counter()
        tokenizer = _tokenizer_info(suite_dir, config, documents, progress)
        timings["tokenizer_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        corpus_dir = suite_dir / "corpus"
        if is_tokenized_corpus(corpus_dir):
            corpus = TokenizedCorpus.open(corpus_dir)
        else:
            corpus = tokenize_corpus(documents, str(suite_dir / "tokenizer"), corpus_dir, heldout_fraction=config.heldout_fraction, progress=progress)
        timings["tokenize_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        data_dir = suite_dir / "data"
        if not (data_dir / ORDER_FILE).is_file():
            shutil.rmtree(data_dir, ignore_errors=True)
            build_training_data(
                corpus, data_dir, seq_len=config.seq_len, batch_size=config.batch_size, steps=config.steps,
                data_seed=config.data_seed, eos_token_id=tokenizer["eos_token_id"], progress=progress,
            )
        order = json.loads((data_dir / ORDER_FILE).read_text(encoding="utf-8"))
        data = {key: value for key, value in order.items() if key not in ("document_order", "permutation")}
        timings["data_order_s"] = time.perf_counter() - clock

        rows = TrainingRows(data_dir, config.batch_size)
        summaries = []
        clock = time.perf_counter()
        pending = any(not model_done(suite_dir / directory, config) for directory, _, _ in config.runs())
        with _deterministic(torch_device) if pending else nullcontext():
            for directory, size, seed in config.runs():
                summaries.append(train_model(suite_dir, ModelRun(directory, size, seed), config, rows, tokenizer["eos_token_id"], torch_device, progress))
        timings["train_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        if not (suite_dir / PLOT_FILE).is_file():
            from lmscope.suites.plots import plot_train_logs

            plot_train_logs(suite_dir, suite_dir / PLOT_FILE)
        check = _learning_check(suite_dir, config, corpus, torch_device, progress)
        timings["learning_check_s"] = time.perf_counter() - clock
        timings["total_s"] = time.perf_counter() - started

        if previous.get("status") == "complete":
            meta = previous
        else:
            meta = suite_metadata(
                config,
                "complete",
                tokenizer=tokenizer,
                data=data,
                documents={"source": str(documents), **_source_fingerprint(documents)},
                corpus={"documents": len(corpus), "tokens": corpus.n_tokens, "bytes": int(corpus.manifest.get("n_bytes", 0))},
            )
            atomic_write_json(suite_dir / SUITE_FILE, meta)
    for summary in summaries:
        summary["params"] = meta["sizes"][summary["size"]]["params"]
        summary["heldout_bits_per_byte"] = check["models"][summary["model"]]["bits_per_byte"]
    return {
        "suite_dir": str(suite_dir),
        "name": config.name,
        "tokens_per_step": config.tokens_per_step,
        "checkpoint_steps": meta["checkpoint_steps"],
        "models": summaries,
        "unigram_bits_per_byte": check["unigram"]["bits_per_byte"],
        "device": str(torch_device),
        "timings": timings,
    }


def default_suite_config() -> SuiteTrainConfig:
    """The default suite's config (``configs/suite-default.toml`` spells out the same values)."""
    return SuiteTrainConfig()


def ensure_default_suite(progress: Progress = no_progress, device: str | torch.device = "auto") -> Path:
    """The default suite's directory under ``$LMSCOPE_HOME/suites/``, trained first if missing (resumed if partial)."""
    summary = train_suite(default_suite_config(), None, device=device, progress=progress)
    return Path(summary["suite_dir"])
