"""Options shared by several commands, declared once (``Annotated`` aliases) so their help reads the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback when something fails.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final result line (and errors).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="`default` (packaged all-MiniLM-L6-v2), `smollm2` (packaged SmolLM2-135M GGUF), a Hugging Face "
        "folder, a .gguf file, or a Hub ID (online only).",
    ),
]
Checkpoint = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", help="A folder written by `flashsvd compress` or `finetune`."),
]
Task = Annotated[
    str | None,
    typer.Option(
        "--task",
        "-t",
        help="cola, sst2, mrpc, qqp, stsb, mnli, mnli-mm, qnli, rte, wnli, or wikitext2 (causal-LM perplexity).",
    ),
]
DataFile = Annotated[
    Path | None,
    typer.Option("--data-file", help="A local TSV/CSV/JSONL (or raw text) file with the task's data."),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="A folder in GLUE layout (<dir>/<task>/dev.tsv). Default: ../shared/data when it exists, "
        "else Hugging Face `datasets` (online).",
    ),
]
Split = Annotated[str, typer.Option("--split", help="dev (validation), train or test.")]
TextColumn = Annotated[
    str | None,
    typer.Option("--text-column", help="Column (header name or 0-based index) of the first text."),
]
TextPairColumn = Annotated[
    str | None, typer.Option("--text-pair-column", help="Column of the second text of pair tasks.")
]
LabelColumn = Annotated[str | None, typer.Option("--label-column", help="Column of the label.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Examples per batch.")]
MaxLength = Annotated[int, typer.Option("--max-length", min=8, help="Truncate inputs to this many tokens.")]
Device = Annotated[
    str, typer.Option("--device", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N.")
]
DType = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto (float32 on CPU; on CUDA the model's own bfloat16, else float16), float32, float16 or bfloat16.",
    ),
]
Backend = Annotated[
    str, typer.Option("--backend", help="flash (fused FlashSVD kernels) or torch (plain low-rank matmuls).")
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of sampling and training.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
