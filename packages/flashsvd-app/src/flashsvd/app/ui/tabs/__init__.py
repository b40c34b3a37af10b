"""One module per UI tab; each exposes ``build(ws)`` called inside the ``gr.Blocks`` context."""
