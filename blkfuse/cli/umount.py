"""`blkfuse umount MOUNTPOINT`: release every suspended request, flush, unmount."""

import click

from ..client import unmount
from ..errors import MountError
from ._common import fail


@click.command("umount")
@click.argument("mountpoint")
@click.option("--timeout", default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the daemon's orderly shutdown.")
def command(mountpoint: str, timeout: float) -> None:
    """Unmount a blkfuse mount in order.

    The daemon resumes every suspended request, lets the requests in flight finish, fsyncs
    the image and unmounts. If the daemon is gone, the dead mount is removed.
    """
    try:
        unmount(mountpoint, timeout)
    except MountError as e:
        fail(str(e))
