"""``lmscope models``: inspect a model spec — its hook points and where it was loaded from."""

from __future__ import annotations

import typer

from lmscope.cli import app
from lmscope.cli.options import DeviceOption, DtypeOption, JsonOption, SpecArgument
from lmscope.cli.render import print_json, print_table, stdout

models_app = typer.Typer(help="Load models at any checkpoint and list their hook points.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("hooks")
def hooks(
    spec: SpecArgument,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """List every hook point of a model with its shape."""
    from lmscope.models.hooks import HookedModel

    hooked = HookedModel.from_spec(spec, dtype=dtype, device=device)
    rows = hooked.hook_shapes()
    if as_json:
        print_json({"spec": spec, "model_type": hooked.config.model_type, "n_layers": hooked.n_layers, "hooks": rows})
        return
    stdout.print(f"{spec}: {hooked.config.model_type}, {hooked.n_layers} layers")
    print_table([{"hook": row["name"], "shape": "[" + ", ".join(map(str, row["shape"])) + "]"} for row in rows])


@models_app.command("info")
def info(
    spec: SpecArgument,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Load a model and say what it is: architecture, size, revision, source."""
    from lmscope.models.loading import load_model

    loaded = load_model(spec, dtype=dtype, device=device)
    config = loaded.model.config
    row = {
        "spec": spec,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "n_layers": config.num_hidden_layers,
        "d_model": config.hidden_size,
        "vocab_size": config.vocab_size,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(loaded.model.parameters()).device),
        "source": loaded.source,
    }
    if as_json:
        print_json(row)
    else:
        print_table([{"field": key, "value": value} for key, value in row.items()])
