"""`python -m blkfuse ...`: the blkfuse command, for when its console script is not on PATH."""

from blkfuse.cli import run

run()
