"""One table per vocabulary (rules/keys.py, rules/options.py, the control command table): every
rule key and every option reaches every place that reads, shows or lists it. A key or option
added to a table but missing from a place fails here."""

import re
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from blkfuse.cli import main as cli_main
from blkfuse.daemon.control import COMMANDS, Control, help_text
from blkfuse.engine.core import Engine
from blkfuse.rules import keys, options
from blkfuse.rules.config import (
    ConfigError,
    format_config,
    format_rule,
    load_rules,
    parse_config_text,
    parse_options,
    parse_rule_args,
)
from blkfuse.rules.model import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
TRACKED = Settings(track_unsynced=True)


def example_words(spec: keys.KeySpec) -> list[str]:
    words = spec.example.split()
    assert f"{spec.name}=" in spec.example, f"{spec.name}: its example does not set it"
    return words if spec.name == "event" else ["event=none", *words]


def cases():
    return [
        pytest.param(kind, spec, id=f"{kind}:{spec.name}")
        for spec in keys.KEYS
        for kind in spec.kinds
    ]


@pytest.mark.parametrize("kind, spec", cases())
def test_every_key_round_trips_through_every_spelling_the_status_and_help(kind, spec):
    words = example_words(spec)
    rule = parse_rule_args(kind, words)
    value = keys.value_of(rule, spec)
    assert value != spec.default, f"{spec.name}: the example leaves it at its default"

    # formatted (status text, check): shown, and read back to the same value
    text = format_rule(rule)
    assert f" {spec.name}=" in f" {text}"
    again = parse_rule_args(kind, text.split()[1:])
    assert keys.value_of(again, spec) == value

    # the config file and -o spellings
    (from_file,) = parse_config_text(format_config([rule]), "t.conf")
    assert keys.value_of(from_file, spec) == value
    pairs = dict(word.split("=", 1) for word in words)
    option_rules, _ = parse_options({f"{kind}.0.{k}": v for k, v in pairs.items()})
    assert keys.value_of(option_rules[0], spec) == value

    # the status JSON: every key of the rule, and whether it is an extension
    engine = Engine([])
    control = Control(engine, settings=TRACKED)
    answer = trio.run(control.execute, f"{kind} {' '.join(words)}")
    assert answer.startswith("added rule")
    (shown,) = control.status_dict()["rules"]
    assert shown[spec.field] == spec.json(value)
    extension_words = [w for w in words if not keys.BY_NAME[w.split("=")[0]].qemu]
    assert shown["extension"] == bool(extension_words)
    assert all(s.field in shown for s in keys.KEYS if kind in s.kinds)

    # listed: the control help, mount --help, the README
    assert re.search(rf"^\s+\*? {re.escape(spec.name)}=", help_text(), re.M)
    assert f" {spec.name}=" in mount_help()
    assert f"`{spec.name}=" in README


@pytest.mark.parametrize("spec", options.OPTIONS, ids=lambda spec: spec.name)
def test_every_option_is_read_checked_and_listed(spec):
    given = {spec.name: spec.example}
    if spec.needs:
        given[spec.needs] = "on"
    _, settings = parse_options(given)
    value = getattr(settings, spec.field)
    assert value == spec.parse(spec.name, spec.example, Settings(**_needed(spec)))
    assert value != getattr(Settings(), spec.field)
    summary = options.summary(settings)
    if spec.shown:
        (part,) = [p for p in summary if p.startswith(f"{spec.name}=")]
        assert ("not portable" in part) == (not spec.qemu and not spec.about)
    assert f" {spec.name}=" in mount_help()
    assert f"`{spec.name}=" in README


def _needed(spec):
    return {options.BY_NAME[spec.needs].field: True} if spec.needs else {}


def test_the_readme_tables_are_the_generated_ones():
    for name, table in (("rule keys", keys.markdown()), ("options", options.markdown())):
        begin, end = f"<!-- {name}: begin -->\n", f"<!-- {name}: end -->"
        assert begin in README and end in README, f"README lacks the {name} table markers"
        block = README.split(begin)[1].split(end)[0]
        assert block == table, (
            f"README's {name} table is stale: replace it with "
            f"blkfuse.rules.{'keys' if name == 'rule keys' else 'options'}.markdown()"
        )


def test_a_key_needs_only_options_of_the_table():
    for spec in keys.KEYS:
        assert not spec.needs or spec.needs in options.BY_NAME, spec.name
    for spec in options.OPTIONS:
        assert not spec.needs or spec.needs in options.BY_NAME, spec.name


def test_a_key_that_needs_an_option_is_refused_without_it_everywhere():
    from blkfuse.daemon.control import ControlError

    for spec in (s for s in keys.KEYS if s.needs):
        words = example_words(spec)
        pairs = dict(word.split("=", 1) for word in words)
        message = f"{spec.name} needs the option {spec.needs}=on"
        with pytest.raises(ConfigError, match=message):
            load_rules(parse_options({f"inject-error.0.{k}": v for k, v in pairs.items()})[1])
        control = Control(Engine([]))  # a mount without the option
        with pytest.raises(ControlError, match=message):
            trio.run(control.execute, f"inject-error {' '.join(words)}")


def test_every_command_is_in_the_help():
    text = help_text()
    for entry in COMMANDS.values():
        assert f"  {entry.usage}" in text


_MOUNT_HELP: list[str] = []


def mount_help() -> str:
    if not _MOUNT_HELP:
        result = CliRunner().invoke(cli_main, ["mount", "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        _MOUNT_HELP.append(result.output)
    return _MOUNT_HELP[0]
