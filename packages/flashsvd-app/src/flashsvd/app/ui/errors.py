"""Turn handler failures into readable messages on the page (``gr.Error``), never a traceback."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import gradio as gr

from flashsvd.app.ui.handlers import UIError
from flashsvd.app.ui.workspace import OutsideWorkspaceError

READABLE = (UIError, OutsideWorkspaceError, ValueError, FileNotFoundError)


def shown(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler (plain or generator) so that expected failures become ``gr.Error`` messages."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args: Any) -> Any:
            try:
                yield from fn(*args)
            except READABLE as err:
                raise gr.Error(str(err)) from None

        return gen

    @functools.wraps(fn)
    def plain(*args: Any) -> Any:
        try:
            return fn(*args)
        except READABLE as err:
            raise gr.Error(str(err)) from None

    return plain
