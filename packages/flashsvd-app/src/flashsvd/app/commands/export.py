"""``flashsvd export``: a checkpoint in the form another tool needs (a shareable folder, or dense weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Export a compressed checkpoint: shareable (model card included) or merged back to dense.

Without --dense the folder is copied as a compressed checkpoint with a fresh model card (README.md:
source model, method, ranks, parameter counts and the metrics of --metrics), ready for push_to_hub.
With --dense every low-rank layer is multiplied back into a dense matrix and an ordinary Hugging Face
folder is written, for runtimes that read only dense weights (vLLM, TGI, llama.cpp converters). The
dense model computes the same function but keeps none of the memory or speed gain.

\b
Examples:
  flashsvd export compressed_models/all-MiniLM-L6-v2_whiten_k0.75 --output share/minilm
  flashsvd export compressed_models/all-MiniLM-L6-v2_whiten_k0.75 --dense --output dense/minilm
"""

Dense = Annotated[bool, typer.Option("--dense", help="Merge the factors back into dense weights.")]
Metrics = Annotated[
    Path | None,
    typer.Option("--metrics", help="A flashsvd eval --output JSON whose metrics go into the model card."),
]


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A compressed checkpoint folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    dense: Dense = False,
    metrics: Metrics = None,
    overwrite: O.Overwrite = False,
    quiet: O.Quiet = False,
    json_out: O.JsonOut = False,
    debug: O.Debug = False,
) -> None:
    run(**locals())


def _metrics(path: Path | None) -> dict:
    import json

    from flashsvd.app.errors import AppError

    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AppError(f"cannot read metrics from {path}: {err}") from err
    found = data.get("metrics", data) if isinstance(data, dict) else {}
    return {k: v for k, v in found.items() if isinstance(v, (int, float, str))}


@guarded
def run(**kw) -> None:
    import flashsvd.models as fm
    from flashsvd.app.console import Console
    from flashsvd.app.errors import AppError
    from flashsvd.app.outputs import atomic_dir

    console = Console(kw["quiet"], kw["json_out"])
    src, out = Path(kw["checkpoint"]), Path(kw["output"])
    if out.resolve() == src.resolve():
        raise AppError("--output is the checkpoint itself", hint="choose another folder.")
    model = fm.load(src)
    metrics = _metrics(kw["metrics"])
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        console.info(f"{src} holds no tokenizer: exported without one")
    with atomic_dir(out, overwrite=kw["overwrite"]) as tmp:
        if kw["dense"]:
            block = dict(model.config.quantization_config)
            fm.merge_to_dense(model)
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(_dense_note(src, block, metrics), encoding="utf-8")
        else:
            fm.save_compressed(model, tmp, tokenizer=tokenizer, source=src, metrics=metrics)
    kind = "dense" if kw["dense"] else "compressed"
    console.result({"output": str(out), "kind": kind, "metrics": metrics}, f"exported {kind} model to {out}")


def _dense_note(src: Path, block: dict, metrics: dict) -> str:
    lines = [
        f"# Dense export of a FlashSVD checkpoint ({block.get('method')}, keep_ratio {block.get('keep_ratio')})",
        "",
        f"Made from `{src.name}` by multiplying every low-rank factor pair back into one matrix. It computes",
        "the same function as the compressed model (up to rounding), loads in any tool that reads ordinary",
        "Hugging Face weights, and keeps none of the compression's memory or speed gain: it has the dense",
        f"model's {block.get('params_before')} parameters again (the compressed one had {block.get('params_after')}).",
    ]
    if metrics:
        lines += ["", "Measured on the compressed model:", ""] + [f"- {k}: {v}" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"
