"""One SAE end to end: capture (or reuse) activations, train, save in SAELens's format, evaluate, describe features.

Layout of ``out_dir``::

    activations/              the training activations (train split), unless a store was given
    train/                    checkpoint.pt (resume) and train_log.parquet
    sae/                      cfg.json + sae_weights.safetensors (SAELens's format; lmscope.* in metadata)
    eval.json                 reconstruction metrics on the store, spliced metrics on held-out text
    features/                 feature_stats.parquet, feature_examples.parquet
    results.parquet           the numbers as rows of the results schema

Every step is resumable: the store skips its shards, training resumes from its checkpoint, and
a finished step is not redone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_write_json
from lmscope.progress import Progress, no_progress


def run_sae_job(
    model_spec: str,
    config: Any,
    out_dir: str | os.PathLike[str],
    *,
    corpus: str | os.PathLike[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    tokens: int = 262144,
    ctx: int = 128,
    replay_suite: str | os.PathLike[str] | None = None,
    identity: dict[str, Any] | None = None,
    eval_contexts: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    init: dict[str, Any] | None = None,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Train ``config`` (a :class:`lmscope.sae.train.SaeTrainConfig`) on ``model_spec``'s activations and evaluate it.

    Args:
        corpus: tokenized corpus (needed for capture, the spliced evaluation and feature contexts).
        store: an existing activation store holding ``config.hook`` (skips the capture).
        tokens, ctx: the capture's budget and context length (train split of ``corpus``; ctx is capped
            at the model's context), also the spliced evaluation's context length.
        replay_suite: a mini suite whose corpus ``corpus`` is, for the training steps of feature examples.
        identity: result-schema columns (suite, model, size, seed, revision, step, tokens_seen).
        init: normalised parameters to start training from (:func:`lmscope.sae.train.trained_parameters`).
    """
    from lmscope.activations.job import capture_corpus_activations
    from lmscope.activations.reader import ActivationStore
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.models.hooks import HookedModel
    from lmscope.results.schema import write_results
    from lmscope.sae import evaluate
    from lmscope.sae.features import feature_report
    from lmscope.sae.io import load_sae, save_sae
    from lmscope.sae.train import train_sae

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        raise LmscopeError("an SAE job needs --corpus (a tokenized corpus for the model) for its evaluation and feature contexts.")
    tokenized = TokenizedCorpus.open(corpus)
    hooked = HookedModel.from_spec(model_spec, dtype=dtype, device=device)
    hooks = [config.hook] + ([config.out_hook] if config.out_hook else [])
    for hook in hooks:
        hooked.hook_point(hook)
    ctx = capped_ctx(hooked, ctx)
    if store is None:
        store = out / "activations"
        capture_corpus_activations(hooked, tokenized, hooks, tokens, ctx, store, split="train",
                                   meta={"model": model_spec}, progress=progress)
    activations = ActivationStore.open(store)

    sae_dir = out / "sae"
    if not (sae_dir / "cfg.json").is_file():
        sae = train_sae(config, activations, out / "train", progress=progress, device=hooked.device, init=init)
        save_sae(sae, sae_dir, metadata={"model": model_spec, "identity": identity or {}, "config": dataclasses.asdict(config),
                                         "store": str(store)})
    sae, _ = load_sae(sae_dir)
    sae = sae.to(hooked.device)

    eval_path = out / "eval.json"
    if eval_path.is_file():
        evaluation = json.loads(eval_path.read_text())
    else:
        progress("evaluate sae", 0, 2)
        reconstruction = evaluate.reconstruction_metrics(sae, activations)
        progress("evaluate sae", 1, 2)
        spliced = evaluate.spliced_metrics(hooked, sae, tokenized, ctx=ctx, n_contexts=eval_contexts)
        progress("evaluate sae", 1, 2)
        write_results(evaluate.result_rows([reconstruction, spliced], **(identity or {"model": model_spec})),
                      out / "results.parquet")
        evaluation = {"reconstruction": reconstruction.to_dict(), "spliced": spliced.to_dict()}
        atomic_write_json(eval_path, evaluation)

    features_dir = out / "features"
    if not (features_dir / "feature_examples.parquet").is_file():
        replay = None
        if replay_suite is not None:
            from lmscope.suites.replay import MiniSuiteSource

            replay = MiniSuiteSource(replay_suite)
        report = feature_report(sae, activations, tokenizer=hooked.tokenizer,
                                unembedding=None if sae.shape.transcoder else hooked.model.get_output_embeddings().weight.detach(),
                                replay=replay, progress=progress)
        report.write(features_dir)
    return {"out": str(out), "sae": str(sae_dir), "store": str(store), "features": str(features_dir), **evaluation}


def run_streamed_sae_job(model: str, configs: list[Any], dirs: list[Path], corpus: str | os.PathLike[str], *, tokens: int,
                         ctx: int, buffer_rows: int | None = None, context_batch: int = 8, dtype: str = "float32",
                         device: str = "auto", progress: Progress = no_progress) -> list[dict[str, Any]]:
    """Train ``configs`` from one model stream (no activation store) into ``dirs``, save and evaluate each.

    Each directory gets ``train/``, ``sae/`` (SAELens's format), ``eval.json`` (spliced metrics on
    held-out text) and ``results.parquet``; there is no store, so no reconstruction metrics or features.
    ``tokens`` are the stream's valid positions per pass (train split), ``buffer_rows`` its mixing buffer.
    """
    import pyarrow.parquet as pq

    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.models.hooks import HookedModel
    from lmscope.results.schema import write_results
    from lmscope.sae import evaluate
    from lmscope.sae.io import load_sae, save_sae
    from lmscope.sae.stream import StreamConfig
    from lmscope.sae.train import TRAIN_LOG_FILE, train_saes_from_model

    tokenized = TokenizedCorpus.open(corpus)
    hooked = HookedModel.from_spec(model, dtype=dtype, device=device)
    ctx = capped_ctx(hooked, ctx)
    settings = StreamConfig(ctx=ctx, buffer_rows=buffer_rows, n_tokens=tokens, split="train", context_batch=context_batch)
    saes = train_saes_from_model(configs, hooked, tokenized, [d / "train" for d in dirs], stream=settings, progress=progress,
                                 device=hooked.device)
    summaries = []
    for config, sae, out in zip(configs, saes, dirs):
        sae_dir, eval_path = out / "sae", out / "eval.json"
        log = pq.read_table(out / "train" / TRAIN_LOG_FILE).to_pylist()[-1]
        if not (sae_dir / "cfg.json").is_file():
            save_sae(sae, sae_dir, metadata={"model": model, "identity": {}, "config": dataclasses.asdict(config),
                                             "stream": settings.to_dict()})
        if eval_path.is_file():
            evaluation = json.loads(eval_path.read_text())
        else:
            sae, _ = load_sae(sae_dir)
            spliced = evaluate.spliced_metrics(hooked, sae.to(hooked.device), tokenized, ctx=ctx, n_contexts=16)
            write_results(evaluate.result_rows([spliced], model=model), out / "results.parquet")
            evaluation = {"spliced": spliced.to_dict()}
            atomic_write_json(eval_path, evaluation)
        summaries.append({"out": str(out), "sae": str(sae_dir), "store": None, "features": None,
                          "training": {key: log[key] for key in ("step", "tokens", "fvu", "l0", "dead_fraction")}, **evaluation})
    return summaries


def capped_ctx(hooked: Any, ctx: int) -> int:
    """``ctx``, at most the model's positions (as :func:`lmscope.sae.job.run_sae_job` caps it)."""
    limit = int(getattr(hooked.model.config, "max_position_embeddings", 0) or 0)
    return min(ctx, limit) if limit else ctx
