"""``python -m snapback``: the same as the ``snapback`` command (used by background jobs)."""

from snapback.cli.main import main

main()
