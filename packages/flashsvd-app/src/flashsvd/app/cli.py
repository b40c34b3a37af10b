"""The ``flashsvd`` command line: one Typer app, one module per command group.

Heavy imports (torch, transformers) happen inside the commands, so ``flashsvd --help`` is instant.
"""

from __future__ import annotations

import typer

from flashsvd.app.commands import demo as demo_cmd

app = typer.Typer(
    name="flashsvd",
    help="Compress transformers with SVD-family methods and run them on FlashSVD kernels.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Keeps ``flashsvd`` a command group even while it has a single subcommand."""


app.command("demo", help=demo_cmd.HELP)(demo_cmd.demo)


def main() -> None:
    """Console-script entry point."""
    app()
