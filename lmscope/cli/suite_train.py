"""``lmscope suite train``: train a mini suite (also reachable as ``lmscope suites train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli import app
from lmscope.cli.options import DeviceOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout
from lmscope.cli.suites import suites_app

suite_app = typer.Typer(help="Train a mini suite: `lmscope suite train` is `lmscope suites train`.", no_args_is_help=True)
app.add_typer(suite_app, name="suite", hidden=True)


def train(
    config: Annotated[
        Path | None, typer.Argument(help="Suite TOML file (see configs/suite-default.toml); leave out for the default suite.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Suite directory to write; default $LMSCOPE_HOME/suites/<name>-<hash of config and corpus>."),
    ] = None,
    device: DeviceOption = "auto",
    json_output: JsonOption = False,
) -> None:
    """Train GPT-NeoX models of several sizes on one corpus in one data order, with Pythia-style checkpoints; rerun to resume."""
    from lmscope.suites.train import train_suite
    from lmscope.suites.train_config import load_train_config

    cfg = load_train_config(config)
    with progress_bars(enabled=not json_output) as progress:
        summary = train_suite(cfg, out, device=device, progress=progress)
    if json_output:
        print_json(summary)
        return
    rows = [
        {
            "model": model["model"],
            "params": f"{model['params']:,}",
            "tokens": f"{model['tokens']:,}",
            "final loss": round(model["final_loss"], 3),
            "held-out bits/byte": round(model["heldout_bits_per_byte"], 3),
            "train s": round(model["train_seconds"], 1),
        }
        for model in summary["models"]
    ]
    print_table(rows, title=f"suite {summary['name']} — {len(summary['checkpoint_steps'])} checkpoints per model")
    timings = "  ".join(f"{key.removesuffix('_s')} {value:.1f}s" for key, value in summary["timings"].items())
    stdout.print(
        f"unigram bits/byte on the same held-out text: {summary['unigram_bits_per_byte']:.3f}\n"
        f"timings: {timings}\nsuite directory: {summary['suite_dir']}",
        highlight=False,
    )


suites_app.command("train")(train)
suite_app.command("train")(train)
