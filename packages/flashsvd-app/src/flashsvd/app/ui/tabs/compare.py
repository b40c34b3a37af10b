"""Compare tab: accuracy vs keep ratio per method, and memory/latency bars, from the results folder."""

from __future__ import annotations

import gradio as gr

from flashsvd.app.ui.plots import memory_latency_bars, metric_vs_keep_ratio
from flashsvd.app.ui.workspace import Workspace


def build(ws: Workspace) -> None:
    refresh = gr.Button("Draw from results/", elem_id="compare-refresh")
    quality = gr.Plot(label="Quality vs keep ratio", elem_id="compare-quality")
    resources = gr.Plot(label="Memory and latency", elem_id="compare-resources")

    def draw():
        results = ws.load_results()
        return metric_vs_keep_ratio(results), memory_latency_bars(results)

    refresh.click(draw, None, [quality, resources], api_name="compare")
