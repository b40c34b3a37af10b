"""``flashsvd eval``: task metric plus memory and latency of a (compressed) model, as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Evaluate a model on a task: its metric, memory (peak/transient/persistent) and latency.

Models with a classification head are scored with it; embedding models on stsb zero-shot (Spearman
of cosine similarities of mean-pooled embeddings); causal LMs on wikitext2 perplexity (non-overlapping
windows of --seq-len tokens). Data: --data-file, --data-dir, ../shared/data, or `datasets` online.

\b
Examples:
  flashsvd eval --model default --task stsb --max-eval-samples 500
  flashsvd eval -c compressed_models/all-MiniLM-L6-v2_whiten_k0.75 --task stsb --output results.json
  flashsvd eval -c out/sst2_svd --task sst2 --data-file ../shared/data/sst2/dev.tsv --backend flash
  flashsvd eval -m smollm2 --task wikitext2 --seq-len 256 --max-tokens 4096
  flashsvd eval -c out/smollm2_k0.8 --lm-eval hellaswag,arc_easy --limit 200
  flashsvd eval -c out/smollm2_k0.8 --lm-eval my_task --lm-eval-include tasks/   # local task YAMLs
"""


def evaluate(
    checkpoint: O.Checkpoint = None,
    model: O.Model = None,
    task: Annotated[
        str, typer.Option("--task", "-t", help="A task name (see `flashsvd eval --help`).")
    ] = "stsb",
    data_file: O.DataFile = None,
    data_dir: O.DataDir = None,
    split: O.Split = "dev",
    text_column: O.TextColumn = None,
    text_pair_column: O.TextPairColumn = None,
    label_column: O.LabelColumn = None,
    batch_size: O.BatchSize = 32,
    max_length: O.MaxLength = 128,
    max_eval_samples: Annotated[
        int | None,
        typer.Option("--max-eval-samples", min=1, help="Score a seeded random subset of this size."),
    ] = None,
    zero_shot: Annotated[
        bool | None, typer.Option("--zero-shot/--head", help="Force zero-shot STS or the model's head.")
    ] = None,
    seq_len: Annotated[
        int, typer.Option("--seq-len", min=2, help="Perplexity window length (tokens).")
    ] = 512,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=2, help="Perplexity: use at most this many tokens.")
    ] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed forward passes (median).")] = 5,
    lm_eval: Annotated[
        str | None,
        typer.Option("--lm-eval", help="Comma-separated lm-evaluation-harness tasks (instead of --task)."),
    ] = None,
    lm_eval_include: Annotated[
        Path | None, typer.Option("--lm-eval-include", help="A folder of local lm-eval task YAML files.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="lm-eval: score at most this many examples per task.")
    ] = None,
    backend: O.Backend = "flash",
    device: O.Device = "auto",
    dtype: O.DType = "auto",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the result JSON here.")] = None,
    seed: O.Seed = 0,
    quiet: O.Quiet = False,
    json_out: O.JsonOut = False,
    debug: O.Debug = False,
) -> None:
    run(**locals())


@guarded
def run(**kw) -> None:
    from flashsvd.app import modelio
    from flashsvd.app.console import Console, mib, silence_libraries
    from flashsvd.app.errors import AppError
    from flashsvd.app.evaluation import evaluate, fallback_note, load_data, mode_for
    from flashsvd.app.outputs import write_json_atomic
    from flashsvd.app.runtime import provenance, resolve_device, resolve_dtype
    from flashsvd.app.tasks.data import Columns
    from flashsvd.app.tasks.registry import get_task

    console = Console(kw["quiet"], kw["json_out"])
    silence_libraries()
    if kw["checkpoint"] is not None and kw["model"] is not None:
        raise AppError("pass either --checkpoint or --model, not both")
    if kw["backend"] not in ("flash", "torch"):
        raise AppError(f"unknown backend {kw['backend']!r}", hint="use flash or torch.")
    if kw["checkpoint"] is not None and not Path(kw["checkpoint"]).exists():
        raise AppError(f"checkpoint {kw['checkpoint']} does not exist")
    if kw["output"] is not None:  # checked before the work, not after it
        from flashsvd.app.outputs import check_result_file

        check_result_file(Path(kw["output"]))
    source = modelio.resolve(str(kw["checkpoint"]) if kw["checkpoint"] is not None else kw["model"])
    device = resolve_device(kw["device"])
    dtype = resolve_dtype(kw["dtype"], device, modelio.saved_dtype(source))
    if kw["lm_eval"]:
        return _run_harness(kw, source, device, dtype, console)
    spec = get_task(kw["task"])
    mode = mode_for(spec, modelio.model_head(source), kw["zero_shot"])
    columns = Columns(kw["text_column"], kw["text_pair_column"], kw["label_column"])
    data = load_data(spec, mode, kw["split"], kw["data_file"], kw["data_dir"], columns, kw["max_eval_samples"],
                     kw["seed"])  # fmt: skip
    note = fallback_note(data, kw["split"])
    if note:
        console.warn(note)
    console.info(f"loading {source.name} ({source.location})")
    model = modelio.load(source, dtype=dtype, backend=kw["backend"]).to(device)
    tokenizer = modelio.load_tokenizer(source)
    result = evaluate(
        model, tokenizer, source, spec, mode, data, batch_size=kw["batch_size"], max_length=kw["max_length"],
        device=device, console=console, seq_len=kw["seq_len"], max_tokens=kw["max_tokens"], repeats=kw["repeats"],
    )  # fmt: skip
    result["split"] = getattr(data, "fallback_split", None) or kw["split"]
    if note:
        result["note"] = note
    result["backend"] = kw["backend"] if source.kind == "flashsvd" else "dense"
    result["dtype"] = str(dtype).removeprefix("torch.")
    result.update(provenance(device))
    if kw["output"] is not None:
        write_json_atomic(Path(kw["output"]), result)
    mem = result["memory_latency"]
    rows = [(k, v) for k, v in result["metrics"].items()]
    rows += [
        ("examples", result["n_examples"]),
        ("persistent MiB", mib(mem["persistent_bytes"])),
        ("peak MiB", mib(mem["peak_bytes"])),
        ("transient MiB", mib(mem["transient_bytes"])),
        (f"latency ms (batch {mem['batch_shape']})", mem["latency_ms"]),
        ("params", result["model"]["params"]),
    ]
    console.table(f"{source.name} on {spec.name} ({mode}, {result['backend']})", ["", "value"], rows)
    main = result["metrics"][spec.main_metric]
    where = f"; wrote {kw['output']}" if kw["output"] else ""
    console.result(
        result, f"{spec.name} {spec.main_metric} = {main:.4f} ({result['n_examples']} examples){where}"
    )


def _run_harness(kw, source, device, dtype, console) -> None:
    """``--lm-eval``: the harness's scores for each task, as JSON (and a table)."""
    from flashsvd.app import modelio
    from flashsvd.app.harness import run_harness
    from flashsvd.app.outputs import write_json_atomic
    from flashsvd.app.runtime import provenance

    tasks = [t.strip() for t in kw["lm_eval"].split(",") if t.strip()]
    console.info(f"loading {source.name} ({source.location})")
    model = modelio.load(source, head="causal-lm", dtype=dtype, backend=kw["backend"]).to(device)
    tokenizer = modelio.load_tokenizer(source)
    scores = run_harness(model, tokenizer, tasks, include_path=kw["lm_eval_include"], limit=kw["limit"],
                         batch_size=kw["batch_size"])  # fmt: skip
    result = {
        "lm_eval": scores,
        "tasks": tasks,
        "limit": kw["limit"],
        "model": {"source": str(source.location)},
    }
    result["backend"] = kw["backend"] if source.kind == "flashsvd" else "dense"
    result["dtype"] = str(dtype).removeprefix("torch.")
    result.update(provenance(device))
    if kw["output"] is not None:
        write_json_atomic(Path(kw["output"]), result)
    rows = [(f"{t} {m}", v) for t, ms in scores.items() for m, v in ms.items()]
    console.table(f"{source.name} on lm-eval ({result['backend']})", ["", "value"], rows)
    console.result(
        result,
        "; ".join(f"{t}: " + ", ".join(f"{m}={v:.4f}" for m, v in ms.items()) for t, ms in scores.items()),
    )
