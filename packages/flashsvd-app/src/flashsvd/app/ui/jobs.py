"""Long UI jobs run the ``flashsvd`` command itself in a child process.

Why a process: the page never freezes (the handler is a generator that streams the log), a job can
be cancelled for real (closing the generator kills the process group), and because every command
writes its outputs to a temporary folder and renames them only when complete, a cancelled job
leaves nothing half-written.  The UI therefore has no compression or evaluation logic of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class JobState:
    """What a running or finished job has printed, and how it ended."""

    args: list[str]
    output: str = ""
    returncode: int | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.returncode is not None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines, each carriage-return-updated line (progress bars) shown once."""
        lines = [part.rsplit("\r", 1)[-1] for part in self.output.replace("\r\n", "\n").split("\n")]
        return "\n".join([line for line in lines if line.strip()][-n:])

    def error_message(self) -> str:
        """The command's ``error: ...`` lines (what went wrong and the hint), or the log tail."""
        text = self.log_tail(200).splitlines()
        for i, line in enumerate(text):
            if line.startswith("error:"):
                return "\n".join(text[i:]).removeprefix("error: ")
        return self.log_tail(10) or f"flashsvd exited with code {self.returncode}"


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flashsvd.app", *args]


def run_job(args: list[str], cwd: Path, poll_seconds: float = 0.5) -> Iterator[JobState]:
    """Run ``flashsvd ARGS`` in ``cwd``, yielding the job state as output arrives; kill it if closed."""
    state = JobState(args=list(args))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cli_command(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    chunks: list[bytes] = []

    def pump() -> None:
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            chunks.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while True:
            finished = proc.poll() is not None
            if finished:
                reader.join(timeout=5)
            state.output = b"".join(chunks).decode(errors="replace")
            if finished:
                state.returncode = proc.returncode
                yield state
                return
            yield state
            time.sleep(poll_seconds)
    finally:
        if proc.poll() is None:  # cancelled: the generator was closed while the command ran
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
