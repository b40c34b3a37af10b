"""The FlashSVD web UI (Gradio): ``create_ui()`` and ``launch()``; ``flashsvd ui`` starts it."""

from flashsvd.app.ui.app import create_ui, launch

__all__ = ["create_ui", "launch"]
