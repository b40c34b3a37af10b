"""The ``flashsvd`` command line: one Typer app, one module per command group.

Heavy imports (torch, transformers, flashsvd.models) happen inside the commands, so ``flashsvd --help``
is instant. Every command turns failures into one actionable line on stderr and a non-zero exit code
(``--debug`` shows the traceback): 1 unexpected, 2 bad input, 3 out of memory, 130 interrupted.
"""

from __future__ import annotations

import typer

from flashsvd.app.commands import bench as bench_cmd
from flashsvd.app.commands import compress as compress_cmd
from flashsvd.app.commands import demo as demo_cmd
from flashsvd.app.commands import evaluate as eval_cmd
from flashsvd.app.commands import export as export_cmd
from flashsvd.app.commands import finetune as finetune_cmd
from flashsvd.app.commands import info as info_cmd
from flashsvd.app.commands import ui as ui_cmd

app = typer.Typer(
    name="flashsvd",
    help="Compress transformers with SVD-family methods and run them on FlashSVD kernels.\n\n"
    "Exit codes: 0 ok, 1 unexpected error, 2 bad input, 3 out of memory, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from flashsvd.app.runtime import versions

        for dist, ver in versions().items():
            typer.echo(f"{dist} {ver}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print versions."
    ),
) -> None:
    """Compress transformers with SVD-family methods and run them on FlashSVD kernels."""


for _name, _mod, _func in (
    ("compress", compress_cmd, compress_cmd.compress),
    ("eval", eval_cmd, eval_cmd.evaluate),
    ("finetune", finetune_cmd, finetune_cmd.finetune),
    ("info", info_cmd, info_cmd.info),
    ("export", export_cmd, export_cmd.export),
    ("bench", bench_cmd, bench_cmd.bench),
    ("demo", demo_cmd, demo_cmd.demo),
    ("ui", ui_cmd, ui_cmd.ui),
):
    app.command(_name, help=_mod.HELP)(_func)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """Console-script entry point (also ``python -m flashsvd.app`` and ``python -m flashsvd.app.cli``).

    SIGTERM (the UI's Cancel, ``kill``) is handled like Ctrl-C, so a stopped command removes its
    temporary output instead of leaving a hidden partial folder behind.
    """
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    app(prog_name="flashsvd")


if __name__ == "__main__":
    main()
