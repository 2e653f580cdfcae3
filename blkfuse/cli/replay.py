"""`blkfuse replay LOG [TARGET]`: replay a dm-log-writes log (crash/replay.py), with xfstests
replay-log's options."""

import click

from blkfuse.cli._common import fail
from blkfuse.crash.logwrites import LogFormatError
from blkfuse.crash.replay import ReplayError, ReplayOptions, replay


@click.command(
    "replay",
    epilog="""\b
Examples:
  blkfuse replay disk.log copy.img --end-mark committed
  blkfuse replay disk.log /dev/loop3 --check fua --fsck 'e2fsck -fn /dev/loop3'
  blkfuse replay disk.log --find --end-mark committed
  blkfuse replay disk.log --num-entries

\b
Logs from blkfuse (-o log-writes=FILE), QEMU's blklogwrites driver and the kernel's
dm-log-writes all replay. A discard punches a hole (file) or is BLKDISCARD (device), else
zeroes; a resize:SIZE mark (blkfuse's resize) truncates a file target.""",
)
@click.argument("log", type=click.Path(dir_okay=False))
@click.argument("target", required=False, type=click.Path(dir_okay=False))
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Replay at most N entries.")
@click.option("--start-entry", type=click.IntRange(min=0), default=0, help="Start at entry N.")
@click.option("--start-mark", metavar="MARK", help="Start after the mark MARK.")
@click.option("--end-mark", metavar="MARK", help="Stop after the mark MARK (inclusive).")
@click.option("--next-flush", is_flag=True, help="Stop after the next FLUSH entry.")
@click.option("--next-fua", is_flag=True, help="Stop after the next FUA entry.")
@click.option("--find", is_flag=True, help="Replay nothing; print INDEX@SECTOR of the stop.")
@click.option("--num-entries", is_flag=True, help="Print the number of entries and exit.")
@click.option("--no-discard", is_flag=True, help="Skip discard entries.")
@click.option(
    "--check",
    metavar="N|flush|fua|discard",
    help="When to run --fsck: every N entries, or after each FLUSH/FUA/discard entry.",
)
@click.option("--fsck", metavar="CMD", help="Shell command run at --check points; failing stops.")
@click.option("-v", "--verbose", count=True, help="Print each replayed entry.")
def command(
    log: str,
    target: str | None,
    limit: int,
    start_entry: int,
    start_mark: str | None,
    end_mark: str | None,
    next_flush: bool,
    next_fua: bool,
    find: bool,
    num_entries: bool,
    no_discard: bool,
    check: str | None,
    fsck: str | None,
    verbose: int,
) -> None:
    """Replay the entries of LOG onto TARGET (a file or block device) as xfstests'
    replay-log does. Without TARGET, print the log's header line."""
    opts = ReplayOptions(
        limit=limit,
        start_entry=start_entry,
        start_mark=start_mark,
        end_mark=end_mark,
        next_flush=next_flush,
        next_fua=next_fua,
        find=find,
        num_entries=num_entries,
        discard=not no_discard,
        check=check,
        fsck=fsck,
        verbose=verbose,
    )
    try:
        status = replay(log, target, opts, out=click.echo)
    except (ReplayError, LogFormatError) as error:
        fail(str(error))
    except OSError as error:
        fail(f"{error.filename or log}: {error.strerror}")
    raise SystemExit(status)
