"""`blkfuse umount MOUNTPOINT`: unmount in order, and only what nothing uses (or say who does).

Taking a disk away from a loop device or a process that still has it open leaves them on a
dead mount (I/O errors on the loop device). So by default the image must be unused: no process
with it open or mapped, no loop device backed by it (holders.py); a loop device is named with
where it is mounted, which must go first. --lazy keeps the older behaviour (the daemon resumes
suspended requests, gives open files GRACE_SECONDS, then detaches lazily); --force fails every
new request at once and detaches as soon as the requests in flight are answered.

The flow and its messages are blkfuse.client.unmount, which the Python API uses too.
"""

import click

from blkfuse.cli._common import fail
from blkfuse.client import unmount
from blkfuse.daemon.lifecycle import GRACE_SECONDS
from blkfuse.errors import MountError


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
    is backed by it, umount refuses (exit 1) and names them (a loop device with where it is
    mounted, to unmount first), unless --lazy or --force. If the daemon is gone, the dead
    mount is removed, unless a loop device or a process still uses it (the same refusal).
    """
    try:
        unmount(mountpoint, timeout, lazy=lazy, force=force)
    except MountError as e:
        fail(str(e))
