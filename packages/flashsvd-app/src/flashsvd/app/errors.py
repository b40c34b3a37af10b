"""Errors a person can act on: one message, a non-zero exit code, and no traceback unless ``--debug``.

Commands raise :class:`AppError` (or let library ``ValueError``/``TypeError`` through, whose messages the
lower packages already write for people). :func:`guarded` turns every exception into a short message on
stderr and an exit code, and maps the few environmental failures (out of memory, Ctrl-C, a missing file)
onto advice.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

#: exit codes (documented in ``flashsvd --help``)
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_OOM = 3
EXIT_INTERRUPTED = 130


class AppError(Exception):
    """A failure with a message for people: what went wrong and what to do about it."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


def _is_oom(err: BaseException) -> bool:
    name = type(err).__name__
    return name == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def describe(err: BaseException) -> tuple[str, int]:
    """The message and exit code shown for ``err``."""
    if isinstance(err, AppError):
        return str(err), err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return "interrupted: nothing was written (outputs are only moved into place when complete).", (
            EXIT_INTERRUPTED
        )
    if _is_oom(err):
        return (
            "out of memory: "
            + str(err).splitlines()[0]
            + "\n  hint: use a smaller --batch-size, --sequential calibration, fewer --calib-samples, "
            "or --device cpu.",
            EXIT_OOM,
        )
    if isinstance(err, UnicodeDecodeError):  # readers name the file; this is the fallback
        return (
            f"a file is not UTF-8 text ({err.reason} at byte {err.start})\n"
            "  hint: run again with --debug to see which file is read; convert it with `iconv -t UTF-8`.",
            EXIT_USAGE,
        )
    if isinstance(err, FileNotFoundError):
        return f"file not found: {err.filename or err}", EXIT_USAGE
    if isinstance(err, (ValueError, TypeError)):
        return str(err), EXIT_USAGE
    return f"unexpected {type(err).__name__}: {err}\n  hint: run again with --debug for the traceback.", (
        EXIT_ERROR
    )


def fail(err: BaseException, debug: bool = False) -> typer.Exit:
    """Print ``err`` for people (with the traceback when ``debug``) and return the Exit to raise."""
    message, code = describe(err)
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def guarded(func: F) -> F:
    """Run a command so that any exception becomes :func:`fail`; reads the command's ``debug`` option."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BaseException as err:
            raise fail(err, bool(kwargs.get("debug", False))) from None

    return wrapper  # type: ignore[return-value]
