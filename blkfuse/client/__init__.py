"""Talking to a live mount from outside its daemon: control commands, status, unmount.

Shared by the CLI (`blkfuse ctl/status/umount`), the Python API (blkfuse.api) and the
scripts, so there is one way to send a command and one way to take a mount down.

A control command is written as one write(2) to MNT/control and its answer read back on the
same open file: the daemon keeps each open's answer (or error text) on that handle.
"""

from __future__ import annotations

import errno
import os
import sys

from blkfuse.errors import ControlError, MountError

TYPE_CHECKING = False  # no `typing` at run time (see blkfuse/__init__.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")

# `blkfuse ctl`/`status` import this module on every call (blkfuse.cli.fast): what only
# unmounting, the JSON status or the timeouts need is imported where it is used.

CONTROL = "control"

# How long a live daemon may take to answer `status json` before it counts as wedged.
ANSWER_SECONDS = 10.0


class NoAnswer(TimeoutError):
    """with_timeout gave up waiting (distinct from an ETIMEDOUT OSError, also a TimeoutError)."""


def blkfuse_command() -> list[str]:
    """The argv prefix that runs this installation's `blkfuse` command.

    The console script beside the running interpreter when there is one (a venv), else
    `python -m blkfuse` with this interpreter: either way the same blkfuse as this module.
    """
    script = os.path.join(os.path.dirname(sys.executable), "blkfuse")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "blkfuse"]


def control_path(mountpoint: str | os.PathLike[str]) -> str:
    return os.path.join(mountpoint, CONTROL)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    off = 0
    while True:
        b = os.pread(fd, 1 << 20, off)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        off += len(b)


def open_error(mountpoint: str | os.PathLike[str], e: OSError) -> str:
    """Why MNT/control could not be opened, in words."""
    if e.errno == errno.ENOENT:
        return f"{mountpoint}: not a blkfuse mount (no control file)"
    if e.errno == errno.ENOTCONN:
        return f"{mountpoint}: the blkfuse daemon is gone (run: blkfuse umount {mountpoint})"
    if e.errno == errno.EACCES:
        return f"{mountpoint}: only the user who mounted it (or root) may send commands"
    return f"{control_path(mountpoint)}: {e.strerror}"


def read_status(mountpoint: str | os.PathLike[str]) -> str:
    """What reading `control` answers: the human status. OSError if it cannot be read."""
    fd = os.open(control_path(mountpoint), os.O_RDONLY)
    try:
        return _read_all(fd).decode(errors="replace")
    finally:
        os.close(fd)


def send(mountpoint: str | os.PathLike[str], text: str) -> str:
    """Write `text` as one unit to the mount's control file; return the answer text.

    On failure raise ControlError: the write's errno and the daemon's own message (which it
    leaves on the handle that wrote the command), or the errno's text if there is none; if
    `control` cannot be opened, that errno and why (open_error).
    """
    if not text.endswith("\n"):
        text += "\n"
    try:
        fd = os.open(control_path(mountpoint), os.O_RDWR)
    except OSError as e:
        raise ControlError(e.errno or errno.EIO, open_error(mountpoint, e)) from None
    try:
        try:
            os.write(fd, text.encode())
        except OSError as e:
            try:
                answer = _read_all(fd).decode(errors="replace").strip()
            except OSError:
                answer = ""
            message = answer.removeprefix("error: ") or os.strerror(e.errno or errno.EIO)
            raise ControlError(e.errno or errno.EIO, message) from None
        return _read_all(fd).decode(errors="replace")
    finally:
        os.close(fd)


def status(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The mount's status as `blkfuse status --json` shows it (ControlError on failure)."""
    import json

    result: dict[str, Any] = json.loads(send(mountpoint, "status json"))
    return result


class TraceStream:
    """The mount's trace, live: iterating yields one dict per image request as it finishes
    (the records `blkfuse mount --trace FILE` writes), from the requests after this object
    was made until the mount goes away or close(). ControlError if the stream cannot be
    opened. Iterate in another thread than the one doing the I/O."""

    def __init__(self, mountpoint: str | os.PathLike[str]) -> None:
        try:
            self._fd: int | None = os.open(control_path(mountpoint), os.O_RDWR)
        except OSError as e:
            raise ControlError(e.errno or errno.EIO, open_error(mountpoint, e)) from None
        try:
            os.write(self._fd, b"trace\n")
        except OSError as e:
            answer = _read_all(self._fd).decode(errors="replace").strip()
            self.close()
            raise ControlError(
                e.errno or errno.EIO, answer.removeprefix("error: ") or os.strerror(e.errno or 0)
            ) from None
        self._lines: list[bytes] = []
        self._pending = b""

    def __iter__(self) -> TraceStream:
        return self

    def __next__(self) -> dict[str, Any]:
        while not self._lines:
            if self._fd is None:
                raise StopIteration
            # Each read returns within a heartbeat (a bare newline when nothing happened), so
            # the reader can always be interrupted; b"" when the mount shuts down.
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                self.close()
                raise StopIteration
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            self._lines = [line for line in lines if line]
        import json

        record: dict[str, Any] = json.loads(self._lines.pop(0))
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TraceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def with_timeout(fn: Callable[[], T], timeout: float) -> T:
    """fn() in a thread, NoAnswer after `timeout` s: an open() or write() on a wedged
    mount never returns, and cannot be interrupted. The thread left behind is a daemon thread
    whose (killable) wait ends with the process or with the daemon."""
    import threading

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["answer"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise NoAnswer(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    answer: T = box["answer"]
    return answer


def release_all(mountpoint: str | os.PathLike[str], timeout: float = ANSWER_SECONDS) -> None:
    """Drop every breakpoint and resume every suspended request, best effort: so that a
    process whose request the daemon holds can go on (or be killed) before anything else."""
    import functools

    try:
        st = with_timeout(lambda: status(mountpoint), timeout)
    except (ControlError, NoAnswer, ValueError):
        return
    lines = [f"remove_break {b['tag']}" for b in st.get("breakpoints", [])]
    lines += [f"resume {tag}" for s in st.get("suspended", []) for tag in s.get("tags", [])]
    for line in lines:  # one at a time: a request resumed meanwhile fails only its line
        try:
            with_timeout(functools.partial(send, mountpoint, line), timeout)
        except (ControlError, NoAnswer):
            pass


def fusermount(mountpoint: str | os.PathLike[str], lazy: bool = False) -> bool:
    """Remove a mount without its daemon (fusermount3 -u, or umount as root)."""
    import shutil
    import subprocess

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [os.fspath(mountpoint)]
    elif os.geteuid() == 0:
        cmd = ["umount"] + (["-l"] if lazy else []) + [os.fspath(mountpoint)]
    else:
        return False
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def force_unmount(mountpoint: str | os.PathLike[str]) -> bool:
    """Last resort: remove a (possibly dead) mount lazily without asking its daemon.
    True once nothing is mounted there."""
    import subprocess

    from blkfuse.client import mounttab

    if not mounttab.is_mounted(mountpoint):
        return True
    for lazy in (False, True):
        fusermount(mountpoint, lazy=lazy)
        if not mounttab.is_mounted(mountpoint):
            return True
    if os.geteuid() == 0:
        subprocess.run(
            ["umount", "-l", os.fspath(mountpoint)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return not mounttab.is_mounted(mountpoint)


def _wait_unmounted(mountpoint: str, timeout: float) -> bool:
    import time

    from blkfuse.client import mounttab

    deadline = time.monotonic() + timeout
    while mounttab.is_blkfuse_mount(mountpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def unmount(mountpoint: str | os.PathLike[str], timeout: float = 60.0) -> None:
    """Unmount a blkfuse mount in order (what `blkfuse umount` does).

    The daemon (found by its status) gets SIGTERM: it resumes every suspended request, lets
    the requests in flight finish, fsyncs the image and unmounts; this waits up to `timeout`
    s for the mount to go. A mount whose daemon is gone is removed directly; a daemon that
    does not answer is detached lazily. MountError says why the mount is still there.
    """
    import signal

    from blkfuse.client import mounttab

    mnt = os.path.abspath(mountpoint)
    if not mounttab.is_blkfuse_mount(mnt):
        raise MountError(f"{mnt}: not a blkfuse mount")
    try:
        pid = int(with_timeout(lambda: status(mnt), ANSWER_SECONDS)["info"]["pid"])
    except NoAnswer:
        # A wedged daemon: detach the mount so nothing new reaches it.
        if fusermount(mnt, lazy=True):
            raise MountError(
                f"{mnt}: the daemon did not answer within {ANSWER_SECONDS:g} s; "
                "the mount was detached lazily"
            ) from None
        raise MountError(f"{mnt}: the daemon does not answer and unmounting failed") from None
    except ControlError as e:
        # The daemon is gone (ENOTCONN) or does not answer: remove the mount itself.
        if fusermount(mnt) or fusermount(mnt, lazy=True):
            return
        raise MountError(f"{e.message} [{e.errno_name}]; and unmounting failed") from None
    except (ValueError, KeyError, TypeError) as e:
        raise MountError(f"{mnt}: the daemon's status is unreadable ({e})") from None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        if not (fusermount(mnt) or fusermount(mnt, lazy=True)):
            raise MountError(
                f"{mnt}: the daemon (pid {pid}) is gone and unmounting failed"
            ) from None
        return
    except PermissionError:
        raise MountError(f"{mnt}: not allowed to stop the daemon (pid {pid})") from None
    if not _wait_unmounted(mnt, timeout):
        raise MountError(
            f"{mnt}: still mounted {timeout:g} s after asking the daemon (pid {pid}) to stop"
        )
