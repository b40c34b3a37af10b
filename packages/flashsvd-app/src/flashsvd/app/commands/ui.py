"""``flashsvd ui``: start the web UI (a thin launcher; the UI itself is ``flashsvd.app.ui``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Start the FlashSVD web UI (Gradio) in the browser.

\b
Examples:
  flashsvd ui
  flashsvd ui --host 0.0.0.0 --port 7861
"""


def ui(
    host: Annotated[
        str, typer.Option("--host", help="Interface to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 7860,
    share: Annotated[bool, typer.Option("--share", help="Ask Gradio for a public link.")] = False,
    root: Annotated[
        Path,
        typer.Option("--root", help="Workspace: compressed_models/, models/finetuned/, results/ live here."),
    ] = Path("."),
    data_dir: O.DataDir = None,
    debug: O.Debug = False,
) -> None:
    run(**locals())


@guarded
def run(**kw) -> None:
    import os

    # before gradio is imported: no usage statistics leave the machine unless the user opts in
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from flashsvd.app.ui import launch

    launch(root=kw["root"], data_dir=kw["data_dir"], host=kw["host"], port=kw["port"], share=kw["share"])
