"""`blkfuse status MNT [--json]`: what the mount is doing."""

import json

import click

from ._common import ControlError, _open_error, fail, read_status, send


@click.command("status", epilog="""\b
Examples:
  blkfuse status /mnt/faulty
  blkfuse status --json /mnt/faulty | jq '.rules[] | {id, hits, spent}'""")
@click.argument("mountpoint")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable status (needs the right to write control).")
def command(mountpoint, as_json):
    """Show the state, rules, breakpoints, suspended requests and counters of a mount."""
    if as_json:
        try:
            text = send(mountpoint, "status json")
        except ControlError as e:
            fail(e.message)
        click.echo(json.dumps(json.loads(text), indent=2))
        return
    try:
        text = read_status(mountpoint)
    except OSError as e:
        fail(_open_error(mountpoint, e))
    click.echo(text, nl=False)
