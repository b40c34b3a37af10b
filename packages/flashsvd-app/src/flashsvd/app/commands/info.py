"""``flashsvd info``: what a checkpoint holds, read from its files without loading the model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Describe a checkpoint folder: method, ranks, parameter counts, sizes, versions and files.

Reads config.json, the safetensors headers and flashsvd_report.json; nothing is loaded or computed.

\b
Examples:
  flashsvd info compressed_models/all-MiniLM-L6-v2_svd_k0.75
  flashsvd info models/finetuned/bert/whiten/sst2/best --json | jq .ranks_summary
"""


def info(
    folder: Annotated[Path, typer.Argument(help="A checkpoint (or any Hugging Face model) folder.")],
    quiet: O.Quiet = False,
    json_out: O.JsonOut = False,
    debug: O.Debug = False,
) -> None:
    run(**locals())


def _count_stored(path: Path) -> tuple[int, int]:
    """``(parameters, tensors)`` in a safetensors file, from its header; a damaged file is an error."""
    from safetensors import safe_open

    from flashsvd.app.errors import AppError

    size = path.stat().st_size
    params, count, end = 0, 0, 0
    try:
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = fh.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                params += n
                count += 1
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise AppError(
            f"{path} is not a readable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
            hint="the file is truncated or damaged (an interrupted copy or download?): copy or save it again.",
        ) from None
    header = _header_length(path)
    if header is not None:
        import json

        with open(path, "rb") as fh:
            fh.seek(8)
            meta = json.loads(fh.read(header))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if 8 + header + end > size:
            raise AppError(
                f"{path} is truncated: its header describes {8 + header + end:,} bytes, the file has {size:,}",
                hint="copy or save the checkpoint again.",
            )
    return params, count


def _header_length(path: Path) -> int | None:
    import struct

    with open(path, "rb") as fh:
        raw = fh.read(8)
    return struct.unpack("<Q", raw)[0] if len(raw) == 8 else None


def describe(folder: Path) -> dict:
    """Everything ``info`` reports, as a dictionary."""
    import json

    from flashsvd.app.compression import REPORT_FILE
    from flashsvd.app.errors import AppError
    from flashsvd.app.modelio import check_checkpoint_version, flashsvd_block, read_config

    if not folder.exists():
        raise AppError(f"{folder} does not exist")
    if not folder.is_dir():
        raise AppError(f"{folder} is not a folder", hint="pass the checkpoint folder, not a file in it.")
    config = read_config(folder)
    block = flashsvd_block(config)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    out: dict = {
        "folder": str(folder),
        "compressed": block is not None,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "files": {str(p.relative_to(folder)): p.stat().st_size for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
    }
    tensors, stored = 0, 0
    for st in sorted(folder.glob("*.safetensors")):
        n_params, n_tensors = _count_stored(st)
        tensors += n_params
        stored += n_tensors
    out["stored_parameters"] = tensors
    out["stored_tensors"] = stored
    if block is not None:
        ranks = block.get("ranks") or {}
        values = [r for r in ranks.values() if r is not None]
        out.update(
            method=block.get("method"),
            keep_ratio=block.get("keep_ratio"),
            kept_fraction=block.get("kept_fraction"),
            params_before=block.get("params_before"),
            params_after=block.get("params_after"),
            target_params_before=block.get("target_params_before"),
            target_params_after=block.get("target_params_after"),
            format_version=block.get("format_version"),
            versions=block.get("versions"),
            calibration=block.get("calibration"),
            recipe=block.get("recipe"),
            allocation=block.get("allocation"),
            ranks=ranks,
            ranks_summary={
                "factorized": len(values),
                "dense": len(ranks) - len(values),
                "min": min(values) if values else None,
                "max": max(values) if values else None,
                "distinct": sorted(set(values)),
            },
        )
        try:
            check_checkpoint_version(config, folder)
            out["loadable"] = True
        except AppError as err:
            out["loadable"] = False
            out["load_problem"] = str(err)
    report = folder / REPORT_FILE
    if report.is_file():
        try:
            rep = json.loads(report.read_text(encoding="utf-8"))
            out["made"] = {k: rep.get(k) for k in ("timestamp", "git_commit", "task", "calib_data", "source")}
            if block is not None and not out.get("recipe"):
                out["recipe"] = (rep.get("report") or {}).get("recipe")
        except (ValueError, AttributeError):
            out["made"] = {"problem": f"{REPORT_FILE} is not a valid JSON report"}
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            out["training"] = _training(json.loads(state.read_text(encoding="utf-8")), folder)
        except ValueError:
            out["training"] = {"problem": "trainer_state.json is not valid JSON"}
    return out


def _training(state: dict, folder: Path) -> dict:
    """What a fine-tune run (``flashsvd finetune``) says about the folder: Trainer's state has a log entry
    per step, so only its evaluations are shown, with the run's task and settings (``training_args.json``)."""
    import json

    if not isinstance(state, dict) or "log_history" not in state:
        return state
    try:
        run = json.loads((folder / "training_args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run = {}
    evals = [e for e in state.get("log_history") or [] if any(str(k).startswith("eval_") for k in e)]
    return {"task": run.get("task"), "metric": run.get("metric"), "step": state.get("global_step"),
            "best_metric": state.get("best_metric"), "best_step": state.get("best_global_step"),
            "evaluations": evals, "config": run.get("config")}  # fmt: skip


def recipe_line(recipe: dict | None) -> str:
    """One line describing a stored recipe (or why there is none)."""
    if not recipe:
        return "not recorded (made before recipes)"
    from flashsvd.models.recipe import Recipe, RecipeError

    try:
        return Recipe.from_json(recipe).describe()
    except RecipeError:
        return str(recipe)


@guarded
def run(**kw) -> None:
    from flashsvd.app.console import Console

    console = Console(kw["quiet"], kw["json_out"])
    d = describe(Path(kw["folder"]))
    rows = [("compressed", d["compressed"]), ("model type", d["model_type"]),
            ("architectures", ", ".join(d["architectures"] or []))]  # fmt: skip
    if d["compressed"]:
        rs = d["ranks_summary"]
        rows += [
            ("method", d["method"]),
            ("keep_ratio (asked)", d["keep_ratio"]),
            ("targeted kept fraction", d["kept_fraction"]),
            ("params before → after", f"{d['params_before']:,} → {d['params_after']:,}"),
            ("matrices factorized / dense", f"{rs['factorized']} / {rs['dense']}"),
            ("recipe", recipe_line(d.get("recipe"))),
            ("ranks", ", ".join(map(str, rs["distinct"]))),
            ("format version", d["format_version"]),
            ("made with", ", ".join(f"{k} {v}" for k, v in (d["versions"] or {}).items())),
        ]
    rows += [("stored parameters", d["stored_parameters"]), ("size MiB", d["total_bytes"] / 2**20)]
    console.table(str(d["folder"]), ["", "value"], rows)
    console.table("files", ["file", "bytes"], list(d["files"].items()))
    what = f"{d['method']} keep_ratio={d['keep_ratio']}" if d["compressed"] else "dense"
    console.result(
        d, f"{d['folder']}: {d['model_type']} {what}, {d['stored_parameters']:,} stored parameters"
    )
