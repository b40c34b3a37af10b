"""``flashsvd demo``: the embedded default job, offline, on the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import typer

HELP = "Run the embedded default job offline on the packaged all-MiniLM-L6-v2 and print a report."


def demo(
    max_pairs: int = typer.Option(500, help="STS-B pairs to evaluate (of ../shared/data/stsb/train.tsv)."),
) -> None:
    """Load the packaged MiniLM and report its size (the compression stages land with issue 6/7)."""
    from transformers import AutoModel

    from flashsvd.app.defaults import DEFAULT_MODEL_NAME, packaged_minilm_path

    model = AutoModel.from_pretrained(packaged_minilm_path())
    n_params = sum(p.numel() for p in model.parameters())
    typer.echo(f"{DEFAULT_MODEL_NAME}: {n_params:,} parameters (max_pairs={max_pairs})")
