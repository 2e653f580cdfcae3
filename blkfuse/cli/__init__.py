"""The `blkfuse` command: one module per subcommand, as in S3QL.

`run()` is the console script. `blkfuse ctl` and `blkfuse status` are scripted in loops, so
when their arguments need no option parsing they run from blkfuse.cli.fast, which loads neither
click nor trio nor pyfuse3; everything else (and those two with options or --help) goes to the
click group, `main` (blkfuse.cli.group, imported on first use).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # no `typing` at run time (see blkfuse/__init__.py)
if TYPE_CHECKING:
    from typing import Any

    import click

# subcommand name -> module in this package that defines `command`
SUBCOMMANDS = {
    "mount": "mount",
    "umount": "umount",
    "ctl": "ctl",
    "status": "status",
    "check": "check",
    "events": "events",
    "trace": "trace",
    "replay": "replay",
    "log": "log",
    "crashtest": "crashtest",
}


def run() -> None:
    """`blkfuse ARGS...`: the fast path for plain `ctl`/`status`, else the click group."""
    from blkfuse.cli import fast

    fast.run(sys.argv[1:])  # returns only when the arguments need click
    from blkfuse.cli.group import main

    main(prog_name="blkfuse")


def __getattr__(name: str) -> Any:
    # `from blkfuse.cli import main` (tests, CliRunner) gets the click group, loaded now.
    if name == "main":
        from blkfuse.cli.group import main

        return main
    raise AttributeError(f"module 'blkfuse.cli' has no attribute {name!r}")


if TYPE_CHECKING:
    main: click.Group
