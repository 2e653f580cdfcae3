"""`blkfuse status MNT [--json]`: what the mount is doing."""

import click

from blkfuse.cli import fast


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
    fast.status(mountpoint, as_json)  # the plain form of this command runs there without click
