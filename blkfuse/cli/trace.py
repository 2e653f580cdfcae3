"""`blkfuse trace MNT`: print the mount's per-request trace live, one JSON line per request."""

import sys

import click

from blkfuse.cli._common import control_failure, fail
from blkfuse.client import TraceStream
from blkfuse.errors import ControlError


@click.command(
    "trace",
    epilog="""\b
Examples:
  blkfuse trace /mnt/faulty                   # every request from now on, until Ctrl-C
  blkfuse trace -n 10 /mnt/faulty | jq .op    # the next ten""",
)
@click.argument("mountpoint")
@click.option(
    "-n", "--count", type=click.IntRange(min=1), metavar="N", help="Stop after N records."
)
def command(mountpoint: str, count: int | None) -> None:
    """Stream the trace of the mount at MOUNTPOINT until interrupted (or the mount goes).

    One JSON object per image request, as `blkfuse mount --trace FILE` writes them: time,
    op, offset, length, pid and comm (when known), events, rules, errno, us, suspended_at.
    The records start with the first request after this command starts.
    """
    import json

    seen = 0
    try:
        records = TraceStream(mountpoint)
    except ControlError as e:
        fail(control_failure(e))
    try:
        for record in records:
            sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `blkfuse trace MNT | head`
        sys.stderr.close()
    finally:
        records.close()
