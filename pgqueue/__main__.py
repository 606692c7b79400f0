"""``python -m pgqueue``: the ``pgqueue`` command, where its script is not on PATH."""

from pgqueue.cli import main

main()
