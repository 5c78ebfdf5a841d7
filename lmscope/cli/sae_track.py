"""``lmscope sae track``: one SAE per checkpoint, latents matched across training, a lineage timeline and its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli.options import DeviceOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout
from lmscope.cli.sae import sae_app


@sae_app.command("track")
def track(
    model: Annotated[str, typer.Argument(help="One size of a suite: SUITE_DIR/SIZE, or a catalogued model such as "
                                              "EleutherAI/pythia-70m (checkpoints in the local HF cache).")],
    hook: Annotated[str, typer.Option("--hook", help="Hook the SAEs read.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (rerun to resume).")],
    select: Annotated[str, typer.Option("--select", help="Checkpoints: log:N, every:K, a list of steps, A..B.")] = "log:4",
    corpus: Annotated[Path | None, typer.Option("--corpus", help="Tokenized corpus (default: the mini suite's own).")] = None,
    arch: Annotated[str, typer.Option(help="relu, topk, batchtopk or jumprelu.")] = "topk",
    width: Annotated[int | None, typer.Option(help="Latents (default expansion factor × d_in).")] = None,
    expansion_factor: Annotated[int, typer.Option("--expansion-factor", help="Latents per input dimension when --width is not given.")] = 16,
    k: Annotated[int | None, typer.Option(help="topk/batchtopk: active latents per token (default 32).")] = None,
    tokens: Annotated[int, typer.Option(help="Activations captured per checkpoint (the same text each time).")] = 65536,
    ctx: Annotated[int, typer.Option(help="Context length of the capture and the spliced evaluation.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Activations per training step.")] = 1024,
    epochs: Annotated[int, typer.Option(help="Passes over each checkpoint's activations.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the first SAE and of the data order.")] = 0,
    threshold: Annotated[float, typer.Option(help="Decoder cosine from which two latents of consecutive checkpoints match.")] = 0.7,
    method: Annotated[str, typer.Option(help="Matching: auto, hungarian (one-to-one, best total) or mutual (nearest neighbours).")] = "auto",
    lineages: Annotated[int, typer.Option(help="Lineages drawn in the density figure.")] = 6,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Train an SAE at each selected checkpoint (each from the previous), match latents by decoder cosine, write the
    timeline of births, deaths and drift (timeline.parquet, summary.parquet, results.parquet) and its figures."""
    from lmscope.report.figures import track_figures
    from lmscope.sae.track import run_sae_track
    from lmscope.sae.train import SaeTrainConfig

    config = SaeTrainConfig(hook=hook, arch=arch, width=width, expansion_factor=expansion_factor, k=k,
                            batch_size=batch_size, epochs=epochs, seed=seed)
    with progress_bars(enabled=not as_json) as progress:
        result = run_sae_track(model, config, out, select=select, corpus=corpus, tokens=tokens, ctx=ctx, threshold=threshold,
                               method=method, device=device, progress=progress)
    figures = track_figures(out, out / "figures", n_lineages=lineages)
    result["figures"] = [str(f.png) for f in figures]
    if as_json:
        print_json(result)
        return
    print_table(result["summary"], title=f"latents of {model} at {hook} across training")
    if figures[0].reading:
        stdout.print(figures[0].reading, highlight=False)
    stdout.print(f"timeline: {result['timeline']}\nfigures: {', '.join(result['figures'])}", highlight=False)
