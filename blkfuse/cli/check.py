"""`blkfuse check [PATH] [-o KEY=VALUE,...]`: validate rules without mounting anything."""

import collections
import sys

import click

from ..config import (MOUNT_OPTIONS, ConfigError, format_rule, load_rules,
                      parse_option_string, parse_options, rule_notes)


@click.command(name="check", epilog="""\b
Examples:
  blkfuse check rules.conf
  blkfuse check -o inject-error.0.event=read_aio,inject-error.0.errno=28,align=4096
  blkfuse check rules.conf -o max-transfer=64k""")
@click.argument("path", type=click.Path(dir_okay=False), required=False)
@click.option("-o", "--options", "option_strings", multiple=True, metavar="KEY=VALUE,...",
              help="blkdebug options, as for mount (inject-error.0.event=read_aio,align=4096).")
def command(path, option_strings):
    """Check the blkdebug config file PATH and/or -o options; print each rule with its source.

    Notes mark rules that never fire through a mount and set-state rules without new_state;
    options that are not blkdebug's are marked not portable. Exits 1 with the first error
    (file:line or option key) on stderr.
    """
    if path is None and not option_strings:
        click.echo("blkfuse check: give a config file PATH, -o options, or both "
                   "(blkfuse check --help)", err=True)
        sys.exit(1)
    try:
        options = {}
        for option_string in option_strings:
            options.update(parse_option_string(option_string))
        _, settings = parse_options(options)
        if path is not None:
            settings.config_path = path      # PATH is the config file, whatever -o says
        rules = load_rules(settings)
    except ConfigError as error:
        click.echo(f"blkfuse check: {error}", err=True)
        sys.exit(1)
    for rule in rules:
        click.echo(f"{rule.source}: {format_rule(rule)}{rule_notes(rule)}{_power_note(rule)}")
    click.echo(_summary(path or settings.config_path or "options", rules, settings))


def _power_note(rule) -> str:
    # issue 10's keys: QEMU's blkdebug rejects them
    used = [key for key, on in (("torn", getattr(rule, "torn", -1) >= 0),
                                ("drop-unsynced", getattr(rule, "drop_unsynced", False))) if on]
    if not used:
        return ""
    return f"  (not portable: {', '.join(used)}: blkfuse extension, QEMU rejects it)"


def _summary(path, rules, settings) -> str:
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
    # blkfuse's own mount options: no QEMU command line has them.
    for key in MOUNT_OPTIONS:
        if key not in settings.options:
            continue
        parts.append(f"{key}={settings.options[key] or 'on'} (not portable: a blkfuse mount "
                     "option)")
    if settings.track_unsynced:
        power = ["track-unsynced=on"]
        power += [f"unsynced-cap={settings.unsynced_cap}"] if settings.unsynced_cap else []
        power += [f"atomic={settings.atomic}"] if settings.atomic else []
        parts.append(" ".join(power) + " (not portable: blkfuse extension options)")
    # blkfuse's own tuning: how the daemon waits and reads, never what a request sees.
    for key in ("io-threads", "poll-us"):
        value = getattr(settings, key.replace("-", "_"))
        if value is not None:
            parts.append(f"{key}={value} (not portable: blkfuse's own tuning)")
    return ", ".join(parts)
