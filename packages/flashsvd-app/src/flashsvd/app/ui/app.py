"""``create_ui()``: the FlashSVD web UI, a thin layer over the ``flashsvd`` command (see ``jobs``)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from flashsvd.app.ui.tabs import checkpoints, compare, compress, evaluate, finetune
from flashsvd.app.ui.workspace import Workspace

TABS = (("Compress", compress), ("Evaluate", evaluate), ("Fine-tune", finetune),
        ("Checkpoints", checkpoints), ("Compare", compare))  # fmt: skip


def workspace(root: str | Path = ".", data_dir: str | Path | None = None) -> Workspace:
    """The workspace at ``root``; task data from ``data_dir``, else ``../shared/data`` if it exists here."""
    from flashsvd.app.tasks.data import DEFAULT_DATA_DIR

    if data_dir is None and DEFAULT_DATA_DIR.is_dir():
        data_dir = DEFAULT_DATA_DIR
    return Workspace(Path(root).resolve(), None if data_dir is None else Path(data_dir).resolve())


def create_ui(root: str | Path = ".", data_dir: str | Path | None = None) -> gr.Blocks:
    """The UI over the workspace ``root`` (its compressed_models/, models/finetuned/, results/).

    Analytics are off: nothing leaves the machine unless the user asks for a public link (``--share``).
    The partial saves of killed jobs are removed first, so they neither fill the disk nor show as
    checkpoints.
    """
    ws = workspace(root, data_dir)
    ws.clean_leftovers()
    with gr.Blocks(title="FlashSVD", analytics_enabled=False) as demo:
        gr.Markdown("# FlashSVD\nCompress → evaluate → fine-tune → compare low-rank transformers.")
        for title, module in TABS:
            with gr.Tab(title, id=title.lower()):
                module.build(ws)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(root: str | Path = ".", data_dir: str | Path | None = None, host: str = "127.0.0.1",
           port: int = 7860, share: bool = False, block: bool = True, **kwargs) -> gr.Blocks:  # fmt: skip
    """Start the UI; listens on 127.0.0.1 unless ``host`` says otherwise; ``block`` waits until Ctrl-C.

    Gradio's own start-up lines speak of ``launch(share=True)``; ours name the ``--share`` flag.
    """
    ws = workspace(root, data_dir)
    demo = create_ui(root, data_dir)
    demo.launch(server_name=host, server_port=port, share=share, quiet=True, prevent_thread_lock=True,
                allowed_paths=[str(p) for p in ws.allowed_roots], **kwargs)  # fmt: skip
    print(f"FlashSVD UI running on {demo.local_url}", flush=True)
    if demo.share_url:
        print(f"public link (anyone with it can use this UI): {demo.share_url}", flush=True)
    elif host in ("127.0.0.1", "localhost", "::1"):
        print("this machine only; `flashsvd ui --share` makes a public link, `--host 0.0.0.0` opens it "
              "to the network", flush=True)  # fmt: skip
    else:
        print(f"listening on {host}: reachable from the network; `flashsvd ui --share` makes a public link",
              flush=True)  # fmt: skip
    if block:
        demo.block_thread()
    return demo
