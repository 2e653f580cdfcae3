"""What the mount-side commands share: the one-line failure (the talking is blkfuse.client)."""

import sys
from typing import NoReturn

import click

from blkfuse.errors import ControlError


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 1."""
    click.echo(f"blkfuse: {message}", err=True)
    sys.exit(1)


def control_failure(e: ControlError) -> str:
    """A failed control command as the CLI prints it: the daemon's message and the errno."""
    return f"{e.message} [{e.errno_name}]"
