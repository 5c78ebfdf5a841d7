"""``lmscope sae``: train, evaluate and describe sparse autoencoders on any hook of any checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli import app
from lmscope.cli.options import SPEC_HELP, DeviceOption, DtypeOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout
from lmscope.progress import Progress

sae_app = typer.Typer(help="Sparse autoencoders and transcoders: train, evaluate, describe features.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")


@sae_app.command("train")
def train(
    model: Annotated[str, typer.Option("--model", help=SPEC_HELP)],
    hook: Annotated[list[str], typer.Option("--hook", help="Hook the SAE reads (see `lmscope models hooks SPEC`); repeat it to "
                                            "train one SAE per hook, into OUT/<hook>/.")],
    corpus: Annotated[Path, typer.Option("--corpus", help="Tokenized corpus for this model (train split: training; held-out: evaluation).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (rerun to resume).")],
    arch: Annotated[str, typer.Option(help="relu, topk, batchtopk or jumprelu.")] = "topk",
    width: Annotated[int | None, typer.Option(help="Latents (default expansion factor × d_in).")] = None,
    expansion_factor: Annotated[int, typer.Option("--expansion-factor", help="Latents per input dimension when --width is not given.")] = 16,
    k: Annotated[int | None, typer.Option(help="topk/batchtopk: active latents per token (default 32).")] = None,
    out_hook: Annotated[str | None, typer.Option("--out-hook", help="Transcoder: the hook to predict from --hook (one --hook only).")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Existing activation store holding every --hook (skips the capture).")] = None,
    tokens: Annotated[int, typer.Option(help="Activations to capture from the train split (--stream: tokens per pass over it).")] = 262144,
    ctx: Annotated[int, typer.Option(help="Context length of the capture (or stream) and the spliced evaluation.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Activations per training step.")] = 4096,
    epochs: Annotated[int, typer.Option(help="Passes over the activations (--stream: trains on tokens × epochs).")] = 1,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 2e-4 / sqrt(width / 2^14)).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights, the data order and resampling.")] = 0,
    suite: Annotated[Path | None, typer.Option("--suite", help="Mini suite whose corpus --corpus is: feature examples get their training steps.")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Train from the model directly, without an activation store: one "
                                         "forward pass feeds every --hook, rows mixed in a shuffling buffer (no feature report).")] = False,
    buffer_rows: Annotated[int | None, typer.Option("--buffer-rows", help="--stream: rows of the mixing buffer, at least 2 batches "
                                                    "(default 16 × --batch-size); larger mixes better, costs memory.")] = None,
    context_batch: Annotated[int | None, typer.Option("--context-batch", help="--stream: contexts per forward pass (default 8).")] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Capture activations (or stream them with --stream), train SAEs (resumable), save them in SAELens's format, evaluate them."""
    from lmscope.errors import LmscopeError
    from lmscope.sae.job import run_sae_job, run_streamed_sae_job
    from lmscope.sae.train import SaeTrainConfig

    hooks = list(hook)
    repeated = sorted({h for h in hooks if hooks.count(h) > 1})
    if repeated:
        raise LmscopeError(f"--hook {repeated[0]} is given twice; give each hook once.")
    if out_hook is not None and len(hooks) > 1:
        raise LmscopeError(f"--out-hook pairs with one --hook, but {len(hooks)} were given; train the transcoder on its own.")
    if stream and (store is not None or suite is not None):
        raise LmscopeError(f"--stream trains without an activation store, so {'--store' if store is not None else '--suite'} "
                           "(which needs one) cannot go with it; drop one of them.")
    if not stream and (buffer_rows is not None or context_batch is not None):
        raise LmscopeError(f"{'--buffer-rows' if buffer_rows is not None else '--context-batch'} sets up the model stream; "
                           "add --stream or drop it.")
    configs = [SaeTrainConfig(hook=h, out_hook=out_hook, arch=arch, width=width, expansion_factor=expansion_factor, k=k,
                              batch_size=batch_size, epochs=epochs, lr=lr, seed=seed,
                              total_tokens=tokens * epochs if stream else None) for h in hooks]
    dirs = [out] if len(hooks) == 1 else [out / h for h in hooks]
    with progress_bars(enabled=not as_json) as progress:
        if stream:
            summaries = run_streamed_sae_job(model, configs, dirs, corpus, tokens=tokens, ctx=ctx, buffer_rows=buffer_rows,
                                             context_batch=context_batch or 8, dtype=dtype, device=device, progress=progress)
        else:
            if len(hooks) > 1 and store is None:
                store = _capture_hooks(model, hooks, corpus, out / "activations", tokens=tokens, ctx=ctx, dtype=dtype,
                                       device=device, progress=progress)
            summaries = [run_sae_job(model, config, directory, corpus=corpus, store=store, tokens=tokens, ctx=ctx,
                                     replay_suite=suite, device=device, dtype=dtype, progress=progress)
                         for config, directory in zip(configs, dirs)]
    if len(summaries) == 1:
        _print_summary(summaries[0], as_json)
    elif as_json:
        print_json({"out": str(out), "saes": dict(zip(hooks, summaries))})
    else:
        for name, summary in zip(hooks, summaries):
            stdout.print(f"[bold]{name}[/]", highlight=False)
            _print_summary(summary, as_json)


def _capture_hooks(model: str, hooks: list[str], corpus: Path, store: Path, *, tokens: int, ctx: int, dtype: str, device: str,
                   progress: Progress) -> Path:
    """Capture every hook into one store in one pass, as :func:`lmscope.sae.job.run_sae_job` captures one."""
    from lmscope.activations.job import capture_corpus_activations
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.models.hooks import HookedModel
    from lmscope.sae.job import capped_ctx

    tokenized = TokenizedCorpus.open(corpus)
    hooked = HookedModel.from_spec(model, dtype=dtype, device=device)
    for name in hooks:
        hooked.hook_point(name)
    capture_corpus_activations(hooked, tokenized, hooks, tokens, capped_ctx(hooked, ctx), store, split="train",
                               meta={"model": model}, progress=progress)
    return store


@sae_app.command("eval")
def evaluate(
    sae_dir: Annotated[Path, typer.Argument(help="An SAE directory (cfg.json + sae_weights.safetensors; SAELens's format).")],
    model: Annotated[str, typer.Option("--model", help=SPEC_HELP)],
    corpus: Annotated[Path, typer.Option("--corpus", help="Tokenized corpus for this model; its held-out split is used.")],
    store: Annotated[Path | None, typer.Option("--store", help="Activation store for the reconstruction metrics (optional).")] = None,
    ctx: Annotated[int, typer.Option(help="Context length.")] = 128,
    contexts: Annotated[int, typer.Option(help="Held-out contexts for the spliced metrics.")] = 16,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Loss recovered with the SAE spliced in (against zero and mean ablation), KL, and reconstruction metrics."""
    from lmscope.activations.reader import ActivationStore
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.models.hooks import HookedModel
    from lmscope.sae import evaluate as sae_eval
    from lmscope.sae.io import load_sae

    sae, _ = load_sae(sae_dir)
    hooked = HookedModel.from_spec(model, dtype=dtype, device=device)
    sae = sae.to(hooked.device)
    result = {"spliced": sae_eval.spliced_metrics(hooked, sae, TokenizedCorpus.open(corpus), ctx=ctx, n_contexts=contexts).to_dict()}
    if store is not None:
        result["reconstruction"] = sae_eval.reconstruction_metrics(sae, ActivationStore.open(store)).to_dict()
    _print_summary(result, as_json)


@sae_app.command("features")
def features(
    sae_dir: Annotated[Path, typer.Argument(help="An SAE directory (SAELens's format).")],
    store: Annotated[Path, typer.Option("--store", help="Activation store holding the SAE's hook.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for feature_stats.parquet and feature_examples.parquet.")],
    model: Annotated[str | None, typer.Option("--model", help="Model spec, for token text and logit effects (optional).")] = None,
    suite: Annotated[Path | None, typer.Option("--suite", help="Mini suite whose corpus the store came from: adds training steps.")] = None,
    top: Annotated[int, typer.Option(help="Top-activating examples per feature.")] = 10,
    as_json: JsonOption = False,
) -> None:
    """Per feature: density, activation histogram, top and per-interval examples with document, domain and training steps."""
    from lmscope.activations.reader import ActivationStore
    from lmscope.sae.features import feature_report
    from lmscope.sae.io import load_sae

    sae, _ = load_sae(sae_dir)
    tokenizer = unembedding = None
    if model is not None:
        from lmscope.models.hooks import HookedModel

        hooked = HookedModel.from_spec(model, device="cpu")
        tokenizer = hooked.tokenizer
        unembedding = hooked.model.get_output_embeddings().weight.detach()
    replay = None
    if suite is not None:
        from lmscope.suites.replay import MiniSuiteSource

        replay = MiniSuiteSource(suite)
    with progress_bars(enabled=not as_json) as progress:
        report = feature_report(sae, ActivationStore.open(store), top_n=top, tokenizer=tokenizer, unembedding=unembedding,
                                replay=replay, progress=progress)
    paths = [str(p) for p in report.write(out)]
    if as_json:
        print_json({"files": paths, "features": report.stats.num_rows, "examples": report.examples.num_rows})
        return
    alive = [r for r in report.stats.to_pylist() if r["fired"]]
    stdout.print(f"{len(alive):,} of {report.stats.num_rows:,} features fired; {report.examples.num_rows:,} examples written to "
                 f"{', '.join(paths)}", highlight=False)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    if summary.get("training"):
        print_table([{"quantity": k, "value": v} for k, v in summary["training"].items()], title="training (last logged step)")
    for key in ("reconstruction", "spliced"):
        if key in summary:
            rows = [{"quantity": k, "value": v} for k, v in summary[key].items() if not isinstance(v, (list, dict)) and v is not None]
            print_table(rows, title=key)
    if "sae" in summary:
        features = f"\nfeatures: {summary['features']}" if summary.get("features") else ""
        stdout.print(f"SAE (SAELens format): {summary['sae']}{features}", highlight=False)
