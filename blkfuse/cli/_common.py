"""What the mount-side commands share: the one-line failure (the talking is blkfuse.client).
No click here: blkfuse.cli.fast uses it too."""

from __future__ import annotations

import sys

from blkfuse.errors import ControlError

TYPE_CHECKING = False  # no `typing` at run time (see blkfuse/__init__.py)
if TYPE_CHECKING:
    from typing import NoReturn


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 1."""
    sys.stderr.write(f"blkfuse: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def control_failure(e: ControlError) -> str:
    """A failed control command as the CLI prints it: the daemon's message and the errno."""
    return f"{e.message} [{e.errno_name}]"
