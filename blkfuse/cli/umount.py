"""`blkfuse umount MOUNTPOINT`: release every suspended request, flush, unmount."""

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import click

from ._common import ControlError, fail, is_blkfuse_mount, send


# How long a live daemon may take to answer `status json` before it counts as wedged.
ANSWER_SECONDS = 10.0


def _ask(mountpoint, text, timeout):
    """send(), but give up after `timeout` s: an open() of a wedged mount never returns.
    The thread left behind is a daemon thread; process exit ends its (killable) wait."""
    box = {}

    def run():
        try:
            box["answer"] = send(mountpoint, text)
        except BaseException as e:       # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["answer"]


def _wait_unmounted(mountpoint, timeout) -> bool:
    deadline = time.monotonic() + timeout
    while is_blkfuse_mount(mountpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _fusermount(mountpoint, lazy=False) -> bool:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [mountpoint]
    elif os.geteuid() == 0:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    else:
        return False
    return subprocess.run(cmd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


@click.command("umount")
@click.argument("mountpoint")
@click.option("--timeout", default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the daemon's orderly shutdown.")
def command(mountpoint, timeout):
    """Unmount a blkfuse mount in order.

    The daemon resumes every suspended request, lets the requests in flight finish, fsyncs
    the image and unmounts. If the daemon is gone, the dead mount is removed.
    """
    mountpoint = os.path.abspath(mountpoint)
    if not is_blkfuse_mount(mountpoint):
        fail(f"{mountpoint}: not a blkfuse mount")
    try:
        status = json.loads(_ask(mountpoint, "status json", ANSWER_SECONDS))
        pid = int(status["info"]["pid"])
    except TimeoutError:
        # A wedged daemon: detach the mount so nothing new reaches it.
        if _fusermount(mountpoint, lazy=True):
            fail(f"{mountpoint}: the daemon did not answer within {ANSWER_SECONDS:g} s; "
                 "the mount was detached lazily")
        fail(f"{mountpoint}: the daemon does not answer and unmounting failed")
    except ControlError as e:
        # The daemon is gone (ENOTCONN) or does not answer: remove the mount itself.
        if _fusermount(mountpoint) or _fusermount(mountpoint, lazy=True):
            return
        fail(f"{e.message}; and unmounting failed")
    except (ValueError, KeyError) as e:
        fail(f"{mountpoint}: the daemon's status is unreadable ({e})")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        if not (_fusermount(mountpoint) or _fusermount(mountpoint, lazy=True)):
            fail(f"{mountpoint}: the daemon (pid {pid}) is gone and unmounting failed")
        return
    except PermissionError:
        fail(f"{mountpoint}: not allowed to stop the daemon (pid {pid})")
    if not _wait_unmounted(mountpoint, timeout):
        fail(f"{mountpoint}: still mounted {timeout:g} s after asking the daemon "
             f"(pid {pid}) to stop")
