"""objfs.tools: the ``objfs`` command line (argument parsing and printing only)."""
