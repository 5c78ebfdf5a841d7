"""``lmscope sae``: train, evaluate and describe sparse autoencoders on any hook of any checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli import app
from lmscope.cli.options import SPEC_HELP, DeviceOption, DtypeOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout

sae_app = typer.Typer(help="Sparse autoencoders and transcoders: train, evaluate, describe features.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")


@sae_app.command("train")
def train(
    model: Annotated[str, typer.Option("--model", help=SPEC_HELP)],
    hook: Annotated[str, typer.Option("--hook", help="Hook the SAE reads (see `lmscope models hooks SPEC`).")],
    corpus: Annotated[Path, typer.Option("--corpus", help="Tokenized corpus for this model (train split: training; held-out: evaluation).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (rerun to resume).")],
    arch: Annotated[str, typer.Option(help="relu, topk, batchtopk or jumprelu.")] = "topk",
    width: Annotated[int | None, typer.Option(help="Latents (default expansion factor × d_in).")] = None,
    expansion_factor: Annotated[int, typer.Option("--expansion-factor", help="Latents per input dimension when --width is not given.")] = 16,
    k: Annotated[int | None, typer.Option(help="topk/batchtopk: active latents per token (default 32).")] = None,
    out_hook: Annotated[str | None, typer.Option("--out-hook", help="Transcoder: the hook to predict from --hook.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Existing activation store holding --hook (skips the capture).")] = None,
    tokens: Annotated[int, typer.Option(help="Activations to capture from the train split.")] = 262144,
    ctx: Annotated[int, typer.Option(help="Context length of the capture and the spliced evaluation.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Activations per training step.")] = 4096,
    epochs: Annotated[int, typer.Option(help="Passes over the activations.")] = 1,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 2e-4 / sqrt(width / 2^14)).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights, the data order and resampling.")] = 0,
    suite: Annotated[Path | None, typer.Option("--suite", help="Mini suite whose corpus --corpus is: feature examples get their training steps.")] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Capture activations, train an SAE (resumable), save it in SAELens's format, evaluate it, describe its features."""
    from lmscope.sae.job import run_sae_job
    from lmscope.sae.train import SaeTrainConfig

    config = SaeTrainConfig(hook=hook, out_hook=out_hook, arch=arch, width=width, expansion_factor=expansion_factor, k=k,
                            batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)
    with progress_bars(enabled=not as_json) as progress:
        summary = run_sae_job(model, config, out, corpus=corpus, store=store, tokens=tokens, ctx=ctx, replay_suite=suite,
                              device=device, dtype=dtype, progress=progress)
    _print_summary(summary, as_json)


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
    for key in ("reconstruction", "spliced"):
        if key in summary:
            rows = [{"quantity": k, "value": v} for k, v in summary[key].items() if not isinstance(v, (list, dict)) and v is not None]
            print_table(rows, title=key)
    if "sae" in summary:
        stdout.print(f"SAE (SAELens format): {summary['sae']}\nfeatures: {summary['features']}", highlight=False)
