"""``lmscope activations``: write a model's activations at chosen hooks over a corpus to a resumable store."""

from __future__ import annotations

from pathlib import Path

import typer

from lmscope.cli import app
from lmscope.cli.options import SPEC_HELP, DeviceOption, DtypeOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout


@app.command("activations")
def activations(
    model: str = typer.Option(..., "--model", help=SPEC_HELP),
    hook: list[str] = typer.Option(..., "--hook", help="Hook name; repeat for several (see `lmscope models hooks`)."),
    corpus: Path = typer.Option(..., "--corpus", help="Tokenized corpus directory (`lmscope corpus tokenize`)."),
    tokens: int = typer.Option(..., "--tokens", help="Token positions to capture."),
    ctx: int = typer.Option(128, "--ctx", help="Context length per forward pass."),
    out: Path = typer.Option(..., "--out", help="Output directory of the activation store."),
    split: str = typer.Option("heldout", help="Corpus split: heldout, train, or all."),
    domain: str = typer.Option(None, help="Only documents of this domain."),
    batch_size: int = typer.Option(8, "--batch-size", help="Contexts per forward pass."),
    shard_tokens: int = typer.Option(16384, "--shard-tokens", help="Rows per shard file."),
    store_dtype: str = typer.Option("float32", "--store-dtype", help="Storage dtype: float32, bfloat16, float16."),
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    overwrite: bool = typer.Option(False, help="Replace a store written with other arguments instead of refusing."),
    as_json: JsonOption = False,
) -> None:
    """Capture activations into sharded safetensors; rerun the same command to resume after a kill."""
    from lmscope.activations.job import capture_corpus_activations
    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.errors import LmscopeError
    from lmscope.models.hooks import HookedModel

    if split not in ("heldout", "train", "all"):
        raise LmscopeError(f"--split {split!r} is not a split; use heldout, train or all.")
    opened = TokenizedCorpus.open(corpus)
    hooked = HookedModel.from_spec(model, dtype=dtype, device=device)
    for name in hook:
        hooked.hook_point(name)
    with progress_bars(enabled=not as_json) as progress:
        manifest = capture_corpus_activations(
            hooked, opened, hook, tokens, ctx, out,
            split=None if split == "all" else split, domain=domain, batch_size=batch_size, dtype=store_dtype,
            shard_tokens=shard_tokens, overwrite=overwrite,
            meta={"model": model, "model_dtype": dtype}, progress=progress,
        )
    summary = {
        "out": str(out),
        "rows": manifest.get("n_rows"),
        "shards": len(manifest.get("shards", [])),
        "hooks": {name: info.get("shape", info) for name, info in manifest.get("hooks", {}).items()},
        "complete": manifest.get("complete"),
    }
    if as_json:
        print_json(summary)
    else:
        stdout.print(f"wrote {summary['rows']:,} rows in {summary['shards']} shards to {out}", highlight=False)
        print_table([{"hook": k, "shape": str(v)} for k, v in summary["hooks"].items()])
