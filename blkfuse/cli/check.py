"""`blkfuse check [--qemu] [PATH] [-o KEY=VALUE,...]`: validate rules without mounting anything."""

import collections
import sys
from typing import Any

import click

from blkfuse.rules import options as option_table
from blkfuse.rules.config import (
    ConfigError,
    Note,
    arming_warning,
    format_rule,
    load_rules,
    parse_option_string,
    parse_options,
    rule_notes,
)
from blkfuse.rules.model import Rule, Settings
from blkfuse.rules.profiles import profile, profile_notes


@click.command(
    name="check",
    epilog="""\b
Examples:
  blkfuse check rules.conf
  blkfuse check -o inject-error.0.event=read_aio,inject-error.0.errno=28,align=4096
  blkfuse check rules.conf -o max-transfer=64k""",
)
@click.argument("path", type=click.Path(dir_okay=False), required=False)
@click.option(
    "-o",
    "--options",
    "option_strings",
    multiple=True,
    metavar="KEY=VALUE,...",
    help="blkdebug options, as for mount (inject-error.0.event=read_aio,align=4096).",
)
@click.option(
    "--qemu",
    is_flag=True,
    help="Fail (exit 1) naming every key and value QEMU's blkdebug would reject (the QEMU "
    "of -o qemu=7.2|10.0, default 7.2).",
)
def command(path: str | None, option_strings: tuple[str, ...], qemu: bool) -> None:
    """Check the blkdebug config file PATH and/or -o options; print each rule with its source.

    Notes mark rules that never fire through a mount and set-state rules without new_state;
    options that are not blkdebug's are marked not portable. Exits 1 with the first error
    (file:line or option key) on stderr. blkfuse's extension keys are accepted and marked;
    with --qemu they are errors, all of them listed.
    """
    notes: list[Note] = []
    if path is None and not option_strings:
        click.echo(
            "blkfuse check: give a config file PATH, -o options, or both (blkfuse check --help)",
            err=True,
        )
        sys.exit(1)
    try:
        options: dict[str, str] = {}
        for option_string in option_strings:
            options.update(parse_option_string(option_string))
        _, settings = parse_options(options)
        if path is not None:
            settings.config_path = path  # PATH is the config file, whatever -o says
        rules = load_rules(settings, notes)
    except ConfigError as error:
        click.echo(f"blkfuse check: {error}", err=True)
        sys.exit(1)
    name = path or settings.config_path or "options"
    # qemu= names the QEMU to check against (profiles.py): no rule's option, so not flagged
    extension_options = [key for key in options if key in option_table.EXTENSION_OPTIONS]
    qemu_name = f"QEMU {settings.qemu}"
    if qemu:
        problems = [f"{note.where}: {note.text}" for note in notes]
        problems += [
            f'option {key}: "{key}" is a blkfuse extension option' for key in extension_options
        ]
        if problems:
            for problem in problems:
                click.echo(f"blkfuse check: {problem}", err=True)
            click.echo(
                f"blkfuse check: {name}: {qemu_name} would reject {len(problems)} "
                f"key{'s' if len(problems) != 1 else ''} or value"
                f"{'s' if len(problems) != 1 else ''} (listed above)",
                err=True,
            )
            sys.exit(1)
    marked = collections.defaultdict(list)
    for note in notes:
        marked[id(note.rule)].append(note.label)
    for rule in rules:
        mark = ""
        if id(rule) in marked:
            mark = f"  (not portable: {', '.join(marked[id(rule)])}: {qemu_name} rejects it)"
        click.echo(f"{rule.source}: {format_rule(rule)}{rule_notes(rule)}{mark}")
    warning = arming_warning(_by_event(rules))
    if warning:
        click.echo(warning)
    for line in profile_notes(profile(settings.qemu), rules, settings.cache):
        click.echo(f"note: {line}")
    click.echo(_summary(name, rules, settings, notes))


def _by_event(rules: list[Rule]) -> dict[str, list[Rule]]:
    by_event: dict[str, list[Rule]] = {}
    for rule in rules:
        by_event.setdefault(rule.event, []).append(rule)
    return by_event


def _summary(path: str, rules: list[Rule], settings: Settings, notes: list[Any]) -> str:
    kinds = collections.Counter(rule.kind for rule in rules)
    noun = "rule" if len(rules) == 1 else "rules"
    parts = [f"{path}: OK, {len(rules)} {noun}"]
    if rules:
        parts[0] += " (" + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + ")"
    # Options QEMU's blkdebug rejects say what does the same in QEMU, if anything.
    parts += option_table.summary(settings)
    if notes:
        parts.append(
            f"{len(notes)} blkfuse extension{'s' if len(notes) != 1 else ''} in the "
            "rules (QEMU would reject them; check --qemu lists them)"
        )
    return ", ".join(parts)
