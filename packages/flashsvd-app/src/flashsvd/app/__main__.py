"""``python -m flashsvd.app`` runs the ``flashsvd`` command (the UI starts its jobs this way)."""

from flashsvd.app.cli import main

if __name__ == "__main__":
    main()
