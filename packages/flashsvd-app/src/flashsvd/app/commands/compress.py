"""``flashsvd compress``: calibrate, factorize and save a compressed checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Compress a model with an SVD-family method and save a checkpoint.

Recipe: without --method or --recipe, the best recipe we measured for the model's family and budget
(encoders: whiten, loss-curve ranks, Q/K dense, centered fit, output Fisher, and below --keep-ratio
0.6 block-by-block SVD-LLM with ASVD-sensitivity ranks; decoders: whiten, loss-curve ranks, centered
fit, output Fisher, calibrated on the model's own continuations of the calibration text), with
ranks rounded to multiples of 8; --recipe takes a JSON/YAML recipe file or a built-in name
(encoder, encoder-lean, decoder, svd); --method alone means that method with uniform ranks (ars: ARS ranks, whitened
factors). `flashsvd info` prints the recipe a checkpoint was made with.

Ranks: one of --keep-ratio (fraction of the targeted layers' parameters kept; default 0.5), --rank
(unified: attention r, FFN/output 6r), --rank-attn/--rank-ffn/--rank-wo (per type), --ranks-json
(per module). Data-aware recipes calibrate on --task data or --calib-data (never calibrate on the data
you score); fwsvd also needs a task loss, so with --task a headless model gets a classification head.

\b
Examples:
  flashsvd compress --keep-ratio 0.75 --calib-data ../shared/data/sst2/train.tsv
  flashsvd compress -m smollm2 --keep-ratio 0.8 --calib-data ../shared/data/sst2/train.tsv
  flashsvd compress --recipe my_recipe.yaml --keep-ratio 0.6 --calib-data notes.txt
  flashsvd compress --method svd --keep-ratio 0.75
  flashsvd compress --model default --method whiten --keep-ratio 0.6 --task stsb --calib-samples 64
  flashsvd compress -m bert-base-uncased --method fwsvd --task sst2 --rank 64 --output out/bert_fw
  flashsvd compress -m smollm2 --method svdllm --keep-ratio 0.8 --calib-data notes.txt --sequential
"""


def compress(
    model: O.Model = None,
    method: Annotated[
        str | None,
        typer.Option("--method", help="svd, fwsvd, whiten, svdllm, asvd or ars (default: the recipe's)."),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="Recipe: a JSON/YAML file or encoder, encoder-lean, decoder, svd (default: by family and budget).",
        ),
    ] = None,
    keep_ratio: Annotated[
        float | None,
        typer.Option("--keep-ratio", help="Fraction of the targeted layers' parameters to keep."),
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="Unified rank (attention r, FFN/out 6r).")
    ] = None,
    rank_attn: Annotated[int | None, typer.Option("--rank-attn", help="Rank of Q/K/V (per head).")] = None,
    rank_ffn: Annotated[int | None, typer.Option("--rank-ffn", help="Rank of the FFN matrices.")] = None,
    rank_wo: Annotated[int | None, typer.Option("--rank-wo", help="Rank of the attention output.")] = None,
    ranks_json: Annotated[
        Path | None, typer.Option("--ranks-json", help="JSON {module path: rank or null (dense)}.")
    ] = None,
    task: O.Task = None,
    calib_data: Annotated[
        Path | None,
        typer.Option("--calib-data", help="Calibration text: .txt (a line each), .jsonl, .tsv, .csv."),
    ] = None,
    calib_text_column: Annotated[
        str | None,
        typer.Option(
            "--calib-text-column",
            help="Column(s) of --calib-data (.tsv/.csv/.jsonl) holding the text: header names or 0-based "
            "indices, e.g. 7,8 (default: the sentence/text/question columns named in the header).",
        ),
    ] = None,
    calib_samples: Annotated[
        int | None,
        typer.Option(
            "--calib-samples",
            min=1,
            help="Calibration texts (token windows for decoders); default: the recipe's.",
        ),
    ] = None,
    calib_batch_size: Annotated[
        int | None, typer.Option("--calib-batch-size", min=1, help="Texts per batch (default: the recipe's).")
    ] = None,
    calib_max_length: Annotated[
        int | None, typer.Option("--calib-max-length", min=8, help="Tokens per text (default: the recipe's).")
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option("--sequential", help="Calibrate block by block on the compressed prefix (less memory)."),
    ] = False,
    data_dir: O.DataDir = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Output folder (default compressed_models/<model>_<method>_<ranks>/)."
        ),
    ] = None,
    overwrite: O.Overwrite = False,
    device: O.Device = "auto",
    dtype: O.DType = "auto",
    seed: O.Seed = 0,
    quiet: O.Quiet = False,
    json_out: O.JsonOut = False,
    debug: O.Debug = False,
) -> None:
    run(**locals())


@guarded
def run(**kw) -> None:
    # Under `torchrun --nproc-per-node N` every rank calibrates on its shard (flashsvd.methods.distributed);
    # only rank 0 prints and writes the checkpoint. Without a launcher this is a plain single process.
    from flashsvd.methods.distributed import distributed_session

    with distributed_session():
        _run(**kw)


def _run(**kw) -> None:
    from flashsvd.app import modelio
    from flashsvd.app.compression import (
        REPORT_FILE,
        RankChoice,
        compress_model,
        default_output,
        load_recipe_option,
        needs_task_head,
        report_rows,
        save_checkpoint,
        source_summary,
    )
    from flashsvd.app.console import Console, silence_libraries
    from flashsvd.app.errors import AppError
    from flashsvd.app.outputs import atomic_dir, check_output_dir
    from flashsvd.app.runtime import provenance, resolve_device, resolve_dtype
    from flashsvd.app.tasks.registry import get_task
    from flashsvd.methods.distributed import is_main_process

    main = is_main_process()
    console = Console(kw["quiet"] or not main, kw["json_out"] and main)
    silence_libraries()
    by_kind = {k: kw[f"rank_{k}"] for k in ("attn", "ffn", "wo") if kw[f"rank_{k}"] is not None}
    ranks = RankChoice(kw["keep_ratio"], kw["rank"], by_kind, kw["ranks_json"])
    ranks.check()
    method = kw["method"].lower() if kw["method"] else None
    from flashsvd.methods import METHODS

    if method is not None and method not in METHODS:
        raise AppError(
            f"unknown method {kw['method']!r}", hint="choose one of: " + ", ".join(sorted(METHODS))
        )
    recipe = load_recipe_option(kw["recipe"]) if kw["recipe"] else None
    source = modelio.resolve(kw["model"])
    if source.kind == "flashsvd":
        raise AppError(
            f"{source.location} is already compressed", hint="compress the dense model it came from."
        )
    spec = get_task(kw["task"]) if kw["task"] else None
    device = resolve_device(kw["device"])
    dtype = resolve_dtype(kw["dtype"], device, modelio.saved_dtype(source))
    label = method or (recipe.name if recipe is not None else "default")
    out = Path(kw["output"]) if kw["output"] else default_output(source.name, label, ranks)
    check_output_dir(out, kw["overwrite"])  # fail before the expensive part
    if kw["calib_text_column"] is not None and kw["calib_data"] is None:
        raise AppError("--calib-text-column names a column of --calib-data, which is not given")
    if kw["calib_data"] is not None:  # a wrong column or a non-text file fails before the model loads
        from flashsvd.app.tasks.data import calibration_texts

        calibration_texts(kw["calib_data"], kw["calib_samples"], kw["calib_text_column"])

    head, num_labels = "auto", None
    if (
        spec
        and spec.kind != "perplexity"
        and needs_task_head(method or (recipe.method if recipe is not None else "whiten"))
        and modelio.model_head(source) == "base"
    ):
        head, num_labels = "classification", spec.num_labels
        console.info(f"{label} weights by the {spec.name} loss: adding an (untrained) classification head")
    console.info(f"loading {source.name} ({source.location})")
    m = modelio.load(source, head=head, num_labels=num_labels, dtype=dtype).to(device)
    tok = modelio.load_tokenizer(source)
    m, report = compress_model(
        m, tok, method, ranks, console, task=kw["task"], calib_data=kw["calib_data"],
        calib_text_column=kw["calib_text_column"],
        calib_samples=kw["calib_samples"], calib_batch_size=kw["calib_batch_size"],
        calib_max_length=kw["calib_max_length"], data_dir=kw["data_dir"], sequential=kw["sequential"] or None,
        seed=kw["seed"], recipe=recipe,
    )  # fmt: skip
    result = {
        "output": str(out),
        "source": source_summary(source),
        "task": spec.name if spec else None,
        "calib_data": str(kw["calib_data"]) if kw["calib_data"] else None,
        "report": report.to_json(),
        **provenance(device),
    }
    if not main:
        return
    with atomic_dir(out, overwrite=kw["overwrite"]) as tmp:
        save_checkpoint(m, tok, result, tmp)
    console.table(f"{source.name} → {out}", ["", "value"], report_rows(report))
    console.result(result, f"saved {out} ({report.summary()}); report in {out / REPORT_FILE}")
