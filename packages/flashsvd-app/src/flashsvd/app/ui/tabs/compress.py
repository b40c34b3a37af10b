"""Compress tab: model, method, keep ratio, calibration source → live log and a result card."""

from __future__ import annotations

import gradio as gr

from flashsvd.app.ui import handlers as H
from flashsvd.app.ui.errors import shown
from flashsvd.app.ui.workspace import Workspace


def build(ws: Workspace) -> None:
    with gr.Row():
        model = gr.Textbox(
            label="Model", value="default", info="`default` (packaged MiniLM), a hub ID or a local path"
        )
        method = gr.Dropdown(list(H.METHODS), value="svd", label="Method")
        keep = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Keep ratio (fraction of parameters kept)")
    with gr.Row():
        calib = gr.Dropdown(["", "sst2", "stsb", "wikitext2"], value="sst2", label="Calibration data (task)")
        samples = gr.Number(value=64, precision=0, label="Calibration samples")
        name = gr.Textbox(label="Checkpoint name (optional)")
    with gr.Row():
        run = gr.Button("Compress", variant="primary", elem_id="compress-run")
        cancel = gr.Button("Cancel", elem_id="compress-cancel")
    log = gr.Textbox(label="Progress", lines=8, max_lines=12, autoscroll=True)
    card = gr.Markdown(elem_id="compress-card")
    path = gr.Textbox(label="Checkpoint path", interactive=False, elem_id="compress-path")

    def compress(model, method, keep, calib, samples, name):
        yield from H.run_compress(ws, model, method, keep, calib, samples, name)

    event = run.click(shown(compress), [model, method, keep, calib, samples, name], [log, card, path],
                      api_name="compress")  # fmt: skip
    cancel.click(None, None, None, cancels=[event])
