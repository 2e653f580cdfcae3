"""`blkfuse status MNT [--json]`: what the mount is doing."""

import json

import click

from blkfuse.cli._common import control_failure, fail
from blkfuse.client import open_error, read_status, status
from blkfuse.errors import ControlError


@click.command(
    "status",
    epilog="""\b
Examples:
  blkfuse status /mnt/faulty
  blkfuse status --json /mnt/faulty | jq '.rules[] | {id, hits, spent}'""",
)
@click.argument("mountpoint")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Machine-readable status (needs the right to write control).",
)
def command(mountpoint: str, as_json: bool) -> None:
    """Show the state, rules, breakpoints, suspended requests and counters of a mount."""
    if as_json:
        try:
            answer = status(mountpoint)
        except ControlError as e:
            fail(control_failure(e))
        click.echo(json.dumps(answer, indent=2))
        return
    try:
        text = read_status(mountpoint)
    except OSError as e:
        fail(open_error(mountpoint, e))
    click.echo(text, nl=False)
