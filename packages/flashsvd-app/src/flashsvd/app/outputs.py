"""Outputs appear whole or not at all, and replace only what flashsvd itself wrote.

Every folder or file is written into a temporary sibling named ``.<name>.partial-<pid>-<random>`` and
renamed into place when complete, so an interrupted or failed run (Ctrl-C, SIGTERM from the UI's Cancel,
out of memory) leaves no half-written checkpoint or result behind. A process killed outright (SIGKILL)
cannot clean up after itself: the next run removes the partials of processes that no longer exist
(:func:`clean_stale_partials`), and listings ignore hidden entries.

``--overwrite`` replaces a flashsvd output only (a checkpoint, a fine-tune folder, an empty folder): a
folder holding anything else is refused, so a typo in ``--output`` never deletes someone's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flashsvd.app.errors import AppError

#: the compression report written next to every compressed checkpoint
REPORT_FILE = "flashsvd_report.json"
#: files whose presence marks a folder as written by flashsvd (with a flashsvd ``config.json``)
MARKER_FILES = (REPORT_FILE, "trainer_state.json")
#: ``.<name>.partial-<pid>-<random>`` (being written) and ``.<name>.old-<pid>`` (being replaced)
_LEFTOVER = re.compile(r"^\..+\.(?:partial|old)-(\d+)(?:-.*)?$")


def _partial_prefix(name: str) -> str:
    return f".{name}.partial-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_leftover(path: Path) -> bool:
    """Whether ``path`` is a temporary (partial or replaced) entry of some flashsvd write."""
    name = Path(path).name
    return _LEFTOVER.match(name) is not None or (name.startswith(".") and ".partial-" in name)


def clean_stale_partials(folder: Path) -> list[Path]:
    """Remove the leftovers in ``folder`` of processes that are gone; returns what was removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            m = _LEFTOVER.match(entry.name)
            if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


def is_flashsvd_output(path: Path) -> bool:
    """An empty folder, or one flashsvd wrote: a report/trainer state, or a flashsvd ``config.json``."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(p for p in path.iterdir() if not is_leftover(p)):
        return True
    if any((path / m).is_file() for m in MARKER_FILES):
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    block = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(block, dict) and block.get("quant_method") == "flashsvd"


def check_writable(target: Path, flag: str = "--output") -> None:
    """Fail now, not after the expensive part, if ``target`` cannot be created where it is asked for."""
    anc = Path(target).absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise AppError(
            f"cannot write {target}: {anc} is a file, not a folder", hint=f"choose another {flag}."
        )
    try:
        probe = tempfile.mkdtemp(prefix=_partial_prefix("write-check"), dir=anc)
        os.rmdir(probe)
    except OSError as err:
        raise AppError(
            f"cannot write {target}: {anc} is not writable ({err.strerror or err})",
            hint=f"choose another {flag}, or fix the folder's permissions.",
        ) from None


def check_output_dir(target: Path, overwrite: bool = False, flag: str = "--output") -> None:
    """Everything that would make writing the folder ``target`` fail or destroy something, checked first."""
    target = Path(target)
    if target.name in ("", ".", "..") or target.absolute() == Path.cwd() or target.absolute() == Path("/"):
        raise AppError(
            f"{flag} {str(target)!r} is not a folder name", hint="name a new folder for the output."
        )
    if target.exists() or target.is_symlink():
        if target.is_symlink() or not target.is_dir():
            raise AppError(
                f"{flag} {target} exists and is not a folder",
                hint=f"choose another {flag}; files are never replaced.",
            )
        if any(p for p in target.iterdir() if not is_leftover(p)):
            if not is_flashsvd_output(target):
                raise AppError(
                    f"{flag} {target} holds files that flashsvd did not write; refusing to replace it"
                    + (" even with --overwrite" if overwrite else ""),
                    hint=f"choose another {flag}, or move those files away yourself.",
                )
            if not overwrite:
                raise AppError(
                    f"output {target} already exists", hint=f"pass --overwrite or choose another {flag}."
                )
    check_writable(target, flag)


def check_result_file(path: Path, flag: str = "--output") -> None:
    """A result file may replace only an earlier flashsvd result (JSON with our provenance block)."""
    path = Path(path)
    if path.is_dir():
        raise AppError(
            f"{flag} {path} is a folder", hint="name a file for the output, e.g. results/run.json."
        )
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if not (isinstance(data, dict) and "versions" in data and "timestamp" in data):
            raise AppError(
                f"{flag} {path} exists and is not a flashsvd result; refusing to replace it",
                hint=f"choose another {flag}, or move that file away yourself.",
            )
    check_writable(path, flag)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a rename pair runs, so an interrupt never leaves neither in place."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False, flag: str = "--output") -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``, else it is removed.

    ``target`` may be replaced only if it is a flashsvd output (see :func:`check_output_dir`).
    """
    target = Path(target)
    clean_stale_partials(target.parent)
    check_output_dir(target, overwrite, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(target.name), dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _signals_deferred():
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    if path.is_dir():
        raise AppError(f"{path} is a folder", hint="name a file for the output, e.g. results/run.json.")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return str(obj)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=_jsonable)
