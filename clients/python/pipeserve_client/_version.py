"""The release version of pipeserve: the one place it is written. Both distributions read it
at build time (pipeserve-client here, pipeserve through setup.py, which also pins the client
to it), and both `--version` flags show it."""

__version__ = "0.1.0"
