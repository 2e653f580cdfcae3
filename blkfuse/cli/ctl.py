"""`blkfuse ctl MNT COMMAND...`: send control commands to a mount."""

import click

from blkfuse.cli import fast


@click.command(
    "ctl",
    context_settings={"ignore_unknown_options": True},
    epilog="""\b
Examples:
  blkfuse ctl /mnt/faulty inject-error event=write_aio errno=ENOSPC once=on
  blkfuse ctl /mnt/faulty wait_hit 1 30      # until rule 1 fires (exit 1 after 30 s)
  blkfuse ctl /mnt/faulty break read_aio A
  blkfuse ctl /mnt/faulty help""",
)
@click.argument("mountpoint")
@click.argument("words", nargs=-1, required=True, metavar="COMMAND...")
def command(mountpoint: str, words: tuple[str, ...]) -> None:
    """Send COMMAND to the mount at MOUNTPOINT and print its answer.

    COMMAND's words are joined into one line (`blkfuse ctl /mnt break write_aio A`); an
    argument holding newlines sends several lines in one write, applied only if all are valid.
    `blkfuse ctl /mnt help` lists the commands. On failure the daemon's message is printed
    and the exit status is 1.
    """
    fast.ctl(mountpoint, words)  # the plain form of this command runs there without click
