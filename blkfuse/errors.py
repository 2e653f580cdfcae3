"""The one shape of a failure that carries an errno.

A control write, an engine command or a CLI call that fails has two audiences: the program that
sees an errno, and the person who reads the message. Every such exception in blkfuse is a
`BlkfuseError`, so each layer can catch one type and pass both on unchanged.
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


def errno_name(number: int) -> str:
    """`ENOSPC` for 28; the number itself when it has no name."""
    return _errno.errorcode.get(number, str(number))
