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
    ranks = gr.Plot(label="Rank per layer")
    with gr.Row():
        layer = gr.Dropdown([], label="Layer", allow_custom_value=True)
        show = gr.Button("Show spectrum")
    spectrum = gr.Plot(label="Singular values of the dense layer")

    def compress(model, method, keep, calib, samples, name):
        yield from H.run_compress(ws, model, method, keep, calib, samples, name)

    def after(folder):
        if not folder:
            return None, gr.Dropdown(choices=[], value=None)
        rows = H.layer_ranks(ws.confine(folder))
        names = [r["layer"] for r in rows if r["rank"] is not None]
        return H.rank_figure(folder, rows), gr.Dropdown(choices=names, value=names[0] if names else None)

    event = run.click(shown(compress), [model, method, keep, calib, samples, name], [log, card, path],
                      api_name="compress")  # fmt: skip
    event.then(shown(after), path, [ranks, layer])
    cancel.click(None, None, None, cancels=[event])
    show.click(shown(lambda m, folder, lay: H.spectrum_figure(m, ws.confine(folder), lay)), [model, path, layer],
               spectrum, api_name="spectrum")  # fmt: skip
