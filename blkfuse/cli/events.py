"""`blkfuse events`: the event names rules and breakpoints can use, and the io types."""

import click

from blkfuse.rules.events import (
    DEFAULT_IOTYPES,
    EVENT_ALIASES,
    EVENTS,
    IOTYPES,
    REACHABLE_EVENTS,
    REACHED_BY,
)


@click.command(
    "events",
    epilog="""\b
Examples:
  blkfuse events
  blkfuse events --reachable""",
)
@click.option(
    "--reachable", is_flag=True, help="Only the events a request through the mount raises."
)
def command(reachable: bool) -> None:
    """List blkdebug's event names and io types.

    Events marked * are raised by requests through a mount; the others are accepted (so that
    configs written for qcow2 images stay valid) but never fire.
    """
    click.echo("events (* = raised through the mount):")
    for name in EVENTS:
        if reachable and name not in REACHABLE_EVENTS:
            continue
        mark = "*" if name in REACHABLE_EVENTS else " "
        aliases = [a for a, n in EVENT_ALIASES.items() if n == name]
        extra = f"  (also {', '.join(aliases)})" if aliases else ""
        click.echo(f"  {mark} {name}{extra}")
    click.echo("io types (default: all but block-status), and the calls that reach them:")
    for t in IOTYPES:
        reach = f"  {REACHED_BY[t]}" if t in REACHED_BY else "  (never reached through the mount)"
        note = "" if t in DEFAULT_IOTYPES else "  (not in the default set)"
        click.echo(f"    {t:<13}{reach}{note}")
