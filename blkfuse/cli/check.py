"""`blkfuse check PATH [-o KEY=VALUE,...]`: validate rules without mounting anything."""

import collections
import sys

import click

from ..config import ConfigError, format_rule, load_rules, parse_option_string, parse_options
from ..events import REACHABLE_EVENTS
from ..rules import Rule, Settings


@click.command(name="check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("-o", "--options", "option_strings", multiple=True, metavar="KEY=VALUE,...",
              help="blkdebug options, as for mount (inject-error.0.event=read_aio,align=4096).")
def command(path: str, option_strings: tuple[str, ...]) -> None:
    """Check the blkdebug config file PATH (and options); print each rule with its source.

    Exits 1 with the first error (file:line or option key) on stderr.
    """
    try:
        options: dict[str, str] = {}
        for option_string in option_strings:
            options.update(parse_option_string(option_string))
        _, settings = parse_options(options)
        settings.config_path = path          # PATH is the config file, whatever -o says
        rules = load_rules(settings)
    except ConfigError as error:
        click.echo(f"blkfuse check: {error}", err=True)
        sys.exit(1)
    for rule in rules:
        click.echo(f"{rule.source}: {format_rule(rule)}{_reachability_note(rule)}"
                   f"{_power_note(rule)}")
    click.echo(_summary(path, rules, settings))


def _reachability_note(rule: Rule) -> str:
    # qcow2 events are accepted so configs stay portable, but a raw file never raises them.
    if rule.event in REACHABLE_EVENTS:
        return ""
    return "  (never fires through a blkfuse mount)"


def _power_note(rule: Rule) -> str:
    # issue 10's keys: QEMU's blkdebug rejects them
    used = [key for key, on in (("torn", getattr(rule, "torn", -1) >= 0),
                                ("drop-unsynced", getattr(rule, "drop_unsynced", False))) if on]
    if not used:
        return ""
    return f"  (not portable: {', '.join(used)}: blkfuse extension, QEMU rejects it)"


def _summary(path: str, rules: list[Rule], settings: Settings) -> str:
    kinds = collections.Counter(rule.kind for rule in rules)
    noun = "rule" if len(rules) == 1 else "rules"
    parts = [f"{path}: OK, {len(rules)} {noun}"]
    if rules:
        parts[0] += " (" + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + ")"
    for key in ("align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
                "max-discard"):
        value = getattr(settings, key.replace("-", "_"))
        if value:
            parts.append(f"{key}={value}")
    # Not blkdebug options: qemu-io's -t MODE and --image-opts driver=blkdebug say these.
    if settings.cache != "writeback":
        parts.append(f"cache={settings.cache} (not portable: qemu-io -t {settings.cache})")
    if settings.format != "raw":
        parts.append("format=none (not portable: qemu-io --image-opts driver=blkdebug,...)")
    if settings.track_unsynced:
        power = ["track-unsynced=on"]
        power += [f"unsynced-cap={settings.unsynced_cap}"] if settings.unsynced_cap else []
        power += [f"atomic={settings.atomic}"] if settings.atomic else []
        parts.append(" ".join(power) + " (not portable: blkfuse extension options)")
    return ", ".join(parts)
