"""`blkfuse umount MOUNTPOINT`: unmount in order, and only what nothing uses (or say who does).

Taking a disk away from a loop device or a process that still has it open leaves them on a
dead mount (I/O errors on the loop device). So by default the image must be unused: no process
with it open or mapped, no loop device backed by it (holders.py). --lazy keeps the older
behaviour (the daemon resumes suspended requests, gives open files GRACE_SECONDS, then detaches
lazily); --force fails every new request at once and detaches as soon as the requests in flight
are answered.
"""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Any

import click

from blkfuse.cli._common import control_failure, fail
from blkfuse.client import holders, send
from blkfuse.client.mounttab import is_blkfuse_mount
from blkfuse.daemon.lifecycle import GRACE_SECONDS
from blkfuse.errors import ControlError

# How long a live daemon may take to answer `status json` before it counts as wedged.
ANSWER_SECONDS = 10.0


def _ask(mountpoint: str, text: str, timeout: float) -> str:
    """send(), but give up after `timeout` s: an open() of a wedged mount never returns.
    The thread left behind is a daemon thread; process exit ends its (killable) wait."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["answer"] = send(mountpoint, text)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["answer"]


def _wait_unmounted(mountpoint: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_blkfuse_mount(mountpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _fusermount(mountpoint: str, lazy: bool = False) -> bool:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [mountpoint]
    elif os.geteuid() == 0:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    else:
        return False
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _busy_message(mountpoint: str, status: dict) -> str | None:
    """Why the mount may not go now (what uses its image), or None."""
    name = status["info"].get("name") or ""
    path = os.path.join(os.path.realpath(mountpoint), name)
    try:
        st = os.stat(path)  # the daemon just answered: this getattr is safe
    except OSError:
        return None
    found = holders.find(path, st.st_dev, st.st_ino, exclude=(int(status["info"]["pid"]),))
    if not found:
        return None
    fixes = [f"losetup -d {dev}" for dev in found.loops]
    if found.processes:
        fixes.append("end or close those processes")
    suspended = len(status.get("suspended") or ())
    if suspended:
        fixes.append(
            f"resume the {suspended} suspended request{'s' if suspended > 1 else ''} "
            f"(blkfuse ctl {mountpoint} resume TAG)"
        )
    return (
        f"{mountpoint}: busy, not unmounted: {name} is in use by {found.describe()}; "
        f"{', '.join(fixes)}; or umount --lazy (detach after a grace of {GRACE_SECONDS:g} s) "
        "or --force "
        "(fail their requests now)"
    )


@click.command(
    "umount",
    epilog="""\b
Examples:
  blkfuse umount /mnt/faulty           # refuses (exit 1) while anything uses the image
  blkfuse umount --force /mnt/faulty   # fail the users' requests and detach now""",
)
@click.argument("mountpoint")
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the daemon's orderly shutdown.",
)
@click.option(
    "--lazy",
    is_flag=True,
    help="Unmount even if the image is in use: suspended requests are resumed, open "
    f"files get {GRACE_SECONDS:g} s to close, then the mount is detached (later "
    "requests fail).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Unmount even if the image is in use: suspended requests are resumed, every "
    "new request fails with EIO at once, the mount is detached.",
)
def command(mountpoint: str, timeout: float, lazy: bool, force: bool) -> None:
    """Unmount a blkfuse mount in order, if nothing uses its image.

    The daemon resumes every suspended request, lets the requests in flight finish, fsyncs
    the image and unmounts. While a process has the image open or mapped, or a loop device
    is backed by it, umount refuses (exit 1) and names them, unless --lazy or --force.
    If the daemon is gone, the dead mount is removed.
    """
    if lazy and force:
        fail("--lazy and --force: choose one")
    mountpoint = os.path.abspath(mountpoint)
    if not is_blkfuse_mount(mountpoint):
        fail(f"{mountpoint}: not a blkfuse mount")
    try:
        status = json.loads(_ask(mountpoint, "status json", ANSWER_SECONDS))
        pid = int(status["info"]["pid"])
    except TimeoutError:
        # A wedged daemon: detach the mount so nothing new reaches it.
        if _fusermount(mountpoint, lazy=True):
            fail(
                f"{mountpoint}: the daemon did not answer within {ANSWER_SECONDS:g} s; "
                "the mount was detached lazily"
            )
        fail(f"{mountpoint}: the daemon does not answer and unmounting failed")
    except ControlError as e:
        # The daemon is gone (ENOTCONN) or does not answer: remove the mount itself.
        if _fusermount(mountpoint) or _fusermount(mountpoint, lazy=True):
            return
        fail(f"{control_failure(e)}; and unmounting failed")
    except (ValueError, KeyError) as e:
        fail(f"{mountpoint}: the daemon's status is unreadable ({e})")
    if not (lazy or force):
        busy = _busy_message(mountpoint, status)
        if busy:
            fail(busy)
    try:
        os.kill(pid, signal.SIGUSR1 if force else signal.SIGTERM)
    except ProcessLookupError:
        if not (_fusermount(mountpoint) or _fusermount(mountpoint, lazy=True)):
            fail(f"{mountpoint}: the daemon (pid {pid}) is gone and unmounting failed")
        return
    except PermissionError:
        fail(f"{mountpoint}: not allowed to stop the daemon (pid {pid})")
    if not _wait_unmounted(mountpoint, timeout):
        fail(
            f"{mountpoint}: still mounted {timeout:g} s after asking the daemon (pid {pid}) to stop"
        )
