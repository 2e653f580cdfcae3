"""Helpers the mount-side commands share: talking to a mount's control file."""

import errno
import os
import sys

import click

from ..control import ControlError

CONTROL = "control"


def fail(message: str):
    """One line on stderr, exit status 1."""
    click.echo(f"blkfuse: {message}", err=True)
    sys.exit(1)


def control_path(mountpoint: str) -> str:
    return os.path.join(mountpoint, CONTROL)


def _read_all(fd) -> bytes:
    chunks, off = [], 0
    while True:
        b = os.pread(fd, 1 << 20, off)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        off += len(b)


def read_status(mountpoint: str) -> str:
    """What reading `control` answers: the human status."""
    fd = os.open(control_path(mountpoint), os.O_RDONLY)
    try:
        return _read_all(fd).decode(errors="replace")
    finally:
        os.close(fd)


def send(mountpoint: str, text: str) -> str:
    """Write `text` as one unit to the mount's control file; return the answer text.

    On failure raise ControlError with the daemon's own message (which the daemon leaves on
    the handle that wrote the command), or the plain errno text if there is none.
    """
    if not text.endswith("\n"):
        text += "\n"
    path = control_path(mountpoint)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise ControlError(e.errno, _open_error(mountpoint, e)) from None
    try:
        try:
            os.write(fd, text.encode())
        except OSError as e:
            try:
                answer = _read_all(fd).decode(errors="replace").strip()
            except OSError:
                answer = ""
            message = answer.removeprefix("error: ") or os.strerror(e.errno)
            raise ControlError(e.errno, f"{message} [{errno.errorcode.get(e.errno, e.errno)}]") \
                from None
        return _read_all(fd).decode(errors="replace")
    finally:
        os.close(fd)


def _open_error(mountpoint, e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return f"{mountpoint}: not a blkfuse mount (no control file)"
    if e.errno == errno.ENOTCONN:
        return f"{mountpoint}: the blkfuse daemon is gone (run: blkfuse umount {mountpoint})"
    if e.errno == errno.EACCES:
        return f"{mountpoint}: only the user who mounted it (or root) may send commands"
    return f"{control_path(mountpoint)}: {e.strerror}"


def is_blkfuse_mount(mountpoint: str) -> bool:
    from ..daemon import is_blkfuse_mount as check
    return check(mountpoint)
