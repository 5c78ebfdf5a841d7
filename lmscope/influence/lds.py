r"""Linear datamodeling score (LDS): how well an influence method predicts retraining on random halves of the data.

The LDS (Park et al. 2023, *TRAK*; the evaluation kronfluence's examples use) asks whether summed
influence scores rank models trained on different data subsets the way they really come out:

1. **The run.** The first ``n_steps`` updates of one suite model (a size, its first seed), trained from
   its initialisation on the suite's own data order with the suite's own optimizer, learning-rate
   schedule (that of the *whole* suite run, cut after ``n_steps``), clipping and loss. Its ``N = n_steps·B``
   training rows are the candidates; its final weights (the *full run*, equal to the suite's checkpoint
   ``step{n_steps}``) are where every method's factors are fitted and its scores computed.
2. **Subsets.** ``M`` subsets :math:`S_1 … S_M` of the ``N`` rows, each of exactly ``round(fraction·N)``
   rows, drawn uniformly without replacement; subset ``j`` depends only on ``(seed, j)``.
3. **Retraining.** Model ``j`` repeats the run from the same initialisation with every row outside
   :math:`S_j` *given weight zero*: update ``n`` still comes at step ``n``, with the same learning rate,
   but its loss is :math:`\frac1B \sum_{r \in \text{batch}_n \cap S_j} \bar\ell_r` (:math:`\bar\ell_r` the mean
   next-token loss of row ``r``), where the full run's is :math:`\frac1B \sum_{r \in \text{batch}_n} \bar\ell_r`.
   An update whose batch lost every row steps with zero gradients (AdamW's momentum and weight decay
   still act). With every row kept this *is* the suite's training, bit for bit.

   Why zero weights rather than the compacted order (kept rows moved up to fill ``n_steps/2`` full
   batches): removing a row is then exactly the perturbation an influence function linearises (the
   row's weight in the objective goes from ``1/B`` to 0), while every other row stays at the same update,
   learning rate and optimizer step count — compacting would move every later row to an earlier update
   with another learning rate, a change influence does not model, and halve the number of updates.
4. **Measurements.** For each query (prompt ``p``, completion ``c``) the actual measurement of model ``j``
   is :math:`m_j = -\log p_j(c \mid p)`. A method's prediction is the group influence
   :math:`\hat y_j = \sum_{n \in S_j} \tau(q, n)`; lmscope's scores :math:`\tau` are
   :math:`d \log p(c \mid p) / d\,\text{upweight}`, so :math:`\hat y_j` predicts the log-probability :math:`-m_j`
   (up to a constant, which a rank correlation ignores; its sign it does not).
5. **Score.** :math:`\text{LDS}(q) = \rho_\text{Spearman}\big((\hat y_j)_j, (-m_j)_j\big)`, and a method's LDS is
   the mean over queries (queries whose measurements or predictions are all tied give NaN and are
   left out of the mean; their count is reported).

Files (``out_dir``), each written atomically; a killed run started again continues where it stopped and
ends with the same numbers:

- ``plan.json`` — what the run is (settings, suite, size, queries' tokens); a rerun must match it;
- ``full_run.safetensors`` — the full run's weights; ``measurements/full.json`` its measurements;
- ``scores/<method>.npy`` — ``[Q, N]`` float64 scores of every training row of the run;
- ``measurements/subset<j>.json`` — model ``j``'s measurements, written as it completes;
- ``lds.json`` (the result of :func:`run_lds`), ``lds.parquet`` (one row per method and query:
  ``method``, ``query``, ``lds``) and ``lds.png`` (:func:`plot_lds`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_path, atomic_write_json, directory_lock
from lmscope.influence.factors import STRATEGIES, FactorSettings, fit_factors
from lmscope.influence.objectives import query_batch, token_losses
from lmscope.influence.precondition import DEFAULT_DAMPING, Preconditioner, parse_damping
from lmscope.influence.taps import MODULE_SELECTIONS
from lmscope.progress import Progress, no_progress

LDS_FORMAT = "lmscope-influence-lds"
LDS_VERSION = 1
"""Bump when the same plan would give other numbers."""
PLAN_FILE = "plan.json"
FULL_WEIGHTS = "full_run.safetensors"
MEASUREMENTS_DIR = "measurements"
SCORES_DIR = "scores"
LDS_JSON = "lds.json"
LDS_PARQUET = "lds.parquet"
LDS_PLOT = "lds.png"

LDS_SCHEMA = pa.schema(
    [
        pa.field("method", pa.string(), nullable=False),
        pa.field("query", pa.int64(), nullable=False),
        pa.field("lds", pa.float64(), nullable=True),
    ]
)
"""``lds.parquet``: the LDS of each method on each query (null when the query's values were all tied)."""

TokenQuery = tuple[Sequence[int], Sequence[int]]


@dataclass
class LdsSettings:
    """What an LDS run retrains and how its methods score (one object for the CLI, ``plan.json`` and the API)."""

    size: str | None = None
    """Size label of the suite model to retrain (its first seed); ``None``: the suite's first (smallest) size."""
    n_steps: int = 64
    """Updates of the shortened run: the first ``n_steps`` of the suite's data order and learning-rate schedule."""
    n_subsets: int = 16
    """``M``: random subsets retrained (at least 2; 16–32 give a usable rank correlation)."""
    fraction: float = 0.5
    """Share of the run's training rows each subset keeps (strictly between 0 and 1; TRAK's and kronfluence's 0.5)."""
    seed: int = 0
    """Seed of the subsets: subset ``j`` is drawn from ``numpy.random.default_rng([seed, j])``."""
    methods: tuple[str, ...] = STRATEGIES
    """Influence methods to score: any of ``identity``, ``diagonal``, ``kfac``, ``ekfac``."""
    damping: float | str = DEFAULT_DAMPING
    """Damping λ of the inverse curvature: a number, or ``heuristic`` (0.1 × each layer's mean eigenvalue)."""
    modules: str = "blocks"
    """Linear layers influence is computed over: ``blocks``, ``mlp``, ``attention`` or ``all``."""
    fisher: str = "sampled"
    """Factors' Fisher: ``sampled`` (targets drawn from the model) or ``empirical`` (the data's targets)."""
    fit_seed: int = 0
    """Seed of the sampled targets the factors are fitted with."""
    batch_size: int = 8
    """Rows per forward/backward pass when fitting factors and scoring (not the training batch, which is the suite's)."""
    device: str = "cpu"
    """Where to train, fit and score: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        self.methods = tuple(self.methods)
        if not self.methods:
            raise LmscopeError(f"no influence method given; choose one or more of {', '.join(STRATEGIES)}.")
        for method in self.methods:
            if method not in STRATEGIES:
                raise LmscopeError(f"influence method {method!r} is unknown; choose from {', '.join(STRATEGIES)}.")
        if len(set(self.methods)) != len(self.methods):
            raise LmscopeError(f"methods {', '.join(self.methods)} repeat one; give each method once.")
        for name, least in (("n_steps", 1), ("n_subsets", 2), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise LmscopeError(f"{name.replace('_', '-')} {value!r} must be an integer of at least {least}.")
        for name in ("seed", "fit_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LmscopeError(f"{name.replace('_', '-')} {value!r} must be a non-negative integer.")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0.0 < self.fraction < 1.0:
            raise LmscopeError(f"fraction {self.fraction!r} must be strictly between 0 and 1, e.g. 0.5 (half the rows).")
        self.fraction = float(self.fraction)
        self.damping = parse_damping(self.damping)
        if self.modules not in MODULE_SELECTIONS:
            raise LmscopeError(f"module selection {self.modules!r} is unknown; choose one of {', '.join(MODULE_SELECTIONS)}.")
        FactorSettings(modules=self.modules, fisher=self.fisher)  # validates fisher with its own message
        if self.size is not None and (not isinstance(self.size, str) or not self.size):
            raise LmscopeError(f"size {self.size!r} must be a size label of the suite (e.g. 0.3m), or unset for the smallest.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["methods"] = list(self.methods)
        return data


# -- the maths -------------------------------------------------------------------------------------


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of two 1-D arrays (``scipy.stats.spearmanr``, ties at their average rank); NaN when either is constant."""
    import warnings

    from scipy.stats import ConstantInputWarning, spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise LmscopeError(f"spearman needs two 1-D arrays of the same length; got shapes {x.shape} and {y.shape}.")
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(spearmanr(x, y).statistic)


def subset_masks(n_rows: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[n_subsets, n_rows]`` bool: subset ``j`` keeps exactly ``round(fraction·n_rows)`` rows, drawn from ``default_rng([seed, j])``.

    Subset ``j`` is the same whatever ``n_subsets`` is, so a run with more subsets extends one with fewer.
    """
    keep = int(round(fraction * n_rows))
    if not 1 <= keep < n_rows:
        raise LmscopeError(
            f"fraction {fraction} of {n_rows} rows keeps {keep}; a subset must keep at least one row and leave one out — "
            "raise n-steps or choose a fraction nearer 0.5."
        )
    masks = np.zeros((n_subsets, n_rows), dtype=bool)
    for j in range(n_subsets):
        masks[j, np.random.default_rng([seed, j]).choice(n_rows, size=keep, replace=False)] = True
    return masks


def lds_of(scores: np.ndarray, masks: np.ndarray, measurements: np.ndarray) -> np.ndarray:
    """``[Q]`` LDS of each query: Spearman over subsets of ``masks @ scores.T`` (predicted log-prob) and ``-measurements``.

    Args:
        scores: ``[Q, N]`` influence of each training row on each query (d log p / d upweight).
        masks: ``[M, N]`` bool, the rows each subset kept.
        measurements: ``[M, Q]`` each retrained model's completion loss ``-log p(c|p)``.
    """
    predicted = masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T  # [M, Q]
    return np.array([spearman(predicted[:, q], -measurements[:, q]) for q in range(predicted.shape[1])])


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class _Run:
    """A suite model's shortened run: everything retraining it needs."""

    suite_dir: Path
    config: Any  # SuiteTrainConfig
    size: Any  # ModelSize
    seed: int
    neox: Any  # GPTNeoXConfig
    rows: Any  # TrainingRows
    n_steps: int
    device: torch.device
    eos_token_id: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return self.n_steps * self.config.batch_size

    def row_tokens(self) -> np.ndarray:
        """``[N, seq_len + 1]`` int64: the run's training rows in training order."""
        return np.stack([self.rows.batch(update) for update in range(1, self.n_steps + 1)]).reshape(self.n_rows, -1).astype(np.int64)


def open_run(suite_dir: str | os.PathLike[str], size: str | None, n_steps: int, device: str = "cpu") -> _Run:
    """The shortened run of ``size`` (first seed) in a mini suite; refuses a size or length the suite lacks."""
    from lmscope.models.loading import resolve_device
    from lmscope.suites.data_order import TrainingRows
    from lmscope.suites.replay.mini import is_mini_suite
    from lmscope.suites.train import neox_config
    from lmscope.suites.train_config import config_from_dict

    root = Path(suite_dir).expanduser()
    if not is_mini_suite(root):
        raise LmscopeError(f"{str(root)!r} is not a mini suite (no suite.json of format lmscope-mini-suite); give a directory from `lmscope suite train`.")
    meta = json.loads((root / "suite.json").read_text(encoding="utf-8"))
    if "config" not in meta:
        raise LmscopeError(f"{root / 'suite.json'} records no training config; LDS retrains the model, so give a suite trained by lmscope.")
    config = config_from_dict(meta["config"], where=str(root / "suite.json"))
    sizes = {s.label: s for s in config.sizes}
    label = size if size is not None else config.sizes[0].label
    if label not in sizes:
        raise LmscopeError(f"size {label!r} is not in the suite {str(root)!r}; choose one of {', '.join(sizes)}.")
    if n_steps > config.steps:
        raise LmscopeError(f"n-steps {n_steps} exceeds the suite's {config.steps} updates; give at most {config.steps}.")
    eos = (meta.get("tokenizer") or {}).get("eos_token_id")
    if eos is None:
        eos = json.loads((root / "data" / "order.json").read_text(encoding="utf-8"))["eos_token_id"]
    neox = neox_config(sizes[label], config.vocab_size, config.seq_len, int(eos))
    rows = TrainingRows(root / "data", config.batch_size)
    return _Run(root, config, sizes[label], config.seeds[0], neox, rows, n_steps, resolve_device(device), int(eos), meta)


def train_run(run: _Run, keep: np.ndarray | None = None, progress: Progress = no_progress, task: str = "lds: retrain",
              total: int | None = None) -> Any:
    """Train the run from its initialisation with the rows outside ``keep`` (``[N]`` bool) weighted zero; return the model.

    The loop is :func:`lmscope.suites.train.train_model`'s (same model constructor, optimizer, schedule,
    clipping and loss, deterministic algorithms on), without its checkpoints and logs. With ``keep``
    ``None`` or all true it trains exactly as the suite did (bit for bit on the suite's device and thread count).
    """
    from lmscope.suites.train import _deterministic, _optimizer, build_model

    batch_size = run.config.batch_size
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (run.n_rows,):
            raise LmscopeError(f"a subset mask must have one entry per training row of the run ({run.n_rows}), not shape {keep.shape}.")
    with _deterministic(run.device):
        model = build_model(run.neox, run.seed).to(run.device)
        model.train()
        optimizer, scheduler = _optimizer(model, run.config, run.size)
        parameters = list(model.parameters())
        clip = run.config.grad_clip if run.config.grad_clip > 0 else float("inf")
        vocab = run.neox.vocab_size
        for update in range(1, run.n_steps + 1):
            tokens = run.rows.batch(update)
            kept = np.ones(batch_size, dtype=bool) if keep is None else keep[(update - 1) * batch_size : update * batch_size]
            if kept.any():
                batch = torch.from_numpy(tokens[kept].astype(np.int64)).to(run.device)
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1))
                if not kept.all():
                    loss = loss * (int(kept.sum()) / batch_size)  # rows left out count as zero: (1/B) Σ_kept mean row loss
                loss.backward()
            else:
                for p in parameters:
                    p.grad = torch.zeros_like(p)
            torch.nn.utils.clip_grad_norm_(parameters, clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress(task, 1, total or run.n_steps)
    model.eval()
    return model


@torch.no_grad()
def measure(model: Any, queries: list[TokenQuery]) -> np.ndarray:
    """``[Q]`` float64: each query's completion loss :math:`-\\log p(c \\mid p)` in nats, one query at a time."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros(len(queries), dtype=np.float64)
    try:
        for q, query in enumerate(queries):
            batch = query_batch([query]).to(device)
            logits = model(input_ids=batch.inputs, use_cache=False).logits.float()
            out[q] = float(token_losses(logits, batch.targets, batch.mask).double().sum())
    finally:
        model.train(was_training)
    return out


def method_scores(model: Any, rows: np.ndarray, queries: list[TokenQuery], method: str, settings: LdsSettings,
                  progress: Progress = no_progress) -> tuple[np.ndarray, dict[str, Any]]:
    """``[Q, N]`` scores of every row by ``method`` at ``model``'s weights (factors fitted on the same ``rows``), and fit facts."""
    from lmscope.influence.scores import prepare_queries, score_rows
    from lmscope.influence.taps import tracked_linears

    factor_settings = FactorSettings(strategy=method, modules=settings.modules, fisher=settings.fisher,
                                     batch_size=settings.batch_size, seed=settings.fit_seed)
    started = time.perf_counter()
    factors = fit_factors(model, rows, factor_settings, progress=progress)
    fitted = time.perf_counter() - started
    modules = tracked_linears(model, settings.modules)
    preconditioner = Preconditioner(factors, settings.damping)
    prepared = prepare_queries(model, modules, query_batch([tuple(map(list, q)) for q in queries]), preconditioner)
    scores = score_rows(model, modules, prepared, rows, batch_size=settings.batch_size, progress=progress)
    facts = {"fit_seconds": round(fitted, 3), "score_seconds": round(time.perf_counter() - started - fitted, 3),
             "fit_rows": factors.n_sequences, "fit_tokens": factors.n_tokens,
             "damping": None if method == "identity" else preconditioner.damping_used}
    return scores, facts


# -- queries ---------------------------------------------------------------------------------------


def suite_tokenizer(suite_dir: str | os.PathLike[str]) -> Any:
    """The suite's :class:`~lmscope.data.tokenizer_info.CorpusTokenizer` (``SUITE_DIR/tokenizer``)."""
    from lmscope.data.tokenizer_info import corpus_tokenizer

    path = Path(suite_dir).expanduser() / "tokenizer"
    if not path.is_dir():
        raise LmscopeError(f"{str(path)!r} does not exist; text queries need the suite's tokenizer — give token ids instead.")
    return corpus_tokenizer(str(path))


def heldout_queries(suite_dir: str | os.PathLike[str], n: int, prompt_tokens: int = 32, completion_tokens: int = 16) -> list[tuple[list[int], list[int]]]:
    """``n`` queries from the suite's held-out documents (never trained on), taken round-robin over domains.

    Each is ``(<|endoftext|> + the document's first prompt_tokens tokens, its next completion_tokens tokens)``
    — the EOS gives the document the context it has in training rows. Documents shorter than
    ``prompt_tokens + completion_tokens`` are skipped; within a domain, documents go in corpus order.
    """
    from lmscope.data.tokenized import TokenizedCorpus

    if n < 1 or prompt_tokens < 1 or completion_tokens < 1:
        raise LmscopeError(f"held-out queries need n, prompt and completion tokens of at least 1, not {n}, {prompt_tokens}, {completion_tokens}.")
    root = Path(suite_dir).expanduser()
    corpus = TokenizedCorpus.open(root / "corpus")
    meta = json.loads((root / "suite.json").read_text(encoding="utf-8"))
    eos = int((meta.get("tokenizer") or {}).get("eos_token_id", 0))
    lengths = corpus.documents.column("n_tokens").to_numpy()
    domains = np.asarray(corpus.documents.column("domain").to_pylist(), dtype=object)
    heldout = corpus.select(split="heldout")
    heldout = heldout[lengths[heldout] >= prompt_tokens + completion_tokens]
    queues = [list(heldout[domains[heldout] == d]) for d in sorted(set(domains[heldout].tolist()))]
    picked: list[int] = []
    position = 0
    while len(picked) < n and any(position < len(queue) for queue in queues):
        for queue in queues:
            if position < len(queue) and len(picked) < n:
                picked.append(int(queue[position]))
        position += 1
    if len(picked) < n:
        raise LmscopeError(f"the suite has {len(picked)} held-out documents of at least {prompt_tokens + completion_tokens} tokens, not {n}; ask for fewer queries or shorter ones.")
    out = []
    for doc in picked:
        tokens = corpus.document_tokens(doc)[: prompt_tokens + completion_tokens].astype(np.int64).tolist()
        out.append(([eos] + tokens[:prompt_tokens], tokens[prompt_tokens:]))
    return out


def _token_queries(run: _Run, queries: Sequence[Any]) -> tuple[list[tuple[list[int], list[int]]], list[dict[str, str]] | None]:
    """Queries as token ids (text ones encoded with the suite's tokenizer), checked against the model's vocabulary and context."""
    from lmscope.influence.job import Query, encode_query

    if not queries:
        raise LmscopeError("no query given; give at least one prompt and completion (text, or token ids).")
    texts: list[dict[str, str]] | None = None
    if all(isinstance(q, Query) for q in queries):
        tokenizer = suite_tokenizer(run.suite_dir)
        pairs = [encode_query(tokenizer, q) for q in queries]
        texts = [{"prompt": q.prompt, "completion": q.completion} for q in queries]
    else:
        pairs = []
        for i, q in enumerate(queries):
            if isinstance(q, Query) or not (isinstance(q, (tuple, list)) and len(q) == 2):
                raise LmscopeError(f"query {i} is neither a Query nor a (prompt ids, completion ids) pair; give one kind for every query.")
            pairs.append(([int(t) for t in q[0]], [int(t) for t in q[1]]))
    for i, (prompt, completion) in enumerate(pairs):
        if not prompt or not completion:
            raise LmscopeError(f"query {i} has an empty prompt or completion; give at least one token of each.")
        if len(prompt) + len(completion) - 1 > run.config.seq_len:
            raise LmscopeError(f"query {i} holds {len(prompt) + len(completion)} tokens, more than the model's context {run.config.seq_len} + 1; shorten it.")
        if min(prompt + completion) < 0 or max(prompt + completion) >= run.neox.vocab_size:
            raise LmscopeError(f"query {i} has token ids outside the vocabulary 0…{run.neox.vocab_size - 1}; encode it with the suite's tokenizer.")
    return [(list(p), list(c)) for p, c in pairs], texts


# -- files -----------------------------------------------------------------------------------------


def _save_weights(path: Path, model: Any) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, str(tmp))


def _load_weights(path: Path, run: _Run) -> Any:
    from safetensors.torch import load_file

    from lmscope.suites.train import build_model

    model = build_model(run.neox, run.seed)
    model.load_state_dict(load_file(str(path)))
    return model.to(run.device).eval()


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def _read_measurements(path: Path, n_queries: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    values = json.loads(path.read_text(encoding="utf-8"))["measurements"]
    if len(values) != n_queries:
        raise LmscopeError(f"{path} holds {len(values)} measurements for {n_queries} queries; delete the LDS directory and run again.")
    return np.asarray(values, dtype=np.float64)


def _checkpoint_match(run: _Run, model: Any) -> dict[str, Any]:
    """How the full run's weights compare with the suite's own checkpoint ``step{n_steps}`` (when the suite kept it)."""
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lmscope reports its own progress; HF's bar would interleave
    path = run.suite_dir / run.size.label / "checkpoints" / f"step{run.n_steps}"
    threads = torch.get_num_threads()
    if not (path / "config.json").is_file():
        return {"checkpoint": None, "bitwise_equal": None, "max_abs_diff": None, "torch_threads": threads, "suite_torch_threads": None}
    stored = GPTNeoXForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
    ours = model.state_dict()
    diffs = [float((ours[k].detach().cpu() - stored[k]).abs().max()) for k in stored]
    try:
        suite_threads = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("torch_threads")
    except (OSError, ValueError):
        suite_threads = None
    # Bitwise equality needs the suite's device and thread count (lmscope.suites.train's determinism contract).
    return {"checkpoint": f"{run.size.label}/checkpoints/step{run.n_steps}",
            "bitwise_equal": all(torch.equal(ours[k].detach().cpu(), stored[k]) for k in stored),
            "max_abs_diff": max(diffs), "torch_threads": threads, "suite_torch_threads": suite_threads}


def _plan(run: _Run, settings: LdsSettings, queries: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    data_hash = hashlib.sha256(run.row_tokens().astype("<u4").tobytes()).hexdigest()[:16]
    return {
        "format": LDS_FORMAT,
        "version": LDS_VERSION,
        "settings": settings.to_dict(),
        "suite": str(run.suite_dir.resolve()),
        "suite_config": run.meta.get("config"),
        "trainer_version": run.meta.get("trainer_version"),
        "size": run.size.label,
        "model_seed": run.seed,
        "rows": run.n_rows,
        "rows_sha256": data_hash,
        "queries": [{"prompt_tokens": p, "completion_tokens": c} for p, c in queries],
        "device": str(run.device),
        "torch_threads": torch.get_num_threads(),  # the numerics depend on it; a resumed run must match it
        "torch_version": torch.__version__,
    }


# -- the harness -----------------------------------------------------------------------------------


def run_lds(suite_dir: str | os.PathLike[str], queries: Sequence[Any], settings: LdsSettings, out_dir: str | os.PathLike[str],
            progress: Progress = no_progress) -> dict[str, Any]:
    """Retrain ``settings.n_subsets`` random subsets of a suite model's shortened run and score each method's LDS.

    Args:
        suite_dir: a mini suite (``lmscope suite train``); the model is ``settings.size``'s first seed.
        queries: :class:`lmscope.influence.job.Query` texts (encoded with the suite's tokenizer), or
            ``(prompt ids, completion ids)`` pairs (e.g. :func:`heldout_queries`).
        settings: see :class:`LdsSettings`.
        out_dir: where the run's files go (see the module docstring); a rerun resumes what is there.

    Returns:
        The content of ``lds.json``: ``methods`` (per method ``mean_lds``, ``per_query``, ``n_finite``,
        fit facts), ``queries`` (tokens, texts, the full run's and the subsets' measurements),
        ``subsets`` (how many, rows kept), ``full_run`` (its comparison with the suite's checkpoint),
        ``seconds`` and the plan.
    """
    started = time.perf_counter()
    run = open_run(suite_dir, settings.size, settings.n_steps, settings.device)
    settings = LdsSettings(**{**settings.to_dict(), "size": run.size.label})
    token_queries, texts = _token_queries(run, queries)
    masks = subset_masks(run.n_rows, settings.n_subsets, settings.fraction, settings.seed)
    out = Path(out_dir).expanduser()
    plan = _plan(run, settings, token_queries)
    seconds: dict[str, float] = {}
    with directory_lock(out):
        plan_path = out / PLAN_FILE
        if plan_path.is_file():
            previous, wanted = json.loads(plan_path.read_text(encoding="utf-8")), json.loads(json.dumps(plan))
            if previous != wanted:
                differ = ", ".join(sorted(k for k in set(previous) | set(wanted) if previous.get(k) != wanted.get(k)))
                raise LmscopeError(f"{str(out)!r} holds another LDS run (its {differ} differ); choose another --out or delete it.")
        else:
            atomic_write_json(plan_path, plan)
        n_q = len(token_queries)

        # 1. the full run: every row kept
        clock = time.perf_counter()
        weights = out / FULL_WEIGHTS
        if weights.is_file():
            full_model = _load_weights(weights, run)
        else:
            full_model = train_run(run, None, progress, "lds: full run")
            _save_weights(weights, full_model)
        full_path = out / MEASUREMENTS_DIR / "full.json"
        full = _read_measurements(full_path, n_q)
        if full is None:
            full = measure(full_model, token_queries)
            atomic_write_json(full_path, {"measurements": full.tolist(), "checkpoint_match": _checkpoint_match(run, full_model)})
        checkpoint_match = json.loads(full_path.read_text(encoding="utf-8"))["checkpoint_match"]
        seconds["full_run"] = time.perf_counter() - clock

        # 2. every method's scores at the full run's weights
        rows = run.row_tokens()
        fits: dict[str, dict[str, Any]] = {}
        all_scores: dict[str, np.ndarray] = {}
        for method in settings.methods:
            clock = time.perf_counter()
            path = out / SCORES_DIR / f"{method}.npy"
            facts_path = out / SCORES_DIR / f"{method}.json"
            if not (path.is_file() and facts_path.is_file()):
                scores, facts = method_scores(full_model, rows, token_queries, method, settings, progress)
                _save_array(path, scores)
                atomic_write_json(facts_path, facts)
            all_scores[method] = np.load(path)
            fits[method] = json.loads(facts_path.read_text(encoding="utf-8"))
            seconds[f"scores_{method}"] = time.perf_counter() - clock
        del full_model

        # 3. the subsets, each saved as it completes
        clock = time.perf_counter()
        measured = np.zeros((settings.n_subsets, n_q), dtype=np.float64)
        progress("lds: retrain", 0, settings.n_subsets * settings.n_steps)
        for j in range(settings.n_subsets):
            path = out / MEASUREMENTS_DIR / f"subset{j:04d}.json"
            values = _read_measurements(path, n_q)
            if values is None:
                model = train_run(run, masks[j], progress, "lds: retrain", settings.n_subsets * settings.n_steps)
                values = measure(model, token_queries)
                atomic_write_json(path, {"subset": j, "rows_kept": int(masks[j].sum()), "measurements": values.tolist()})
            else:
                progress("lds: retrain", settings.n_steps, settings.n_subsets * settings.n_steps)
            measured[j] = values
        seconds["retrain"] = time.perf_counter() - clock

    # 4. the scores
    methods = {}
    for method in settings.methods:
        per_query = lds_of(all_scores[method], masks, measured)
        finite = per_query[np.isfinite(per_query)]
        methods[method] = {
            "mean_lds": float(finite.mean()) if len(finite) else None,
            "per_query": [None if not np.isfinite(v) else float(v) for v in per_query],
            "n_finite": int(len(finite)),
            **fits[method],
        }
    seconds["total"] = time.perf_counter() - started
    result = {
        "format": LDS_FORMAT,
        "version": LDS_VERSION,
        "suite": plan["suite"],
        "size": run.size.label,
        "n_steps": settings.n_steps,
        "rows": run.n_rows,
        "subsets": {"n": settings.n_subsets, "rows_kept": int(masks[0].sum()), "fraction": settings.fraction, "seed": settings.seed},
        "settings": settings.to_dict(),
        "methods": methods,
        "queries": [
            {
                "index": q,
                **(texts[q] if texts else {}),
                "prompt_tokens": token_queries[q][0],
                "completion_tokens": token_queries[q][1],
                "full_run_loss": float(full[q]),
                "subset_loss_mean": float(measured[:, q].mean()),
                "subset_loss_std": float(measured[:, q].std()),
            }
            for q in range(n_q)
        ],
        "measurements": measured.tolist(),
        "full_run": checkpoint_match,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    table = pa.Table.from_pylist(
        [{"method": m, "query": q, "lds": v} for m, info in methods.items() for q, v in enumerate(info["per_query"])], schema=LDS_SCHEMA
    )
    with atomic_path(out / LDS_PARQUET) as tmp:
        pq.write_table(table, tmp)
    atomic_write_json(out / LDS_JSON, result)
    plot_lds(result, out / LDS_PLOT)
    return result


# -- the figure ------------------------------------------------------------------------------------


def plot_lds(result: dict[str, Any], out_png: str | os.PathLike[str]) -> Path:
    """A bar per method: mean LDS over queries (± standard error), each query's LDS as a dot; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result.get("methods", {}))
    if not methods:
        raise LmscopeError("the LDS result holds no method to draw; run the harness with at least one method.")
    figure, axis = plt.subplots(figsize=(1.3 * len(methods) + 2.4, 3.6))
    rng = np.random.default_rng(0)
    for i, method in enumerate(methods):
        values = np.array([v for v in result["methods"][method]["per_query"] if v is not None], dtype=np.float64)
        if len(values) == 0:
            continue
        sem = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        axis.bar(i, values.mean(), color=f"C{i}", alpha=0.6, yerr=sem, capsize=4)
        axis.scatter(i + rng.uniform(-0.18, 0.18, len(values)), values, s=12, color="black", zorder=3)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(methods)), methods)
    axis.set_ylim(-1.05, 1.05)
    axis.set_ylabel("LDS (Spearman ρ)")
    subsets = result.get("subsets", {})
    axis.set_title(f"{result.get('size', '')}: {result.get('n_steps')} steps, {subsets.get('n')} subsets of {subsets.get('rows_kept')} rows",
                   fontsize=9, loc="left")
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return out_png
