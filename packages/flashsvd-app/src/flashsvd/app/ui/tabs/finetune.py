"""Fine-tune tab: settings → live loss curve and the best checkpoint's path."""

from __future__ import annotations

import gradio as gr

from flashsvd.app.ui import handlers as H
from flashsvd.app.ui.errors import shown
from flashsvd.app.ui.workspace import Workspace


def build(ws: Workspace) -> None:
    with gr.Row():
        checkpoint = gr.Dropdown(H.checkpoint_choices(ws), allow_custom_value=True, label="Checkpoint")
        refresh = gr.Button("Refresh list", size="sm")
        task = gr.Dropdown([t for t in H.TASKS if t != "wikitext2"], value="sst2", label="Task")
    with gr.Row():
        epochs = gr.Number(value=1, label="Epochs")
        lr = gr.Number(value=5e-5, label="Learning rate")
        batch = gr.Number(value=16, precision=0, label="Batch size")
        steps = gr.Number(value=0, precision=0, label="Max steps (0 = no limit)")
        n_train = gr.Number(value=0, precision=0, label="Max train samples (0 = all)")
        n_eval = gr.Number(value=0, precision=0, label="Max eval samples (0 = all)")
    with gr.Row():
        run = gr.Button("Fine-tune", variant="primary")
        cancel = gr.Button("Cancel")
    log = gr.Textbox(label="Progress", lines=6, max_lines=10, autoscroll=True)
    curve = gr.Plot(label="Loss")
    best = gr.Textbox(label="Best checkpoint", interactive=False)

    def finetune(checkpoint, task, epochs, lr, batch, steps, n_train, n_eval):
        yield from H.run_finetune(ws, checkpoint, task, epochs, lr, batch, steps, n_train, n_eval)

    refresh.click(lambda: gr.Dropdown(choices=H.checkpoint_choices(ws)), None, checkpoint)
    event = run.click(shown(finetune), [checkpoint, task, epochs, lr, batch, steps, n_train, n_eval],
                      [log, curve, best],
                      api_name="finetune")  # fmt: skip
    cancel.click(None, None, None, cancels=[event])
