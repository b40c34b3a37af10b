"""One module per ``flashsvd`` subcommand."""
