"""The ``lmscope`` command: parse arguments, call the library, print (``--json`` for machines).

Each command group lives in its own module and registers itself on :data:`app`.
Every :class:`lmscope.errors.LmscopeError` becomes one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from lmscope.errors import LmscopeError

app = typer.Typer(
    name="lmscope",
    help="Study language models through weights at every checkpoint, training data and data order.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        import lmscope

        typer.echo(f"lmscope {lmscope.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Study language models through weights at every checkpoint, training data and data order."""


def _register() -> None:
    from lmscope.cli import activations, corpus, evals, explain, index, influence, models, replay, results, sae, sae_track, study, suite_train, suites, trace  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except LmscopeError as err:
        from lmscope.cli.render import stderr

        stderr.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
