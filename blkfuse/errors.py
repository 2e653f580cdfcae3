"""The one shape of a failure that carries an errno, and the other exceptions that cross
module boundaries.

A control write, an engine command or a CLI call that fails has two audiences: the program that
sees an errno, and the person who reads the message. Every such exception in blkfuse is a
`BlkfuseError`, so each layer can catch one type and pass both on unchanged. MountError is the
one-line reason a mount (or an unmount) did not happen; it has no errno.
"""

import errno as _errno


class BlkfuseError(Exception):
    """A failure with the errno a caller sees and the message a person reads."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)


class ControlError(BlkfuseError):
    """A control write failed: `.errno` for the writer, `.message` for the status. Seen from
    outside the daemon, the failure of `blkfuse ctl` / `blkfuse.Mount.ctl` (here rather than in
    control.py so that `from blkfuse import ControlError` does not load the daemon's code)."""


class MountError(Exception):
    """A reason not to mount, or not to be able to unmount; str(e) is the one line shown."""


def errno_name(number: int) -> str:
    """`ENOSPC` for 28; the number itself when it has no name."""
    return _errno.errorcode.get(number, str(number))
