"""Talking to a live mount from outside its daemon: control commands, status, unmount.

Shared by the CLI (`blkfuse ctl/status/umount`), the Python API (blkfuse.client.api) and the
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

    from blkfuse.client import holders

    T = TypeVar("T")

# `blkfuse ctl`/`status` import this module on every call (blkfuse.cli.fast): what only
# unmounting, the JSON status or the timeouts need is imported where it is used.

CONTROL = "control"

# How long a live daemon may take to answer `status json rules=0` before it counts as wedged.
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
        if not os.path.lexists(mountpoint):
            return f"{mountpoint}: no such file or directory"
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


def open_control(mountpoint: str | os.PathLike[str]) -> int:
    """Open MNT/control for a command (O_RDWR); ControlError with why it cannot be."""
    try:
        return os.open(control_path(mountpoint), os.O_RDWR)
    except OSError as e:
        raise ControlError(e.errno or errno.EIO, open_error(mountpoint, e)) from None


def exchange(fd: int, text: str) -> str:
    """Write `text` as one command unit on an open control file; return the answer text.

    ControlError on failure: the write's errno and the daemon's own message (which it leaves
    on the handle that wrote the command), or the errno's text if there is none.
    """
    if not text.endswith("\n"):
        text += "\n"
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


def send(mountpoint: str | os.PathLike[str], text: str) -> str:
    """Write `text` as one unit to the mount's control file; return the answer text.

    On failure raise ControlError: the write's errno and the daemon's own message (see
    exchange), or if `control` cannot be opened, that errno and why (open_error).
    """
    fd = open_control(mountpoint)
    try:
        return exchange(fd, text)
    finally:
        os.close(fd)


def status(mountpoint: str | os.PathLike[str], rules: int | None = None) -> dict[str, Any]:
    """The mount's status as `blkfuse status --json` shows it (ControlError on failure).

    `rules`: list only the first that many rules and active ids (None: all). rules=0 is the
    status without its rule list, what unmounting needs: it answers at once however many
    rules there are (100,000 rules take seconds to list)."""
    import json

    try:
        answer = send(mountpoint, "status json" + ("" if rules is None else f" rules={rules}"))
    except ControlError as e:
        if rules is None or e.errno != errno.EINVAL:
            raise
        answer = send(mountpoint, "status json")  # a daemon older than rules=: the whole
    result: dict[str, Any] = json.loads(answer)
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
        st = with_timeout(lambda: status(mountpoint, rules=0), timeout)
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


def busy_message(
    mountpoint: str, name: str, found: holders.Holders, suspended: int = 0, dead: bool = False
) -> str:
    """Why the mount may not go now: who uses its image and what to do, in order (each loop
    device with where it is mounted: `losetup -d` on a mounted one only sets autoclear)."""
    from blkfuse.daemon.lifecycle import GRACE_SECONDS  # the daemon's grace, said as it is

    fixes = [use.fix() for use in found.loop_uses()]
    if found.processes:
        fixes.append("end or close those processes")
    if suspended:
        fixes.append(
            f"resume the {suspended} suspended request{'s' if suspended > 1 else ''} "
            f"(blkfuse ctl {mountpoint} resume TAG)"
        )
    if dead:
        what = (
            f"{mountpoint}: the daemon is gone, not unmounted: {found.describe()} still "
            "uses the dead mount (its I/O fails)"
        )
        options = "or umount --lazy or --force (remove the dead mount anyway)"
    else:
        what = f"{mountpoint}: busy, not unmounted: {name} is in use by {found.describe()}"
        options = (
            f"or umount --lazy (detach after a grace of {GRACE_SECONDS:g} s) or --force "
            "(fail their requests now)"
        )
    return f"{what}; {'; '.join(fixes)}; {options}"


def users(mountpoint: str | os.PathLike[str], st: dict[str, Any] | None) -> holders.Holders:
    """Who uses the image of the mount at `mountpoint` (its daemon left out): by the image's
    path and inode while the daemon answers (`st`, its status), by path alone when it is gone
    (st None): loop devices backed by a file in the mount, processes with one open or mapped."""
    from blkfuse.client import holders

    mnt = os.path.realpath(mountpoint)
    if st is None:
        found = holders.find_under(mnt)
    else:
        path = os.path.join(mnt, st["info"].get("name") or "")
        try:
            stat = os.stat(path)  # the daemon just answered: this getattr is safe
        except OSError:
            return holders.Holders()
        found = holders.find(path, stat.st_dev, stat.st_ino, exclude=(int(st["info"]["pid"]),))
    found.loops = holders.settle(found.loops)  # one just given losetup -d is on its way
    return found


def loop_users(mountpoint: str | os.PathLike[str]) -> list[holders.LoopUse]:
    """The loop devices backed by a file in the mount at `mountpoint`, each with what uses it
    (found by path alone: also for a mount whose daemon is gone)."""
    from blkfuse.client import holders

    devices = holders.settle(holders.loop_devices_under(os.path.realpath(mountpoint)))
    return [holders.loop_use(dev) for dev in devices]


def loop_users_message(
    mountpoint: str, uses: list[holders.LoopUse], *, closed: bool = False
) -> str:
    """A mount taken down (`closed`) or about to be, while loop devices still use it."""
    named = ", ".join(use.describe() for use in uses)
    fixes = "; ".join(use.fix() for use in uses)
    if closed:
        return (
            f"{mountpoint}: {named} still used the mount, which is gone now (its I/O fails): "
            f"take it down before the mount ({fixes})"
        )
    return f"{mountpoint}: {named} still uses the mount: {fixes}"


def unmount(
    mountpoint: str | os.PathLike[str],
    timeout: float = 60.0,
    *,
    lazy: bool = False,
    force: bool = False,
) -> None:
    """Unmount a blkfuse mount in order: what `blkfuse umount` does, with its messages.

    While anything uses the image (a process with it open or mapped, a loop device backed by
    it: `users`) this refuses with MountError naming them and what to do, in order, unless
    `lazy` or `force`; the same for a mount whose daemon is gone, whose users would be left on
    a dead disk. Otherwise the daemon (found by its status) gets SIGTERM (`force`: SIGUSR1,
    which fails every new request at once): it resumes every suspended request, lets the
    requests in flight finish (`lazy`: open files get a grace), fsyncs the image and
    unmounts; this waits up to `timeout` s for the mount to go. A dead mount is removed
    directly; a daemon that does not answer is detached lazily. MountError says why the mount
    is still there.
    """
    import signal

    from blkfuse.client import mounttab

    if lazy and force:
        raise MountError("--lazy and --force: choose one")
    mnt = os.path.abspath(mountpoint)
    if not mounttab.is_blkfuse_mount(mnt):
        if not os.path.lexists(mnt):
            raise MountError(f"{mnt}: no such file or directory")
        raise MountError(f"{mnt}: not a blkfuse mount")
    try:
        # Without the rule list: only who runs the mount, its image and what it holds.
        st = with_timeout(lambda: status(mnt, rules=0), ANSWER_SECONDS)
        pid = int(st["info"]["pid"])
    except NoAnswer:
        # A wedged daemon: detach the mount so nothing new reaches it.
        if fusermount(mnt, lazy=True):
            raise MountError(
                f"{mnt}: the daemon did not answer within {ANSWER_SECONDS:g} s; "
                "the mount was detached lazily"
            ) from None
        raise MountError(f"{mnt}: the daemon does not answer and unmounting failed") from None
    except ControlError as e:
        # The daemon is gone (ENOTCONN) or does not answer: remove the mount itself, unless
        # that leaves a user on a dead disk without being asked to.
        if not (lazy or force) and e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            found = users(mnt, None)
            if found:
                raise MountError(busy_message(mnt, "", found, dead=True)) from None
        if fusermount(mnt) or fusermount(mnt, lazy=True):
            return
        raise MountError(f"{e.message} [{e.errno_name}]; and unmounting failed") from None
    except (ValueError, KeyError, TypeError) as e:
        raise MountError(f"{mnt}: the daemon's status is unreadable ({e})") from None
    if not (lazy or force):
        found = users(mnt, st)
        if found:
            name = st["info"].get("name") or ""
            raise MountError(busy_message(mnt, name, found, len(st.get("suspended") or ())))
    try:
        os.kill(pid, signal.SIGUSR1 if force else signal.SIGTERM)
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
