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
    help="Machine-readable status, every rule in it (needs the right to write control).",
)
@click.option(
    "--all",
    "all_rules",
    is_flag=True,
    help="List every rule in the text, not only the first ones (needs the right to write control).",
)
def command(mountpoint: str, as_json: bool, all_rules: bool) -> None:
    """Show the state, rules, breakpoints, suspended requests and counters of a mount.

    The text lists the first rules and says how many more there are (--all: every rule);
    --json lists every rule.
    """
    fast.status(mountpoint, as_json, all_rules)  # the plain form runs there without click
