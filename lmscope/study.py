"""The main job: run a study from a TOML config into a run directory.

A study builds (or reuses) the corpus, loads the model and writes the activations of the
chosen hooks over part of the held-out split; trains (or reuses) the mini suite; sweeps the
suite's checkpoints with the evaluation metrics; and writes a self-contained HTML report.
Later stages add their steps here, each reading and writing the same run directory::

    runs/<name>/
      study.toml        the resolved config
      manifest.json     every artifact with its sha256 and size, versions, timings
      summary.json      what the study found, as printed
      results/*.parquet the study's numbers in the one results schema (`lmscope results query`)
      activations/      the activation store (resumable)
      cache/            one Parquet file per (checkpoint, metric) of the sweep (resumable)
      figures/*.png     the report's figures
      report.html       the report: one file, works offline

A killed study resumes: the corpus, the model and the suite are cached, the activation
store skips the shards it already holds, and the sweep skips the units in ``cache/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import lmscope
from lmscope.errors import LmscopeError
from lmscope.tomlio import toml_value
from lmscope.fsio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from lmscope.progress import Progress, no_progress


@dataclass
class ActivationsConfig:
    """Which activations the study captures."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    """Hook names to capture (``lmscope models hooks SPEC`` lists them)."""
    tokens: int = 16384
    """Token positions to capture per hook."""
    ctx: int = 128
    """Context length of each forward pass, in tokens."""
    split: Literal["heldout", "train"] = "heldout"
    """Which split of the corpus the contexts come from."""
    batch_size: int = 8
    """Contexts per forward pass."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the activations."""

    def __post_init__(self) -> None:
        if not self.hooks:
            raise LmscopeError("[activations] hooks is empty; name at least one hook, e.g. blocks.6.hook_resid_post.")
        if self.tokens <= 0 or self.ctx <= 0 or self.batch_size <= 0:
            raise LmscopeError("[activations] tokens, ctx and batch_size must be positive integers.")
        if self.split not in ("heldout", "train"):
            raise LmscopeError(f"[activations] split {self.split!r} is not a split; use heldout or train.")


DEFAULT_EVAL_METRICS = ("bpb", "memorization", "icl", "induction", "lens", "tuned_lens")


@dataclass
class EvalConfig:
    """The evaluation sweep over the suite's checkpoints (``lmscope eval``'s settings)."""

    select: str = "log:10"
    """Checkpoint selector (``all``, ``log:N``, ``every:K``, lists, ranges) applied to every size."""
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_METRICS))
    """Metrics to run: bpb, memorization, icl, induction, lens, tuned_lens; empty to skip the sweep."""
    documents_per_domain: int = 8
    """Held-out documents per domain scored for bits per byte."""
    memorization_sequences: int = 256
    """Training sequences sampled across the data order for the memorization test."""
    batch_size: int = 8
    """Windows or contexts per forward pass."""

    def __post_init__(self) -> None:
        from lmscope.evals.sweep import METRICS

        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise LmscopeError(f"[eval] metrics has unknown name(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}.")
        if self.documents_per_domain <= 0 or self.memorization_sequences <= 0 or self.batch_size <= 0:
            raise LmscopeError("[eval] documents_per_domain, memorization_sequences and batch_size must be positive integers.")


@dataclass
class SaeStudyConfig:
    """The sparse autoencoder the study trains on one checkpoint of its suite (``lmscope sae train``'s settings)."""

    enabled: bool = True
    """Train, evaluate and describe an SAE (needs a suite)."""
    size: str = "1.6m"
    """Which model of the suite."""
    step: int | None = None
    """Its checkpoint step (``None``: the last)."""
    hook: str = "blocks.1.hook_resid_post"
    """Hook the SAE reads."""
    arch: Literal["relu", "topk", "batchtopk", "jumprelu"] = "topk"
    """Activation function."""
    width: int = 1024
    """Latents."""
    k: int | None = 16
    """Active latents per token (topk, batchtopk); leave out for relu and jumprelu."""
    tokens: int = 65536
    """Activations captured from the suite corpus's train split (so examples have training steps)."""
    epochs: int = 2
    """Passes over them."""
    batch_size: int = 1024
    """Activations per step."""
    cards: int = 12
    """Feature cards shown in the report."""
    track_select: str = "log:4"
    """Track features across these checkpoints of ``size`` (one SAE each, ``lmscope sae track``); ``""``: no track."""
    track_cards: int = 3
    """Lineage cards (a feature's top contexts at each checkpoint) shown in the report."""

    def __post_init__(self) -> None:
        if self.width <= 0 or self.tokens <= 0 or self.epochs <= 0 or self.batch_size <= 0 or self.cards < 0 \
                or self.track_cards < 0:
            raise LmscopeError("[sae] width, tokens, epochs and batch_size must be positive and cards, track_cards non-negative.")


@dataclass
class TraceStudyConfig:
    """Generations of one suite checkpoint traced into the suite's corpus (``lmscope trace``'s settings)."""

    enabled: bool = True
    """Index the suite's corpus, generate and trace (needs a suite)."""
    size: str = "1.6m"
    """Which model of the suite generates."""
    step: int | None = None
    """Its checkpoint step (``None``: the last); exposures are counted for this checkpoint."""
    prompts: list[str] = field(default_factory=lambda: ["If the", "This function returns"])
    """Prompts the model continues greedily."""
    max_new_tokens: int = 48
    """Tokens generated per prompt."""
    min_length: int = 5
    """Shortest span kept (tokens)."""
    max_frequency: int = 10
    """Spans occurring more often than this in the corpus are not kept."""

    def __post_init__(self) -> None:
        if not self.prompts or self.max_new_tokens <= 0 or self.min_length <= 0 or self.max_frequency <= 0:
            raise LmscopeError("[trace] needs at least one prompt, and positive max_new_tokens, min_length and max_frequency.")


@dataclass
class InfluenceStudyConfig:
    """Influence of the suite's training rows on queries, at several checkpoints (``lmscope influence``'s settings)."""

    enabled: bool = True
    """Fit factors and score training rows at each selected checkpoint (needs a suite)."""
    size: str = "1.6m"
    """Which model of the suite."""
    select: str = "64,512"
    """Checkpoints (a selector: ``log:N``, a list of steps, ``A..B``); each gets its own factors."""
    strategy: Literal["identity", "diagonal", "kfac", "ekfac"] = "ekfac"
    """Curvature."""
    fit_rows: int = 128
    """Training rows (a seeded sample of those each checkpoint had seen) the factors are fitted on."""
    candidates_top: int = 128
    """Rows scored per query: the top rows by BM25 against the query (the union over queries)."""
    completion_tokens: int = 16
    """With no ``queries``: each traced generation's first this many tokens are the completion."""
    top: int = 5
    """Rows shown per query."""
    queries: list[dict[str, str]] = field(default_factory=list)
    """Queries ``{prompt = "...", completion = "..."}``; empty: the ``[trace]`` generations."""

    def __post_init__(self) -> None:
        if self.fit_rows <= 0 or self.candidates_top <= 0 or self.completion_tokens <= 0 or self.top <= 0:
            raise LmscopeError("[influence] fit_rows, candidates_top, completion_tokens and top must be positive.")
        for i, query in enumerate(self.queries):
            if not isinstance(query, dict) or set(query) != {"prompt", "completion"}:
                raise LmscopeError(f"[influence] queries[{i}] must be a table with exactly the keys prompt and completion.")


@dataclass
class ExplainStudyConfig:
    """Explanations of the study SAE's features and of neurons of the same layer (``lmscope explain``'s settings)."""

    enabled: bool = True
    """Explain and score units (needs a suite and the [sae] step)."""
    explainer: str = "default"
    """The explainer: a local model spec (``default``: SmolLM2-135M-Instruct), or with ``base_url`` a served model id."""
    base_url: str = ""
    """An OpenAI-compatible API base (``http://host:port/v1``); empty: run ``explainer`` locally."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the server's API key."""
    features: int = 4
    """SAE features explained (a seeded draw among those that fire on 0.01 %–90 % of tokens)."""
    neurons: int = 4
    """Neurons of ``neuron_hook`` explained, drawn the same way."""
    neuron_hook: str = "blocks.1.mlp.hook_post"
    """Hook whose neurons are explained (the MLP of the [sae] hook's layer), captured on the same text."""
    window: int = 16
    """Tokens per record."""
    top: int = 2
    """Top-activating records shown to the explainer, and as many held out for scoring."""
    quantile: int = 1
    """Records from lower activation quantiles, shown and held out."""
    random: int = 2
    """Random records the simulator also scores."""
    quiet: int = 3
    """Non-activating records: detection's negatives."""
    track: bool = True
    """Explain the longest-lived lineage of the [sae] feature track at each of its checkpoints."""
    cards: int = 8
    """Explanation cards shown in the report."""

    def __post_init__(self) -> None:
        if self.features < 0 or self.neurons < 0 or self.cards < 0 or min(self.window, self.top) < 1:
            raise LmscopeError("[explain] features, neurons and cards must be non-negative and window, top positive.")
        if self.features == 1 or self.neurons == 1:
            raise LmscopeError("[explain] features and neurons must each be 0 or at least 2 (the shuffled baseline pairs units).")


@dataclass
class StudyConfig:
    """A study: one model, one corpus, and what to measure. The same object feeds the CLI, the TOML file and the API."""

    name: str = "default"
    """Run name; the run directory is ``<runs_dir>/<name>``."""
    model: str = "default"
    """Model spec (``OWNER/NAME@REV``, ``DIR[@REV]``, ``gguf:FILE`` or ``default``)."""
    corpus: str = "default"
    """``default`` (the Debian-documentation corpus, tokenized for the model) or a tokenized corpus directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model weights dtype."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``."""
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    """The activation capture step."""
    suite: str = "default"
    """Mini suite to train or reuse: ``default`` (the default suite, cached under ``$LMSCOPE_HOME``),
    a trained suite directory, or ``none`` to skip."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The evaluation sweep over the suite's checkpoints (skipped when there is no suite)."""
    sae: SaeStudyConfig = field(default_factory=SaeStudyConfig)
    """The sparse autoencoder trained on one checkpoint of the suite (skipped when there is no suite)."""
    trace: TraceStudyConfig = field(default_factory=TraceStudyConfig)
    """Generations of one suite checkpoint traced into the training data (skipped when there is no suite)."""
    influence: InfluenceStudyConfig = field(default_factory=InfluenceStudyConfig)
    """Influence functions: which training rows raised the probability of the traced generations (skipped when there is no suite)."""
    explain: ExplainStudyConfig = field(default_factory=ExplainStudyConfig)
    """Automated explanations of SAE features and neurons, scored (skipped when there is no suite or no SAE)."""

    def __post_init__(self) -> None:
        if isinstance(self.activations, dict):
            self.activations = _from_mapping(ActivationsConfig, self.activations, "[activations]")
        if isinstance(self.eval, dict):
            self.eval = _from_mapping(EvalConfig, self.eval, "[eval]")
        if isinstance(self.sae, dict):
            self.sae = _from_mapping(SaeStudyConfig, self.sae, "[sae]")
        if isinstance(self.trace, dict):
            self.trace = _from_mapping(TraceStudyConfig, self.trace, "[trace]")
        if isinstance(self.influence, dict):
            self.influence = _from_mapping(InfluenceStudyConfig, self.influence, "[influence]")
        if isinstance(self.explain, dict):
            self.explain = _from_mapping(ExplainStudyConfig, self.explain, "[explain]")
        if not self.name or any(ch in self.name for ch in "/\\") or self.name.startswith("."):
            raise LmscopeError(f"study name {self.name!r} must be a plain directory name (no slashes, not hidden).")


def _from_mapping(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LmscopeError(f"{where} has unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}.")
    return cls(**data)


def load_study_config(path: str | os.PathLike[str] | None) -> StudyConfig:
    """Read a study TOML file (``None``: the default study)."""
    if path is None:
        return StudyConfig()
    path = Path(path)
    if not path.is_file():
        raise LmscopeError(f"study config {str(path)!r} does not exist; give a TOML file or no argument for the default study.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise LmscopeError(f"study config {str(path)!r} is not valid TOML ({err}); fix the file.") from None
    body = data.get("study", data)
    try:
        return _from_mapping(StudyConfig, body, str(path))
    except TypeError as err:
        raise LmscopeError(f"study config {str(path)!r} has a value of the wrong type ({err}).") from None


def config_to_toml(config: StudyConfig) -> str:
    """The config as TOML that :func:`load_study_config` reads back to an equal config."""
    lines = ["[study]"]
    tables: list[tuple[str, Any]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        else:
            lines.append(f"{f.name} = {toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[study.{name}]"]
        # TOML has no null: a field left at None is left out, and reads back as None.
        lines += [f"{f.name} = {toml_value(getattr(table, f.name))}" for f in dataclasses.fields(table)
                  if getattr(table, f.name) is not None]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {"lmscope": lmscope.__version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pyarrow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _artifacts(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.name != "manifest.json":
            rows.append({"path": str(path.relative_to(run_dir)), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return rows


def _activation_summary(store_dir: Path) -> list[dict[str, Any]]:
    """Per hook: rows, width, mean L2 norm per row, mean and std of entries, streamed shard by shard."""
    from lmscope.activations.reader import ActivationStore

    store = ActivationStore.open(store_dir)
    rows: list[dict[str, Any]] = []
    for hook in store.hooks:
        count, total, total_sq, norm_sum = 0, 0.0, 0.0, 0.0
        for batch in store.stream(hook, batch_size=4096, seed=0, shuffle=False):
            x = batch.double()
            count += x.shape[0]
            total += x.sum().item()
            total_sq += (x * x).sum().item()
            norm_sum += x.norm(dim=-1).sum().item()
        d = store.d(hook)
        mean = total / (count * d)
        rows.append({
            "hook": hook,
            "rows": count,
            "d": d,
            "mean_row_norm": norm_sum / count,
            "mean": mean,
            "std": math.sqrt(max(total_sq / (count * d) - mean * mean, 0.0)),
        })
    return rows


def _rows_by_domain(store_dir: Path) -> dict[str, int]:
    """How many captured token positions came from each domain."""
    from lmscope.activations.reader import ActivationStore

    store = ActivationStore.open(store_dir)
    doc_index = store.metadata["doc_index"]
    table = store.documents
    domain_of = dict(zip(table.column("doc_index").to_pylist(), table.column("domain").to_pylist()))
    counts: dict[str, int] = {}
    for index, count in zip(*np.unique(doc_index[doc_index >= 0], return_counts=True)):
        domain = domain_of.get(int(index), "?")
        counts[domain] = counts.get(domain, 0) + int(count)
    return dict(sorted(counts.items()))


def _suite_summary(suite_dir: Path) -> dict[str, Any]:
    """Sizes, held-out bits per byte against the unigram baseline, and what step 0 trained on."""
    from lmscope.suites.replay import open_source, replay_step

    meta = json.loads((suite_dir / "suite.json").read_text())
    check_path = suite_dir / "learning_check.json"
    check = json.loads(check_path.read_text()) if check_path.is_file() else {}
    models = [
        {"model": name, "params": meta.get("sizes", {}).get(row.get("size"), {}).get("params"), "step": row.get("step"),
         "heldout_bits_per_byte": row.get("bits_per_byte")}
        for name, row in check.get("models", {}).items()
    ]
    batch = replay_step(open_source(str(suite_dir)), 0)
    return {
        "path": str(suite_dir),
        "steps": meta.get("steps"),
        "tokens_per_step": meta.get("tokens_per_step"),
        "checkpoints": len(meta.get("checkpoint_steps", [])),
        "unigram_bits_per_byte": check.get("unigram", {}).get("bits_per_byte"),
        "models": models,
        "step0_rows": len(batch.rows),
        "step0_documents": len(batch.documents()),
        "step0_domains": batch.domains(),
    }


def _write_study_results(run_dir: Path, config: StudyConfig, summary: dict[str, Any]) -> None:
    """The study's numbers as rows of the results schema, in ``results/*.parquet``."""
    from lmscope.results.schema import write_results

    rows = []
    for stats in summary["activations"]:
        for metric in ("mean_row_norm", "mean", "std"):
            rows.append({"model": config.model, "metric": f"activation_{metric}", "domain": config.activations.split,
                         "value": float(stats[metric]), "hook": stats["hook"]})
    write_results(rows, run_dir / "results" / "activations.parquet")
    suite = summary.get("suite")
    if suite:
        meta = json.loads((Path(suite["path"]) / "suite.json").read_text())
        models = meta.get("models", {})
        rows = []
        for model in suite["models"]:
            info = models.get(model["model"], {})
            step = model["step"]
            rows.append({
                "suite": meta.get("name"), "model": model["model"], "size": info.get("size", model["model"]),
                "seed": info.get("seed"), "revision": f"step{step}", "step": step,
                "tokens_seen": step * suite["tokens_per_step"] if step is not None else None,
                "metric": "bits_per_byte", "domain": "heldout", "value": model["heldout_bits_per_byte"],
            })
        rows.append({"suite": meta.get("name"), "model": "unigram", "metric": "bits_per_byte", "domain": "heldout",
                     "value": suite["unigram_bits_per_byte"]})
        write_results(rows, run_dir / "results" / "suite.parquet")


def _run_evaluation(config: StudyConfig, suite_dir: Path, run_dir: Path, progress: Progress) -> dict[str, Any]:
    """The sweep over the suite's checkpoints, into ``run_dir/results/eval.parquet`` (cached in ``run_dir/cache``)."""
    import pyarrow.parquet as pq

    from lmscope.evals.sweep import run_sweep

    ev = config.eval
    path = run_sweep(str(suite_dir), suite_dir / "corpus", run_dir, select=ev.select, metrics=tuple(ev.metrics),
                     documents_per_domain=ev.documents_per_domain, max_documents=None,
                     memorization_sequences=ev.memorization_sequences, batch_size=ev.batch_size, device=config.device,
                     progress=progress)
    table = pq.read_table(path, columns=["model", "step"])
    return {"results": str(path.relative_to(run_dir)), "rows": table.num_rows, "metrics": list(ev.metrics),
            "models": sorted(set(table.column("model").to_pylist())),
            "steps": sorted(set(s for s in table.column("step").to_pylist() if s is not None))}


def _run_sae(config: StudyConfig, suite_dir: Path, run_dir: Path, progress: Progress) -> dict[str, Any]:
    """Train, evaluate and describe the study's SAE in ``run_dir/sae``; its numbers go to ``results/sae.parquet``."""
    from lmscope.sae.job import run_sae_job
    from lmscope.sae.train import SaeTrainConfig

    sc = config.sae
    spec, identity = _suite_checkpoint(suite_dir, sc.size, sc.step, "[sae]")
    train = SaeTrainConfig(hook=sc.hook, arch=sc.arch, width=sc.width, k=sc.k, epochs=sc.epochs, batch_size=sc.batch_size)
    summary = run_sae_job(spec, train, run_dir / "sae", corpus=suite_dir / "corpus", tokens=sc.tokens, ctx=128,
                          replay_suite=suite_dir, identity=identity, device=config.device, progress=progress)
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "results" / "sae.parquet", (run_dir / "sae" / "results.parquet").read_bytes())
    return {**summary, "model": spec, "identity": identity, "config": dataclasses.asdict(sc)}


def _run_sae_track(config: StudyConfig, suite_dir: Path, run_dir: Path, progress: Progress) -> dict[str, Any]:
    """Track the study SAE's features across ``[sae] track_select`` in ``run_dir/sae-track``; rows to ``results/sae_track.parquet``."""
    from lmscope.sae.track import RESULTS_FILE, run_sae_track
    from lmscope.sae.train import SaeTrainConfig

    sc = config.sae
    if not (suite_dir / sc.size).is_dir():
        raise LmscopeError(f"[sae] size {sc.size!r} is not in suite {suite_dir}; choose one of its sizes.")
    train = SaeTrainConfig(hook=sc.hook, arch=sc.arch, width=sc.width, k=sc.k, epochs=sc.epochs, batch_size=sc.batch_size)
    track = run_sae_track(str(suite_dir / sc.size), train, run_dir / "sae-track", select=sc.track_select, tokens=sc.tokens,
                          ctx=128, device=config.device, progress=progress)
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "results" / "sae_track.parquet", (run_dir / "sae-track" / RESULTS_FILE).read_bytes())
    return {"out": "sae-track", "size": sc.size, "hook": sc.hook, "select": sc.track_select, "steps": track["steps"],
            "lineages": track["lineages"], "summary": track["summary"], "cards": sc.track_cards}


def _suite_checkpoint(suite_dir: Path, size: str, step: int | None, where: str) -> tuple[str, dict[str, Any]]:
    """The model spec of ``size`` at ``step`` (``None``: the last) of a mini suite, and its result-schema identity."""
    from lmscope.suites.catalog import resolve_suite

    suite, _ = resolve_suite(str(suite_dir))
    models = {m.size: m for m in suite.models}
    if size not in models:
        raise LmscopeError(f"{where} size {size!r} is not in suite {suite_dir}; it has {', '.join(models)}.")
    checkpoints = {c.step: c for c in suite.checkpoints()}
    step = max(checkpoints) if step is None else step
    if step not in checkpoints:
        raise LmscopeError(f"{where} step {step} is not a checkpoint of the suite; it has steps {', '.join(map(str, sorted(checkpoints)))}.")
    checkpoint = checkpoints[step]
    seeds = json.loads((suite_dir / "suite.json").read_text()).get("models", {})
    identity = {"suite": suite.name, "model": size, "size": size, "seed": seeds.get(size, {}).get("seed"),
                "revision": checkpoint.revision, "step": step, "tokens_seen": checkpoint.tokens_seen}
    return f"{models[size].model_id}@{checkpoint.revision}", identity


def _run_trace(config: StudyConfig, suite_dir: Path, run_dir: Path, progress: Progress) -> dict[str, Any]:
    """Trace the ``[trace]`` model's generations into the suite corpus in ``run_dir/traces``; rows to ``results/trace.parquet``."""
    from lmscope.index.trace_job import run_trace_job

    tc = config.trace
    spec, identity = _suite_checkpoint(suite_dir, tc.size, tc.step, "[trace]")
    summary = run_trace_job(suite_dir, spec, list(tc.prompts), run_dir / "traces", step=identity["step"], identity=identity,
                            max_new_tokens=tc.max_new_tokens, min_length=tc.min_length, max_frequency=tc.max_frequency,
                            device=config.device, progress=progress)
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "results" / "trace.parquet", (run_dir / "traces" / "results.parquet").read_bytes())
    return {**summary, "out": "traces", "identity": identity}


def _run_influence(config: StudyConfig, suite_dir: Path, run_dir: Path, trace_summary: dict[str, Any] | None,
                   progress: Progress) -> dict[str, Any]:
    """Influence of the suite's rows on the ``[influence]`` queries (or the traced generations) in ``run_dir/influence``."""
    from lmscope.influence.factors import FactorSettings
    from lmscope.influence.job import Query, ScoreSettings
    from lmscope.influence.study_job import run_influence_job, trace_queries
    from lmscope.suites.catalog import resolve_suite
    from lmscope.suites.selectors import select_checkpoints

    ic = config.influence
    spec, identity = _suite_checkpoint(suite_dir, ic.size, None, "[influence]")
    suite, _ = resolve_suite(str(suite_dir))
    steps = [c.step for c in select_checkpoints(suite.checkpoints(), ic.select, "[influence] select")]
    if ic.queries:
        queries = [Query(q["prompt"], q["completion"]) for q in ic.queries]
        source = "config"
    else:
        if trace_summary is None:
            raise LmscopeError("[influence] has no queries and [trace] is disabled; give [influence] queries or enable [trace].")
        if trace_summary["identity"]["size"] != ic.size:
            raise LmscopeError(f"[influence] size {ic.size!r} differs from [trace] size {trace_summary['identity']['size']!r}, whose "
                               "generations would be the queries; use the same size or give [influence] queries.")
        queries = trace_queries(run_dir / trace_summary["out"], ic.completion_tokens, suite_dir / "tokenizer" / "tokenizer.json")
        source = "trace"
    summary = run_influence_job(suite_dir, ic.size, steps, queries, run_dir / "influence", identity=identity,
                                fit=FactorSettings(strategy=ic.strategy, batch_size=16), fit_rows=ic.fit_rows,
                                score=ScoreSettings(candidates_top=ic.candidates_top, top=ic.top, batch_size=16),
                                device=config.device, progress=progress)
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "results" / "influence.parquet", (run_dir / "influence" / "results.parquet").read_bytes())
    return {**summary, "out": "influence", "size": ic.size, "queries_from": source, "identity": identity, "model": spec}


def _run_explain(config: StudyConfig, suite_dir: Path, run_dir: Path, sae_summary: dict[str, Any],
                 track_summary: dict[str, Any] | None, hooked: Any, progress: Progress) -> dict[str, Any]:
    """Explain and score the study SAE's features and the neurons of ``[explain] neuron_hook`` in ``run_dir/explain``."""
    from lmscope.activations.job import capture_corpus_activations
    from lmscope.activations.reader import ActivationStore
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.explain.explainer import ExplainerConfig, open_chat_model
    from lmscope.explain.job import ExplainSettings, run_explain
    from lmscope.explain.records import RecordSettings, UnitSource
    from lmscope.models.hooks import HookedModel
    from lmscope.sae.io import load_sae
    from lmscope.suites.replay import MiniSuiteSource

    ec, sc = config.explain, config.sae
    out = run_dir / "explain"
    explainer = ExplainerConfig(model=ec.explainer, base_url=ec.base_url or None, api_key_env=ec.api_key_env)
    reuse = (hooked.model, hooked.tokenizer) if not ec.base_url and ec.explainer == config.model else None
    model = open_chat_model(explainer, device=config.device, loaded=reuse)
    records = RecordSettings(window=ec.window, after=min(4, ec.window - 1), top=ec.top, quantile=ec.quantile, random=ec.random,
                             quiet=ec.quiet)
    studied = HookedModel.from_spec(sae_summary["model"], device=config.device)
    replay = MiniSuiteSource(suite_dir)
    identity = sae_summary.get("identity") or {}
    label = f"{identity['model']} at step {identity['step']}" if identity.get("step") is not None else sae_summary["model"]
    summary: dict[str, Any] = {"out": "explain", "explainer": model.identity, "model": label, "runs": {}}
    if ec.features:
        sae, _ = load_sae(Path(sae_summary["sae"]))
        source = UnitSource(ActivationStore.open(sae_summary["store"]), sae.shape.hook, sae)
        summary["runs"]["features"] = run_explain(model, source, out / "features", ExplainSettings(n=ec.features, records=records),
                                                  tokenizer=studied.tokenizer, replay=replay, identity=identity,
                                                  label=f"sae {sc.hook}", progress=progress)
    if ec.neurons:
        store_dir = out / "neuron-activations"
        studied.hook_point(ec.neuron_hook)
        capture_corpus_activations(studied, TokenizedCorpus.open(suite_dir / "corpus"), [ec.neuron_hook], sc.tokens, 128, store_dir,
                                   split="train", meta={"model": sae_summary["model"]}, progress=progress)
        source = UnitSource(ActivationStore.open(store_dir), ec.neuron_hook)
        summary["runs"]["neurons"] = run_explain(model, source, out / "neurons", ExplainSettings(n=ec.neurons, records=records),
                                                 tokenizer=studied.tokenizer, replay=replay, identity=identity,
                                                 progress=progress)
    if ec.track and track_summary is not None:
        summary["track"] = _explain_lineage(model, run_dir / track_summary["out"], out / "track", records, studied.tokenizer,
                                            replay, progress)
    tables = [out / name / "results.parquet" for name in ("features", "neurons") if (out / name / "results.parquet").is_file()]
    if tables:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from lmscope.results.schema import write_results

        write_results(pa.concat_tables([pq.read_table(t) for t in tables], promote_options="default"),
                      run_dir / "results" / "explain.parquet")
    summary["cards"] = ec.cards
    return summary


def _explain_lineage(model: Any, track_dir: Path, out: Path, records: Any, tokenizer: Any, replay: Any,
                     progress: Progress) -> dict[str, Any]:
    """The longest-lived lineage of a feature track, explained and scored at each checkpoint where it is alive."""
    from lmscope.activations.reader import ActivationStore
    from lmscope.explain.job import ExplainSettings, run_explain
    from lmscope.explain.records import UnitSource
    from lmscope.sae.io import load_sae
    from lmscope.sae.track import pick_lineages, read_track

    timeline, _, _ = read_track(track_dir)
    lineage = pick_lineages(timeline, 1)[0]
    history = []
    for row in sorted((r for r in timeline.to_pylist() if r["lineage"] == lineage), key=lambda r: r["step"]):
        step_dir = track_dir / f"step{row['step']}"
        sae, _ = load_sae(step_dir / "sae")
        source = UnitSource(ActivationStore.open(step_dir / "activations"), sae.shape.hook, sae)
        result = run_explain(model, source, out / f"step{row['step']}", ExplainSettings(units=(row["feature"],), baseline=False,
                                                                                         records=records),
                             tokenizer=tokenizer, replay=replay, progress=progress)
        history.append({"step": row["step"], "latent": row["feature"], "density": row["density"],
                        "explanation": result["explanations"][str(row["feature"])], "simulation": result["median"]["simulation"],
                        "detection": result["median"]["detection"], "fuzzing": result["median"]["fuzzing"]})
    return {"lineage": lineage, "history": history}


def run_study(config: StudyConfig, runs_dir: str | os.PathLike[str] = "runs", progress: Progress = no_progress) -> dict[str, Any]:
    """Run a study into ``runs_dir/<config.name>`` and return its summary (also written to ``summary.json``)."""
    from lmscope.activations.job import capture_corpus_activations
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.models.hooks import HookedModel

    run_dir = Path(runs_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = run_dir / "study.toml"
    if previous.is_file() and load_study_config(previous) != config:
        raise LmscopeError(
            f"run directory {str(run_dir)!r} holds a different study; choose another name, or delete the directory to start over."
        )
    atomic_write_text(previous, config_to_toml(config))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    timings: dict[str, float] = {}

    clock = time.perf_counter()
    if config.corpus == "default":
        from lmscope.data.default_corpus import ensure_default_corpus

        corpus_dir = ensure_default_corpus(config.model, progress=progress)
    else:
        corpus_dir = Path(config.corpus)
    corpus = TokenizedCorpus.open(corpus_dir)
    timings["corpus_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    progress("load model", 0, 1)
    hooked = HookedModel.from_spec(config.model, dtype=config.dtype, device=config.device)
    progress("load model", 1, 1)
    for hook in config.activations.hooks:
        hooked.hook_point(hook)
    timings["load_model_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    act = config.activations
    capture_corpus_activations(
        hooked,
        corpus,
        act.hooks,
        act.tokens,
        act.ctx,
        run_dir / "activations",
        split=act.split,
        batch_size=act.batch_size,
        dtype=act.dtype,
        meta={"model": config.model, "model_dtype": config.dtype},
        progress=progress,
    )
    timings["activations_s"] = time.perf_counter() - clock

    suite_summary = None
    if config.suite != "none":
        clock = time.perf_counter()
        if config.suite == "default":
            from lmscope.suites.train import ensure_default_suite

            suite_dir = ensure_default_suite(progress, device=config.device)
        else:
            suite_dir = Path(config.suite)
            if not (suite_dir / "suite.json").is_file():
                raise LmscopeError(f"suite {config.suite!r} is not a trained suite directory (no suite.json); train one with `lmscope suite train`.")
        suite_summary = _suite_summary(suite_dir)
        timings["suite_s"] = time.perf_counter() - clock

    evaluation = None
    if suite_summary is not None and config.eval.metrics:
        clock = time.perf_counter()
        evaluation = _run_evaluation(config, Path(suite_summary["path"]), run_dir, progress)
        timings["eval_s"] = time.perf_counter() - clock

    sae_summary = None
    if suite_summary is not None and config.sae.enabled:
        clock = time.perf_counter()
        sae_summary = _run_sae(config, Path(suite_summary["path"]), run_dir, progress)
        timings["sae_s"] = time.perf_counter() - clock

    track_summary = None
    if suite_summary is not None and config.sae.enabled and config.sae.track_select:
        clock = time.perf_counter()
        track_summary = _run_sae_track(config, Path(suite_summary["path"]), run_dir, progress)
        timings["sae_track_s"] = time.perf_counter() - clock

    trace_summary = None
    if suite_summary is not None and config.trace.enabled:
        clock = time.perf_counter()
        trace_summary = _run_trace(config, Path(suite_summary["path"]), run_dir, progress)
        timings["trace_s"] = time.perf_counter() - clock

    influence_summary = None
    if suite_summary is not None and config.influence.enabled:
        clock = time.perf_counter()
        influence_summary = _run_influence(config, Path(suite_summary["path"]), run_dir, trace_summary, progress)
        timings["influence_s"] = time.perf_counter() - clock

    explain_summary = None
    if sae_summary is not None and config.explain.enabled and (config.explain.features or config.explain.neurons):
        clock = time.perf_counter()
        explain_summary = _run_explain(config, Path(suite_summary["path"]), run_dir, sae_summary, track_summary, hooked, progress)
        timings["explain_s"] = time.perf_counter() - clock

    corpus_stats = {"path": str(corpus_dir), "documents": len(corpus), "tokens": int(corpus.n_tokens), "domains": corpus.domains}
    summary = {
        "study": config.name,
        "model": config.model,
        "model_type": hooked.config.model_type,
        "n_layers": hooked.n_layers,
        "device": str(hooked.device),
        "corpus": corpus_stats,
        "activations": _activation_summary(run_dir / "activations"),
        "activation_rows_by_domain": _rows_by_domain(run_dir / "activations"),
        "suite": suite_summary,
        "evaluation": evaluation,
        "sae": sae_summary,
        "sae_track": track_summary,
        "trace": trace_summary,
        "influence": influence_summary,
        "explain": explain_summary,
        "timings": timings,
    }
    _write_study_results(run_dir, config, summary)
    clock = time.perf_counter()
    progress("write report", 0, 1)
    from lmscope.report.build import build_report

    summary["report"] = str(build_report(run_dir, summary))
    progress("write report", 1, 1)
    timings["report_s"] = time.perf_counter() - clock
    atomic_write_json(run_dir / "summary.json", summary)
    manifest = {
        "lmscope_version": lmscope.__version__,
        "model": {"spec": config.model, "source": hooked.source, "dtype": config.dtype, "device": str(hooked.device)},
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(config),
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "timings": timings,
        "artifacts": _artifacts(run_dir),
    }
    atomic_write_json(run_dir / "manifest.json", manifest)
    return summary
