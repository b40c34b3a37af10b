"""The folders the UI reads and writes, and the rule that keeps every offered path inside them.

The UI serves files for download and deletes checkpoints on request; both take paths that come from
the browser, so every such path is resolved and checked against these roots first.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class OutsideWorkspaceError(ValueError):
    """A path from the browser points outside the checkpoint/results folders."""


@dataclass(frozen=True)
class Workspace:
    """``root`` holds ``compressed_models/`` (compress), ``models/finetuned/`` (finetune), ``results/`` (eval).

    ``data_dir`` is the local task-data folder (GLUE layout) handed to the commands, if any.
    """

    root: Path
    data_dir: Path | None = None

    def data_args(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)] if self.data_dir is not None else []

    @property
    def checkpoints(self) -> Path:
        return self.root / "compressed_models"

    @property
    def finetuned(self) -> Path:
        return self.root / "models" / "finetuned"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        return (self.checkpoints, self.finetuned, self.results)

    def confine(self, path: str | Path) -> Path:
        """``path`` resolved, if it lies inside one of the allowed roots; else a clear error."""
        resolved = Path(path).resolve()
        for root in self.allowed_roots:
            if resolved.is_relative_to(root.resolve()):
                return resolved
        raise OutsideWorkspaceError(
            f"{path} is outside the checkpoint and results folders of {self.root}; "
            "only files under compressed_models/, models/finetuned/ and results/ are offered"
        )

    def list_checkpoints(self) -> list[Path]:
        """Every folder with a ``config.json`` under the checkpoint roots (fine-tuned ``best/`` included).

        Hidden folders (a save in progress, or the leftovers of a killed one) are not checkpoints.
        """
        found: list[Path] = []
        for root in (self.checkpoints, self.finetuned):
            if root.is_dir():
                found += sorted(
                    p.parent
                    for p in root.rglob("config.json")
                    if not any(part.startswith(".") for part in p.relative_to(root).parts)
                )
        return found

    def clean_leftovers(self) -> list[Path]:
        """Remove the partial saves of killed processes under the workspace (see ``outputs``)."""
        from flashsvd.app.outputs import clean_stale_partials

        removed: list[Path] = []
        for root in (self.checkpoints, self.finetuned, self.results):
            if root.is_dir():
                folders = [root] + [
                    p for p in root.rglob("*")
                    if p.is_dir() and not any(x.startswith(".") for x in p.relative_to(root).parts)
                ]  # fmt: skip
                for folder in folders:
                    removed += clean_stale_partials(folder)
        return removed

    def delete_checkpoint(self, path: str | Path) -> Path:
        folder = self.confine(path)
        if folder in {r.resolve() for r in self.allowed_roots}:
            raise OutsideWorkspaceError("refusing to delete a whole workspace folder; pick one checkpoint")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json)")
        shutil.rmtree(folder)
        return folder

    def results_files(self) -> list[Path]:
        return sorted(self.results.glob("*.json")) if self.results.is_dir() else []

    def load_results(self) -> list[dict[str, Any]]:
        """Every evaluation result JSON (written by ``flashsvd eval --output``), with its file name."""
        rows = []
        for path in self.results_files():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # damaged or not UTF-8: not a result of ours
                continue
            if not isinstance(data, dict):
                continue
            data["_file"] = str(path)
            rows.append(data)
        return rows
