"""Evaluate tab: pick checkpoints (and the dense model), a task and a backend → a results table."""

from __future__ import annotations

import gradio as gr

from flashsvd.app.ui import handlers as H
from flashsvd.app.ui.errors import shown
from flashsvd.app.ui.workspace import Workspace


def build(ws: Workspace) -> None:
    with gr.Row():
        choices = gr.Dropdown(
            H.checkpoint_choices(ws),
            multiselect=True,
            allow_custom_value=True,
            label="Models",
            elem_id="eval-models",
        )
        refresh = gr.Button("Refresh list", size="sm")
    with gr.Row():
        task = gr.Dropdown(list(H.TASKS), value="stsb", label="Task")
        backend = gr.Radio(["flash", "torch"], value="flash", label="Backend")
        samples = gr.Number(value=200, precision=0, label="Max eval samples (0 = all)")
    with gr.Row():
        run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
        cancel = gr.Button("Cancel")
    log = gr.Textbox(label="Progress", lines=6, max_lines=10, autoscroll=True)
    table = gr.Dataframe(headers=H.EVAL_COLUMNS, label="Results", elem_id="eval-table", interactive=False)

    def evaluate(models, task, backend, samples):
        yield from H.run_evaluate(ws, models or [], task, backend, samples or 0)

    refresh.click(
        lambda: gr.Dropdown(choices=H.checkpoint_choices(ws)), None, choices, api_name="eval_choices"
    )
    event = run.click(shown(evaluate), [choices, task, backend, samples], [log, table], api_name="evaluate")
    cancel.click(None, None, None, cancels=[event])
