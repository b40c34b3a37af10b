"""What a command prints: human text and tables, progress bars on stderr, or only JSON (``--json``).

``--quiet`` silences everything but errors and the final line; ``--json`` prints exactly one JSON document
on stdout (and no progress bars), so scripts can pipe the output into ``jq``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import typer

from flashsvd.app.outputs import dumps

T = TypeVar("T")


@dataclass
class Console:
    quiet: bool = False
    json_mode: bool = False

    @property
    def chatty(self) -> bool:
        return not (self.quiet or self.json_mode)

    def say(self, message: str = "") -> None:
        """A line for people; hidden by ``--quiet`` and ``--json``."""
        if self.chatty:
            typer.echo(message)

    def info(self, message: str) -> None:
        """A progress note on stderr; hidden by ``--quiet`` and ``--json``."""
        if self.chatty:
            typer.echo(message, err=True)

    def warn(self, message: str) -> None:
        """Something the user must see even with ``--quiet``/``--json`` (on stderr, so JSON stays clean)."""
        typer.echo(message, err=True)

    def progress(
        self, items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
    ) -> Iterator[T]:
        """A tqdm bar on stderr around ``items`` (disabled in quiet/JSON mode)."""
        from tqdm.auto import tqdm

        yield from tqdm(
            items,
            desc=desc,
            total=total,
            unit=unit,
            disable=not self.chatty,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def bar(self, total: int, desc: str, unit: str = "it", initial: int = 0) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            disable=not self.chatty,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table for people (rich); hidden by ``--quiet`` and ``--json``."""
        if not self.chatty:
            return
        from rich.console import Console as RichConsole
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(str(col), overflow="fold")
        for row in rows:
            table.add_row(*[fmt(v) for v in row])
        RichConsole(width=max(100, _term_width())).print(table)

    def result(self, data: Any, summary: str | None = None) -> None:
        """The command's result: JSON in ``--json`` mode, else ``summary`` (also shown with ``--quiet``)."""
        if self.json_mode:
            typer.echo(dumps(data))
        elif summary:
            typer.echo(summary)


def _term_width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 20)).columns


def fmt(value: Any) -> str:
    """Numbers with sensible precision for tables."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.4f}"
    return str(value)


def mib(n_bytes: float | int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def silence_libraries() -> None:
    """Hide transformers' own progress bars and advisory warnings (our bars and messages replace them)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
