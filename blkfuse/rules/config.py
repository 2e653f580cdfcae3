"""Rules from every place a QEMU user would write them, parsed the way QEMU 7.2 parses them.

Four spellings lead to the same rule objects (rules.py):

- the blkdebug config file (QEMU's qemu_config_parse format):
      [inject-error]
      event = "read_aio"
      errno = "28"
- blockdev-style options: ``inject-error.0.event=read_aio,inject-error.0.errno=28,align=4096``
- the filename form ``blkdebug:RULES:IMAGE``
- the control file's ``inject-error event=read_aio errno=ENOSPC`` words

Every error is a ConfigError whose text says where (``rules.conf:3:``, ``option
inject-error.0.evnt:``, ``control:``), what is wrong and, for a misspelt name, the closest
valid one. What QEMU accepts we accept, with these deliberate differences (docs/reference.md,
"Known differences from QEMU"):
a negative errno or sector is an error (QEMU wraps "-5" to a negative errno that silently
skips the I/O, and "-1" to "any sector"); errno may be a name ("ENOSPC"); errno is at most
511 (the largest error a FUSE reply can carry); pre-2015 dotted event names still work;
whitespace-only and indented-comment lines are allowed; text after a value's closing quote
is an error (QEMU ignores it, which hides typos); option values may be quoted; align and
max-transfer must be positive (QEMU reads 0 as "not set").
"""

import errno as errno_module
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, NoReturn

from blkfuse.rules import keys, options as options_module
from blkfuse.rules.events import canonical_event, never_fires_note
from blkfuse.rules.keys import EXTENSION_KEYS, QEMU_KEYS, SECTION_KEYS
from blkfuse.rules.model import Extensions, InjectError, Rule, SetState, Settings
from blkfuse.rules.options import EXTENSION_OPTIONS
from blkfuse.rules.values import MAX_ERRNO, Invalid, InvalidEvent, did_you_mean, format_duration

__all__ = [
    "ConfigError",
    "UnknownEvent",
    "parse_config_text",
    "parse_config_file",
    "parse_options",
    "parse_option_string",
    "parse_filename",
    "parse_rule_args",
    "load_rules",
    "format_rule",
    "format_config",
    "rule_notes",
    "format_duration",
    "arming_warning",
    "Note",
    "QEMU_KEYS",
    "EXTENSION_KEYS",
    "EXTENSION_OPTIONS",
    "MAX_ERRNO",
    "did_you_mean",
]


class ConfigError(ValueError):
    """A config, option or control rule that cannot be used; str() is the whole message."""


class UnknownEvent(ConfigError):
    """A rule names an event that does not exist: the control file answers ENOENT for it, as
    qemu-io's `break` does for an unknown event (every other bad rule is EINVAL)."""


# The rule keys are rules/keys.py's table, the options rules/options.py's: both vocabularies
# are defined there, once; this module reads the four spellings with them.
_RULE_CLASSES = {"inject-error": InjectError, "set-state": SetState}
# blkfuse's own mount options (blkfuse check marks them).
MOUNT_OPTIONS = tuple(
    spec.name for spec in options_module.OPTIONS if spec.note == "a blkfuse mount option"
)


# --- rules from key/value entries --------------------------------------------------------


def _check_key(kind: str, key: str, where: str) -> None:
    """Refuse a key that `kind` rules do not have, naming the right section if it is there."""
    if key in SECTION_KEYS[kind]:
        return
    for other, other_keys in SECTION_KEYS.items():
        if other != kind and key in other_keys:
            raise ConfigError(f'{where}: "{key}" is a key of {other} rules, not of {kind} rules')
    raise ConfigError(f'{where}: unknown {kind} key "{key}"{did_you_mean(key, SECTION_KEYS[kind])}')


class Note(NamedTuple):
    """A spelling QEMU 7.2 would reject, for `blkfuse check`."""

    rule: Rule
    where: str  # rules.conf:7, option inject-error.0.delay
    label: str  # what to mark the rule with: delay, errno name ENOSPC
    text: str  # the whole sentence


def _build_rule(
    kind: str, entries: dict, where: str, origin: str, line: int = 0, notes: list | None = None
) -> Rule:
    """A rule from {key: (text, where-the-key-was)}; keys were checked as they were read.

    `notes`, if given, receives a Note for every key or value QEMU 7.2 would reject.
    """
    if "event" not in entries:
        raise ConfigError(f'{where}: {kind} rule has no event (every rule needs one)')
    fields: dict[str, Any] = {}  # keyword arguments of the rule's class
    extensions: dict[str, Any] = {}  # keyword arguments of Extensions
    for key, (text, key_where) in entries.items():
        spec = keys.BY_NAME[key]
        target = extensions if spec.on_ext else fields
        try:
            target[spec.field] = spec.parse(key, text)
        except Invalid as error:
            kind_of_error = UnknownEvent if isinstance(error, InvalidEvent) else ConfigError
            raise kind_of_error(f"{key_where}: {error}") from None
    if extensions:
        ext = _checked_extensions(Extensions(**extensions), fields, entries, where)
        fields["ext"] = _SHARED_EXTENSIONS.setdefault(ext, ext)
    rule = _RULE_CLASSES[kind](origin=origin, line=line, **fields)
    if notes is not None:
        notes.extend(Note(rule, *spelling) for spelling in _non_qemu_spellings(kind, entries))
    return rule


# Rules spelt alike share one (immutable) Extensions: 100,000 bad ranges of one length hold
# one, not 100,000.
_SHARED_EXTENSIONS: dict = {}


def _checked_extensions(ext: Extensions, fields: dict, entries: dict, where: str) -> Extensions:
    """Refuse extension keys that contradict each other; fill in what they imply."""

    def refuse(message: str) -> NoReturn:
        raise ConfigError(f"{where}: {message}")

    sector_given = "sector" in entries
    if "sectors" in entries and not sector_given:
        refuse('sectors needs sector (the first sector of the range)')
    if ext.heal and not sector_given:
        refuse('heal needs sector: it models bad sectors that a write repairs')
    if "corrupt-bytes" in entries and not ext.corrupt:
        refuse('corrupt-bytes needs corrupt (flip, zero or random)')
    if "powercut-save" in entries and not ext.powercut:
        refuse("powercut-save needs powercut (none, random or prefix)")
    if ext.powercut:
        for other in ("torn", "drop-unsynced", "corrupt"):
            if other in entries:
                refuse(f"powercut and {other} cannot be combined: the cut ends the request")
        if "errno" in entries and fields["errno"] != errno_module.EIO:
            refuse("powercut fails the request with EIO (the power is off): leave errno out")
    if "count" in entries and fields.get("once"):
        refuse('once and count both limit the rule: once = "on" is count = "1"; use one')
    if "errno" in entries:
        if ext.corrupt and fields["errno"]:
            refuse(
                'corrupt lets the request succeed with changed data: errno must be 0 '
                'or absent (write a second rule to fail requests)'
            )
    elif (ext.corrupt or ext.delay_us or ext.jitter_us) and not ext.powercut:
        fields["errno"] = 0  # a delay or a corruption alone does not fail the request
    return ext


def _non_qemu_spellings(kind: str, entries: dict) -> Iterator[tuple[str, str, str]]:
    """(where, label, why) for each key or value of a rule that QEMU 7.2 would refuse."""
    for key, (text, key_where) in entries.items():
        if key in EXTENSION_KEYS[kind]:
            yield key_where, key, f'"{key}" is a blkfuse extension key'
        elif key == "errno" and text.strip()[:1].isalpha():
            yield (
                key_where,
                f"errno name {text.strip()}",
                f'errno "{text}" is a name (QEMU takes numbers only)',
            )
        elif key == "event" and "." in text:
            yield (
                key_where,
                f"event {text}",
                f'event "{text}" is a pre-2015 spelling '
                f'(QEMU 7.2 spells it "{canonical_event(text)}")',
            )


def _check_kind(kind: str, where: str, noun: str = "section") -> None:
    if kind not in SECTION_KEYS:
        raise ConfigError(f'{where}: unknown {noun} "{kind}"{did_you_mean(kind, SECTION_KEYS)}')


# --- the config file ---------------------------------------------------------------------

# "[inject-error]" or QEMU's '[inject-error "ID"]'.
_HEADER = re.compile(r'\[([^\]\s"]+)(?:[ \t]+"([^"]*)")?\]\Z')
# key, whitespace, "=", a double-quoted value. The whitespace before "=" is not optional in
# QEMU (sscanf's %s swallows 'event="x"' whole), so it is not here either.
_ASSIGNMENT = re.compile(r'([^\s"]+)[ \t]+=[ \t]*"([^"]*)"(.*)\Z')
# QemuOpts ids (id_wellformed): a letter, then letters, digits, '-', '.', '_'.
_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


class _Section:
    """A section being read: its kind, where it started, its entries so far."""

    __slots__ = ("kind", "where", "line", "entries")

    def __init__(self, kind: str, where: str, line: int = 0):
        self.kind = kind
        self.where = where
        self.line = line
        self.entries: dict[str, tuple[str, str]] = {}  # key -> (value, where)


def _explain_bad_line(line: str) -> str:
    """Why a line that is neither header, comment nor key = "value" is wrong."""
    key, equals, value = line.partition("=")
    if not equals:
        return 'expected key = "value", a [section] or a # comment'
    key, value = key.strip(), value.strip()
    if not key:
        return 'missing key before "="'
    if not line.partition("=")[0][-1:].isspace():
        return f'put a space before "=" (QEMU reads "{key}=" as the key): {key} = {value}'
    if not value.startswith('"'):
        return f'the value must be in double quotes: {key} = "{value}"'
    if value.count('"') < 2:
        return "missing closing double quote"
    return "values cannot contain double quotes"


def _read_assignment(line: str, where: str) -> tuple[str, str]:
    match = _ASSIGNMENT.match(line)
    if match is None:
        raise ConfigError(f"{where}: {_explain_bad_line(line)}")
    key, value, rest = match.groups()
    if rest.strip():
        raise ConfigError(f'{where}: unexpected text after the closing quote: "{rest.strip()}"')
    return key, value


class _IdRegistry:
    """QEMU gives each section an optional id and refuses two equal ids of one kind."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def claim(self, kind: str, entries: dict) -> None:
        if "id" not in entries:
            return
        text, where = entries.pop("id")
        if not _ID.match(text):
            raise ConfigError(
                f'{where}: id "{text}" must start with a letter and hold only '
                "letters, digits, '-', '.' and '_'"
            )
        if (kind, text) in self.seen:
            raise ConfigError(f'{where}: duplicate id "{text}" for {kind}')
        self.seen.add((kind, text))


def parse_config_text(
    text: str, filename: str = "<config>", notes: list | None = None
) -> list[Rule]:
    """The rules of a blkdebug config file, in file order (`notes`: see _build_rule)."""
    rules = []
    ids = _IdRegistry()
    section = None

    def finish(section: _Section) -> None:
        ids.claim(section.kind, section.entries)
        rules.append(
            _build_rule(section.kind, section.entries, section.where, filename, section.line, notes)
        )

    # split("\n"), not splitlines(): line numbers must count what an editor counts.
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped[0] == "#":
            continue
        where = f"{filename}:{lineno}"
        if stripped[0] == "[":
            if section is not None:
                finish(section)
            section = _start_section(stripped, where)
            section.line = lineno
            continue
        key, value = _read_assignment(stripped, where)
        if section is None:
            raise ConfigError(
                f"{where}: {key} is outside any section (start with [inject-error] or [set-state])"
            )
        if key != "id":
            _check_key(section.kind, key, where)
        # A repeated key: QEMU keeps the later value (and never looks at the earlier one).
        section.entries.pop(key, None)
        section.entries[key] = (value, where)
    if section is not None:
        finish(section)
    return rules


def _start_section(header: str, where: str) -> _Section:
    match = _HEADER.match(header)
    if match is None:
        raise ConfigError(
            f"{where}: malformed section header {header!r} (expected [inject-error] or [set-state])"
        )
    kind, section_id = match.groups()
    _check_kind(kind, where)
    section = _Section(kind, where)
    if section_id is not None:
        section.entries["id"] = (section_id, where)
    return section


def parse_config_file(path: str, notes: list | None = None) -> list[Rule]:
    """The rules of the config file at `path`; an unreadable file is a ConfigError too."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file: {error.strerror}") from None
    # QEMU reads bytes; a stray non-UTF-8 byte can only sit in a value that is then refused.
    return parse_config_text(data.decode("utf-8", errors="replace"), path, notes)


# --- blockdev-style options --------------------------------------------------------------

_INDEX = re.compile(r"(?:0|[1-9][0-9]*)\Z")
_unquote_option = options_module.unquote


def _split_rule_option(key: str) -> tuple[str, str | None, str]:
    """'inject-error.3.errno' -> ('inject-error', '3', 'errno'); no index -> None."""
    kind, _, rest = key.partition(".")
    index, dot, subkey = rest.partition(".")
    if not dot and index and not _INDEX.match(index):
        return kind, None, index
    if not subkey:
        raise ConfigError(f"option {key}: which key? (like {kind}.0.event=read_aio)")
    if not _INDEX.match(index):
        raise ConfigError(
            f'option {key}: "{index}" is not a rule number (write {kind}.0.KEY, {kind}.1.KEY, ...)'
        )
    return kind, index, subkey


def _unknown_option(key: str) -> ConfigError:
    head = key.partition(".")[0]
    names = tuple(options_module.BY_NAME) + tuple(SECTION_KEYS)
    return ConfigError(f'option {key}: unknown option "{head}"{did_you_mean(head, names)}')


def _collect_rule_options(options: dict) -> dict:
    """{kind: {index or None: {subkey: (text, where)}}}, every key checked."""
    groups: dict[str, dict[str | None, dict[str, tuple[str, str]]]] = {
        kind: {} for kind in SECTION_KEYS
    }
    for key, value in options.items():
        if key in options_module.BY_NAME:
            continue
        if key.partition(".")[0] not in SECTION_KEYS:
            raise _unknown_option(key)
        kind, index, subkey = _split_rule_option(key)
        where = f"option {key}"
        _check_key(kind, subkey, where)
        groups[kind].setdefault(index, {})[subkey] = (_unquote_option(value), where)
    return groups


def _ordered_rule_groups(kind: str, by_index: dict) -> list[tuple[str, dict]]:
    """(name, entries) per rule of `kind`, by number; QEMU wants 0, 1, 2... without gaps."""
    if None in by_index:
        if len(by_index) > 1:
            raise ConfigError(
                f"option {kind}: use either {kind}.KEY (one rule) or "
                f"{kind}.N.KEY (numbered rules), not both"
            )
        return [(kind, by_index[None])]
    numbers = sorted(int(index) for index in by_index)
    for expected, number in enumerate(numbers):
        if number != expected:
            first_key = next(iter(by_index[str(number)].values()))[1]
            raise ConfigError(
                f"{first_key}: rules are numbered from 0 without gaps, "
                f"and {kind}.{expected} is missing"
            )
    return [(f"{kind}.{n}", by_index[str(n)]) for n in numbers]


def parse_options(
    options: dict[str, str], notes: list | None = None
) -> tuple[list[Rule], Settings]:
    """Rules and settings from blockdev-style options; rules by kind, then number."""
    options = dict(options)
    rules = []
    for kind, by_index in _collect_rule_options(options).items():
        for name, entries in _ordered_rule_groups(kind, by_index):
            rules.append(_build_rule(kind, entries, f"option {name}", f"-o {name}", notes=notes))
    settings = Settings(options=options)
    try:
        options_module.read_options(options, settings)
    except Invalid as error:
        raise ConfigError(str(error)) from None
    return rules, settings


def check_rule_needs(rules: Sequence[Rule], settings: Settings, where: str = "") -> None:
    """A key that needs a mount option (drop-unsynced: track-unsynced=on, to revert through
    the undo log) is refused without it. `where` replaces the rules' own sources."""
    for rule in rules:
        for spec in keys.rule_specs(rule):
            if not spec.needs or keys.value_of(rule, spec) == spec.default:
                continue
            if getattr(settings, options_module.BY_NAME[spec.needs].field):
                continue
            raise ConfigError(
                f"{where or rule.source or 'rule'}: {spec.name} needs the option "
                f"{spec.needs}=on (-o {spec.needs}=on)"
            )


def parse_option_string(s: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}; as in QEMU, ',,' is a comma inside a value."""
    options: dict[str, str] = {}
    if not s:
        return options
    for item in _split_on_single_commas(s):
        key, equals, value = item.partition("=")
        if not item:
            raise ConfigError(f'option string "{s}": empty option (stray comma?)')
        if not equals and key in options_module.FLAG_OPTIONS:
            equals, value = "=", "on"
        if not equals or not key:
            raise ConfigError(f'option "{item}": expected KEY=VALUE')
        options[key] = value
    return options


def _split_on_single_commas(s: str) -> list[str]:
    items, current, i = [], [], 0
    while i < len(s):
        if s[i] == ",":
            if s[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(s[i])
        i += 1
    items.append("".join(current))
    return items


def parse_filename(spec: str) -> tuple[str | None, str]:
    """'blkdebug:RULES:IMAGE' -> (RULES or None when empty, IMAGE); anything else is an image.

    As QEMU, RULES ends at the first colon after the prefix: the image path may hold colons,
    the rules path cannot.
    """
    prefix = "blkdebug:"
    if not spec.startswith(prefix):
        return None, spec
    rules, colon, image = spec[len(prefix) :].partition(":")
    if not colon:
        raise ConfigError(
            f'"{spec}": blkdebug needs both a rules path and an image path: '
            "blkdebug:RULES:IMAGE (RULES may be empty)"
        )
    if not image:
        raise ConfigError(f'"{spec}": the image path after blkdebug:RULES: is empty')
    return (rules or None), image


# --- the control file ----------------------------------------------------------------------


def _unquote_word(text: str, where: str) -> str:
    if not text.startswith('"'):
        return text
    if len(text) < 2 or not text.endswith('"') or '"' in text[1:-1]:
        raise ConfigError(f'{where}: badly quoted value {text}')
    return text[1:-1]


def parse_rule_args(kind: str, pairs: list[str], source: str = "control") -> Rule:
    """A rule from control-file words: parse_rule_args("inject-error", ["event=read_aio"])."""
    _check_kind(kind, source, noun="rule kind")
    entries: dict[str, tuple[str, str]] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ConfigError(f'{source}: expected KEY=VALUE, not "{pair}"')
        _check_key(kind, key, source)
        entries.pop(key, None)  # a repeated key: the later value wins, as in files
        entries[key] = (_unquote_word(value, source), source)
    return _build_rule(kind, entries, source, source)


# --- everything together, and back to text ---------------------------------------------------


def load_rules(settings: Settings, notes: list | None = None) -> list[Rule]:
    """The config file's rules, then the options' rules (QEMU's order): what mount and reload use."""
    rules = parse_config_file(settings.config_path, notes) if settings.config_path else []
    option_rules, _ = parse_options(settings.options, notes)
    check_rule_needs(rules + option_rules, settings)
    return rules + option_rules


def _rule_items(rule: Rule) -> list[tuple[str, str]]:
    """The rule's keys and values, defaults left out except errno and new_state (the point)."""
    return keys.rule_items(rule)


def arming_warning(rules_by_event: dict) -> str | None:
    """Warn when rules armed by `none` would be disarmed by the first other event that arms
    rules: QEMU keeps one active set, replaced whole (README). None when nothing is at risk.

    `rules_by_event`: event -> its rules, as the engine keeps them.
    """
    at_mount = next(
        (
            rule
            for rule in rules_by_event.get("none", ())
            if type(rule) is InjectError and (rule.ext is None or not rule.ext.persistent)
        ),
        None,
    )
    if at_mount is None:
        return None
    for event, rules in rules_by_event.items():
        if event == "none":
            continue
        later = next((rule for rule in rules if type(rule) is InjectError), None)
        if later is not None:
            return (
                f"warning: rule {_rule_name(at_mount)} is armed by none and disarmed as soon "
                f"as {event} arms rule {_rule_name(later)} (one active set, replaced "
                f'whole, as in QEMU); add persistent = "on" to keep it armed'
            )
    return None


def _rule_name(rule: Rule) -> str:
    return f"{rule.id} ({rule.source})" if rule.id else rule.source


def rule_notes(rule: Rule) -> str:
    """What `blkfuse check` and the control answers add to a valid rule that is surely not what
    was meant: an event no request through a mount raises, a set-state without new_state (QEMU
    reads it as 0, silently). '' for a plain rule."""
    notes = never_fires_note(rule.event)
    if isinstance(rule, SetState) and rule.new_state == 0:
        notes += (
            " (warning: new_state is 0, what a missing new_state means: from then on only "
            "rules without a state match)"
        )
    return notes


def format_rule(rule: Rule) -> str:
    """One line, e.g. 'inject-error event=read_aio errno=5 sector=8 once=on'.

    It is also valid control-file input: parse_rule_args(*split) gives the rule back.
    """
    return " ".join([rule.kind] + [f"{key}={_word(value)}" for key, value in _rule_items(rule)])


def _word(value: str) -> str:
    # a comm may hold spaces: quoted, the line still splits back into KEY=VALUE words
    return f'"{value}"' if any(c.isspace() for c in value) else value


def format_config(rules: Iterable[Rule]) -> str:
    """The rules as a QEMU blkdebug config file (what parse_config_text reads back)."""
    lines = []
    for rule in rules:
        lines.append(f"[{rule.kind}]")
        lines.extend(f'{key} = "{value}"' for key, value in _rule_items(rule))
        lines.append("")
    return "\n".join(lines)
