"""Command-line options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

SPEC_HELP = "Model spec: OWNER/NAME@REV, hf:OWNER/NAME@REV, DIR, DIR@REV, gguf:FILE or 'default'."

SpecArgument = Annotated[str, typer.Argument(help=SPEC_HELP)]
DtypeOption = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]
