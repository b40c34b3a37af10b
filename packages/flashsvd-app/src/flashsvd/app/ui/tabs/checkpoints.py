"""Checkpoints tab: list local checkpoints with their report, download their JSON, delete one."""

from __future__ import annotations

import gradio as gr

from flashsvd.app.ui import handlers as H
from flashsvd.app.ui.errors import shown
from flashsvd.app.ui.workspace import Workspace

COLUMNS = ["path", "method", "keep_ratio", "kept_fraction", "params", "MiB on disk"]


def build(ws: Workspace) -> None:
    refresh = gr.Button("Refresh", elem_id="ckpt-refresh")
    table = gr.Dataframe(
        headers=COLUMNS, value=H.checkpoint_table(ws), interactive=False, elem_id="ckpt-table"
    )
    with gr.Row():
        chosen = gr.Dropdown(
            [str(p) for p in ws.list_checkpoints()], allow_custom_value=True, label="Checkpoint"
        )
        show = gr.Button("Show report")
        delete = gr.Button("Delete", variant="stop")
    card = gr.Markdown()
    files = gr.File(label="Metadata and results JSON", file_count="multiple")
    status = gr.Markdown()

    def refresh_all():
        paths = [str(p) for p in ws.list_checkpoints()]
        return H.checkpoint_table(ws), gr.Dropdown(choices=paths, value=None)

    def show_report(folder):
        return H.report_card(ws.confine(folder)), H.checkpoint_files(ws, folder)

    refresh.click(refresh_all, None, [table, chosen], api_name="checkpoints")
    show.click(shown(show_report), chosen, [card, files], api_name="checkpoint_report")
    delete.click(
        shown(lambda folder: H.delete_checkpoint(ws, folder)), chosen, status, api_name="delete"
    ).then(refresh_all, None, [table, chosen])
