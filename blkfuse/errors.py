"""The exceptions that cross module boundaries.

Everything that fails with an errno (a control write, an engine command, a control command
sent from outside the daemon) raises a BlkfuseError: `.errno` is what a writer of `control`
sees, `.message` the text the status and the CLI show. MountError is the one-line reason a
mount (or an unmount) did not happen; it has no errno.
"""

import errno as _errno


class BlkfuseError(Exception):
    """A failure with an errno (`.errno`) and a message for people (`.message`)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def errno_name(self) -> str:
        """"ENOENT", or the number when the errno has no name."""
        return _errno.errorcode.get(self.errno, str(self.errno))


class ControlError(BlkfuseError):
    """A control command failed: in the daemon (the write to `control` fails with `.errno`)
    or, seen from outside, the answer to `Mount.ctl` / `blkfuse ctl`."""


class MountError(Exception):
    """A reason not to mount, or not to be able to unmount; str(e) is the one line shown."""
