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
valid one. What QEMU accepts we accept, with these deliberate differences (README):
a negative errno or sector is an error (QEMU wraps "-5" to a negative errno that silently
skips the I/O, and "-1" to "any sector"); errno may be a name ("ENOSPC"); errno is at most
511 (the largest error a FUSE reply can carry); pre-2015 dotted event names still work;
whitespace-only and indented-comment lines are allowed; text after a value's closing quote
is an error (QEMU ignores it, which hides typos); option values may be quoted; align and
max-transfer must be positive (QEMU reads 0 as "not set").
"""

import difflib
import errno as errno_module
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any, NamedTuple, NoReturn

from blkfuse.rules.events import DEFAULT_IOTYPES, EVENTS, IOTYPES, canonical_event, never_fires_note
from blkfuse.rules.model import (
    CACHE_MODES,
    CORRUPT_MODES,
    FORMATS,
    POWERCUT_MODES,
    Extensions,
    InjectError,
    Rule,
    SetState,
    Settings,
)
from blkfuse.rules.profiles import PROFILES

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
]


class ConfigError(ValueError):
    """A config, option or control rule that cannot be used; str() is the whole message."""


class UnknownEvent(ConfigError):
    """A rule names an event that does not exist: the control file answers ENOENT for it, as
    qemu-io's `break` does for an unknown event (every other bad rule is EINVAL)."""


class _Invalid(Exception):
    """A bad value, before the caller knows where it came from (it adds the location)."""


class _InvalidEvent(_Invalid):
    """An event name that does not exist (becomes UnknownEvent)."""


# The keys of each section QEMU 7.2 knows, in its order (block/blkdebug.c inject_error_opts,
# set_state_opts).
QEMU_KEYS = {
    "inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
    "set-state": ("event", "state", "new_state"),
}
# Power-cut keys and options (issue 10): blkfuse extensions, QEMU rejects them.
POWER_KEYS = ("torn", "drop-unsynced", "powercut", "powercut-save")
POWER_OPTIONS = ("track-unsynced", "unsynced-cap", "atomic")
# Recording (issue 20): QEMU blklogwrites' options under their own names, plus the log file.
# blkfuse extensions here: QEMU's blkdebug driver rejects them (they belong to a node below).
LOG_WRITES_OPTIONS = ("log-writes", "log-sector-size", "log-append", "log-super-update-interval")
# blkfuse's own keys: the one list of extensions (add new ones here). Every spelling accepts
# them (file, -o, control); `blkfuse check` marks them and `check --qemu` names them as what
# QEMU rejects.
EXTENSION_KEYS = {
    "inject-error": (
        "probability",
        "after",
        "count",
        "sectors",
        "delay",
        "jitter",
        "corrupt",
        "corrupt-bytes",
        "pid",
        "comm",
        "uid",
        "heal",
        "persistent",
    )
    + POWER_KEYS,
    "set-state": (),
}
SECTION_KEYS = {kind: QEMU_KEYS[kind] + EXTENSION_KEYS[kind] for kind in QEMU_KEYS}
_RULE_CLASSES = {"inject-error": InjectError, "set-state": SetState}

# Top-level blockdev options of the blkdebug driver that blkfuse understands.
_BLKDEBUG_LIMITS = ("opt-write-zero", "max-write-zero", "opt-discard", "max-discard")
# blkfuse's own options, about the mount rather than the rules: mount over a non-empty
# directory; lock the image as QEMU's file driver does with locking=on|off|auto; let writes past
# the end and truncate resize the image, as qemu-storage-daemon's FUSE export does with
# growable=on. `nonempty` alone means on.
MOUNT_OPTIONS = ("nonempty", "locking", "growable")
_FLAG_OPTIONS = ("nonempty",)
# Options that are not blkdebug's: what qemu-io's command line says (-t MODE, and
# --image-opts driver=blkdebug for format=none), the mount's own, blkfuse's daemon tuning
# (image.py, fuseloop.py: the whole numbers each accepts), and the seed of the random decisions.
# The one list of extension options, as EXTENSION_KEYS is of keys: `blkfuse check` marks them.
_SPEED_OPTIONS = {"io-threads": (0, 256), "poll-us": (0, 100_000)}
EXTENSION_OPTIONS = (
    ("cache", "format")
    + MOUNT_OPTIONS
    + tuple(_SPEED_OPTIONS)
    + POWER_OPTIONS
    + ("seed",)
    + LOG_WRITES_OPTIONS
    + ("qemu",)  # qemu=7.2|10.0: whose blkdebug and block layer (profiles.py)
)
_SETTING_OPTIONS = (
    ("config", "image", "x-image", "align", "max-transfer") + _BLKDEBUG_LIMITS + EXTENSION_OPTIONS
)

# A FUSE reply carries -errno and the kernel refuses anything at or below -512 (-ERESTARTSYS).
MAX_ERRNO = 511
_UINT64_MAX = 2**64 - 1
_INT_MAX = 2**31 - 1  # QEMU keeps states, align and max-transfer in an int
_INT64_MAX = 2**63 - 1

_ERRNO_NAMES = {
    name: getattr(errno_module, name)
    for name in dir(errno_module)
    if name.startswith("E") and name.isupper()
}
_BOOLEANS = {
    "on": True,
    "yes": True,
    "true": True,
    "y": True,
    "off": False,
    "no": False,
    "false": False,
    "n": False,
}


# --- suggestions -------------------------------------------------------------------------


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest candidate, or '' when nothing is close."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(word, candidates, n=1)
    if not matches:
        # difflib is case-sensitive: "ENOSPC" is far from "enospc" by its measure.
        folded = {c.lower(): c for c in candidates}
        close = difflib.get_close_matches(word.lower(), list(folded), n=1)
        matches = [folded[close[0]]] if close else []
    return f' (did you mean "{matches[0]}"?)' if matches else ""


# --- values ------------------------------------------------------------------------------

# QEMU reads numbers with qemu_strtou64(base 0): C whitespace, a sign, then 0x hex,
# 0-led octal or decimal, and nothing after. Explicit digit classes keep Unicode digits out.
_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def _parse_number(key: str, text: str) -> int:
    """A QEMU_OPT_NUMBER value as a Python int (negative only when written with '-')."""
    match = _NUMBER.match(text)
    if match is None:
        raise _Invalid(f'{key} expects a number (decimal, 0x hex or 0-led octal), not "{text}"')
    sign, digits = match.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits[0] == "0":
        value = int(digits, 8)
    else:
        value = int(digits)
    if value > _UINT64_MAX:
        raise _Invalid(f'{key} "{text}" is too large')
    return -value if sign == "-" else value


def _parse_count(key: str, text: str) -> int:
    """state, new_state, sector: a non-negative number that fits QEMU's C field.

    QEMU would keep a state in an int and a sector in an int64_t, silently wrapping a larger
    value (a sector of 2^64-1 becomes -1, "any sector"); refusing is kinder.
    """
    value = _parse_number(key, text)
    if value < 0:
        raise _Invalid(f'{key} must not be negative, not "{text}"')
    limit = _INT64_MAX if key == "sector" else _INT_MAX
    if value > limit:
        raise _Invalid(f'{key} "{text}" is too large (at most {limit})')
    return value


def _parse_errno(key: str, text: str) -> int:
    """A number, or (an extension) an errno name such as ENOSPC."""
    name = text.strip()
    if name[:1].isalpha():
        if name in _ERRNO_NAMES:
            return _ERRNO_NAMES[name]
        raise _Invalid(f'unknown errno name "{text}"{did_you_mean(name, _ERRNO_NAMES)}')
    value = _parse_number(key, text)
    if value < 0:
        raise _Invalid(
            f'errno must not be negative, not "{text}" (QEMU would silently '
            "skip the I/O; use a positive errno, or 0 to let requests through)"
        )
    if value > MAX_ERRNO:
        raise _Invalid(f'errno "{text}" is too large: a FUSE reply carries at most {MAX_ERRNO}')
    return value


def _parse_bool(key: str, text: str) -> bool:
    # QEMU's qapi_bool_parse: these lower-case words only; "1", "0" and "ON" are errors.
    try:
        return _BOOLEANS[text]
    except KeyError:
        raise _Invalid(
            f'{key} expects on or off (or yes/no, true/false, y/n), not "{text}"'
        ) from None


def _parse_torn(text: str) -> int:
    """torn=N: how many 512-byte sectors of a failed write persist (an extension)."""
    value = _parse_number("torn", text)
    if value < 0 or value > _INT_MAX:
        raise _Invalid(f'torn must be a number of sectors from 0 to {_INT_MAX}, not "{text}"')
    return value


def _parse_powercut(key: str, text: str) -> str:
    """powercut=none|random|prefix: what the cut the rule fires keeps (an extension)."""
    if text not in POWERCUT_MODES:
        raise _Invalid(
            f'powercut expects one of {", ".join(POWERCUT_MODES)} (what the cut keeps of the '
            f'unsynced writes), not "{text}"{did_you_mean(text, POWERCUT_MODES)}'
        )
    return text


def _parse_save_path(key: str, text: str) -> str:
    """powercut-save=PATH: where the daemon writes its copy of the image (it runs in /)."""
    if not text.startswith("/"):
        raise _Invalid(f'{key} expects an absolute path (the daemon runs in /), not "{text}"')
    return text


def _parse_event(key: str, text: str) -> str:
    event = canonical_event(text)
    if event is None:
        raise _InvalidEvent(f'unknown event "{text}"{did_you_mean(text, EVENTS)}')
    return event


# One shared set per io type: 100,000 rules need not hold 100,000 equal frozensets.
_ONE_IOTYPE = {iotype: frozenset((iotype,)) for iotype in IOTYPES}


def _parse_iotype(key: str, text: str) -> frozenset:
    if text in _ONE_IOTYPE:
        return _ONE_IOTYPE[text]
    if "," in text:
        # QEMU 7.2 parses iotype as one enum value; a list is "invalid parameter value".
        raise _Invalid(
            f'iotype takes one io type, not several ("{text}"); write one rule per io type'
        )
    raise _Invalid(f'unknown io type "{text}"{did_you_mean(text, IOTYPES)}')


def _parse_probability(key: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails this too
        raise _Invalid(
            f'probability expects a number above 0 and at most 1 (like 0.01), not "{text}"'
        )
    return value


def _parse_at_least(minimum: int) -> Callable[[str, str], int]:
    def parse(key: str, text: str) -> int:
        value = _parse_number(key, text)
        if value < minimum:
            raise _Invalid(f'{key} must be at least {minimum}, not "{text}"')
        if value > _INT64_MAX:
            raise _Invalid(f'{key} "{text}" is too large (at most {_INT64_MAX})')
        return value

    return parse


def _parse_id(key: str, text: str) -> int:
    """pid and uid: what the kernel puts in a FUSE request (a 32-bit number)."""
    value = _parse_number(key, text)
    if not 0 <= value < 2**32 - 1:
        raise _Invalid(f'{key} expects a number from 0 to {2**32 - 2}, not "{text}"')
    return value


# The kernel keeps 15 bytes of a command name (TASK_COMM_LEN 16, with its NUL).
_COMM_MAX = 15


def _parse_comm(key: str, text: str) -> str:
    if not text:
        raise _Invalid("comm expects a command name (as in /proc/PID/comm), not an empty one")
    if len(text.encode()) > _COMM_MAX:
        raise _Invalid(
            f'comm "{text}" can never match: the kernel keeps only the first '
            f'{_COMM_MAX} bytes of a command name ("{text.encode()[:_COMM_MAX].decode(errors="ignore")}")'
        )
    return text


def _parse_corrupt(key: str, text: str) -> str:
    if text not in CORRUPT_MODES:
        raise _Invalid(
            f'corrupt expects one of {", ".join(CORRUPT_MODES)}, not "{text}"'
            f"{did_you_mean(text, CORRUPT_MODES)}"
        )
    return text


_DURATION = re.compile(r"[ \t]*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*(ns|us|µs|ms|s)[ \t]*\Z")
_DURATION_US: dict[str, int | Fraction] = {
    "ns": Fraction(1, 1000),
    "us": 1,
    "µs": 1,
    "ms": 1000,
    "s": 1000000,
}
_MAX_DURATION_US = 24 * 3600 * 1000000


def _parse_duration(key: str, text: str) -> int:
    """'200us', '10ms', '1.5s' -> microseconds (the unit is not optional: '10' means nothing)."""
    match = _DURATION.match(text)
    if match is None:
        raise _Invalid(
            f'{key} expects a duration with a unit (like 200us, 10ms or 1.5s), not "{text}"'
        )
    number, unit = match.groups()
    micros = round(Fraction(number) * _DURATION_US[unit])
    if micros > _MAX_DURATION_US:
        raise _Invalid(f'{key} "{text}" is too long (at most 24 hours)')
    if micros == 0 and Fraction(number):
        raise _Invalid(f'{key} "{text}" is shorter than the 1us it is counted in')
    return micros


def format_duration(micros: int) -> str:
    """Microseconds as the shortest exact duration: 1500000 -> '1500ms', 2000000 -> '2s'."""
    if micros and micros % 1000000 == 0:
        return f"{micros // 1000000}s"
    if micros and micros % 1000 == 0:
        return f"{micros // 1000}ms"
    return f"{micros}us"


# key -> (rule field it sets, parser of its text)
_KEY_PARSERS = {
    "event": ("event", _parse_event),
    "state": ("state", _parse_count),
    "new_state": ("new_state", _parse_count),
    "sector": ("sector", _parse_count),
    "errno": ("errno", _parse_errno),
    "once": ("once", _parse_bool),
    "immediately": ("immediately", _parse_bool),
    "iotype": ("iotypes", _parse_iotype),
    "torn": ("torn", lambda key, text: _parse_torn(text)),
    "drop-unsynced": ("drop_unsynced", _parse_bool),
}
# The extension keys set fields of the rule's Extensions, not of the rule.
_EXTENSION_PARSERS = {
    "probability": ("probability", _parse_probability),
    "after": ("after", _parse_at_least(0)),
    "count": ("count", _parse_at_least(1)),
    "sectors": ("sectors", _parse_at_least(1)),
    "delay": ("delay_us", _parse_duration),
    "jitter": ("jitter_us", _parse_duration),
    "corrupt": ("corrupt", _parse_corrupt),
    "corrupt-bytes": ("corrupt_bytes", _parse_at_least(1)),
    "pid": ("pid", _parse_id),
    "comm": ("comm", _parse_comm),
    "uid": ("uid", _parse_id),
    "heal": ("heal", _parse_bool),
    "persistent": ("persistent", _parse_bool),
    "powercut": ("powercut", _parse_powercut),
    "powercut-save": ("powercut_save", _parse_save_path),
}


# --- rules from key/value entries --------------------------------------------------------


def _check_key(kind: str, key: str, where: str) -> None:
    """Refuse a key that `kind` rules do not have, naming the right section if it is there."""
    if key in SECTION_KEYS[kind]:
        return
    for other, keys in SECTION_KEYS.items():
        if other != kind and key in keys:
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
        if key in _EXTENSION_PARSERS:
            field, parse = _EXTENSION_PARSERS[key]
            target = extensions
        else:
            field, parse = _KEY_PARSERS[key]
            target = fields
        try:
            target[field] = parse(key, text)
        except _Invalid as error:
            kind_of_error = UnknownEvent if isinstance(error, _InvalidEvent) else ConfigError
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
# QEMU_OPT_SIZE (qemu_strtosz): decimal with an optional fraction, or hex; optional unit.
_SIZE = re.compile(r"[ \t\n\v\f\r]*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?)([bBkKmMgGtTpPeE]?)\Z")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "p": 2**50,
    "e": 2**60,
}


def _unquote_option(value: str) -> str:
    """Option values need no quotes; a config-file habit of adding them is forgiven."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _parse_size(key: str, text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f'option {key}: expects a size (like 4096, 4k or 1M), not "{text}"')
    number, unit = match.groups()
    if number[:2] in ("0x", "0X"):
        value = int(number[2:], 16) * _SIZE_UNITS[unit.lower()]
    else:
        whole, _, fraction = number.partition(".")
        scale = _SIZE_UNITS[unit.lower()]
        value = int(whole) * scale + (
            int(fraction) * scale // 10 ** len(fraction) if fraction else 0
        )
    if value > _UINT64_MAX:
        raise ConfigError(f'option {key}: "{text}" is too large')
    return value


def _parse_align(text: str) -> int:
    align = _parse_size("align", text)
    if align <= 0 or align > _INT_MAX or align & (align - 1):
        raise ConfigError(f'option align: must be a positive power of two below 2^31, not "{text}"')
    return align


def _parse_max_transfer(text: str, align: int | None) -> int:
    max_transfer = _parse_size("max-transfer", text)
    if max_transfer <= 0 or max_transfer > _INT_MAX:
        raise ConfigError(f'option max-transfer: must be positive and below 2^31, not "{text}"')
    if align and max_transfer % align:
        # As QEMU: a chunk must be a whole number of aligned blocks.
        raise ConfigError(f"option max-transfer: {max_transfer} is not a multiple of align={align}")
    return max_transfer


def _parse_limit(key: str, text: str, multiple_of: int) -> int:
    """opt-/max-write-zero, opt-/max-discard: positive, below 2^31, a multiple of the
    alignment QEMU's blkdebug_open wants ("Cannot meet constraints with ...")."""
    value = _parse_size(key, text)
    if value <= 0 or value >= _INT_MAX:
        raise ConfigError(f'option {key}: must be positive and below 2^31, not "{text}"')
    if value % multiple_of:
        raise ConfigError(
            f"option {key}: {value} is not a multiple of {multiple_of} "
            "(align, or the matching opt- value)"
        )
    return value


def _parse_choice(key: str, text: str, choices: tuple[str, ...], meaning: str) -> str:
    if text not in choices:
        raise ConfigError(
            f'option {key}: unknown {meaning} "{text}"{did_you_mean(text, choices)}'
            f" (one of {', '.join(choices)})"
        )
    return text


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
    names = _SETTING_OPTIONS + EXTENSION_OPTIONS + tuple(SECTION_KEYS)
    return ConfigError(f'option {key}: unknown option "{head}"{did_you_mean(head, names)}')


def _collect_rule_options(options: dict) -> dict:
    """{kind: {index or None: {subkey: (text, where)}}}, every key checked."""
    groups: dict[str, dict[str | None, dict[str, tuple[str, str]]]] = {
        kind: {} for kind in SECTION_KEYS
    }
    for key, value in options.items():
        if key in _SETTING_OPTIONS or key in EXTENSION_OPTIONS:
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
    if "config" in options:
        settings.config_path = _unquote_option(options["config"])
        if not settings.config_path:
            raise ConfigError("option config: the config file path is empty")
    for image_key in ("image", "x-image"):
        if image_key in options:
            settings.image = _unquote_option(options[image_key])
    if "align" in options:
        settings.align = _parse_align(_unquote_option(options["align"]))
    if "max-transfer" in options:
        settings.max_transfer = _parse_max_transfer(
            _unquote_option(options["max-transfer"]), settings.align
        )
    align = settings.align or 1
    for key in _BLKDEBUG_LIMITS:
        if key in options:
            base = align
            if key == "max-write-zero":
                base = max(align, settings.opt_write_zero or 0)
            elif key == "max-discard":
                base = max(align, settings.opt_discard or 0)
            setattr(
                settings,
                key.replace("-", "_"),
                _parse_limit(key, _unquote_option(options[key]), base),
            )
    if "cache" in options:
        settings.cache = _parse_choice(
            "cache", _unquote_option(options["cache"]), CACHE_MODES, "cache mode (qemu-io -t)"
        )
    if "format" in options:
        settings.format = _parse_choice(
            "format", _unquote_option(options["format"]), FORMATS, "format"
        )
    if "io-threads" in options:
        settings.io_threads = _parse_speed_option("io-threads", options["io-threads"])
    if "poll-us" in options:
        settings.poll_us = _parse_speed_option("poll-us", options["poll-us"])
    for key in MOUNT_OPTIONS:
        if key in options:
            setattr(settings, key, _parse_mount_flag(key, _unquote_option(options[key])))
    _parse_power_options(options, settings)
    _parse_log_writes_options(options, settings)
    if "seed" in options:
        text = _unquote_option(options["seed"])
        try:
            settings.seed = _parse_at_least(0)("seed", text)
        except _Invalid as error:
            raise ConfigError(f"option seed: {error}") from None
    if "qemu" in options:
        settings.qemu = _parse_choice(
            "qemu", _unquote_option(options["qemu"]), tuple(PROFILES), "QEMU profile"
        )
    return rules, settings


def _parse_speed_option(key: str, text: str) -> int:
    low, high = _SPEED_OPTIONS[key]
    text = _unquote_option(text)
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError(
            f'option {key}: expects a whole number from {low} to {high}, not "{text}"'
        )
    return value


def _parse_mount_flag(key: str, text: str) -> bool:
    if key == "locking" and text == "auto":
        return True  # QEMU: on where OFD locks exist, which is every Linux here
    try:
        return _parse_bool(key, text)
    except _Invalid as error:
        raise ConfigError(f"option {key}: {error}") from None


def _parse_power_options(options: dict, settings: Settings) -> None:
    """track-unsynced=on|off, unsynced-cap=SIZE, atomic=BYTES (README "Power cuts")."""
    if "track-unsynced" in options:
        try:
            settings.track_unsynced = _parse_bool(
                "track-unsynced", _unquote_option(options["track-unsynced"])
            )
        except _Invalid as error:
            raise ConfigError(f"option track-unsynced: {error}") from None
    for key in ("unsynced-cap", "atomic"):
        if key in options and not settings.track_unsynced:
            raise ConfigError(f"option {key}: only means something with track-unsynced=on")
    if "unsynced-cap" in options:
        cap = _parse_size("unsynced-cap", _unquote_option(options["unsynced-cap"]))
        if cap < 4096:
            raise ConfigError(f'option unsynced-cap: must be at least 4096, not "{cap}"')
        settings.unsynced_cap = cap
    if "atomic" in options:
        atomic = _parse_size("atomic", _unquote_option(options["atomic"]))
        if atomic < 512 or atomic > 1 << 30 or atomic & (atomic - 1):
            raise ConfigError(
                f'option atomic: must be a power of two from 512 to 1G, not "{options["atomic"]}"'
            )
        settings.atomic = atomic


def _parse_log_writes_options(options: dict, settings: Settings) -> None:
    """log-writes=FILE and blklogwrites' log-sector-size, log-append, log-super-update-interval
    (README "Record and replay"), checked as QEMU's blk_log_writes_open checks them."""
    if "log-writes" in options:
        settings.log_writes = _unquote_option(options["log-writes"])
        if not settings.log_writes:
            raise ConfigError("option log-writes: the log file path is empty")
    for key in LOG_WRITES_OPTIONS[1:]:
        if key in options and settings.log_writes is None:
            raise ConfigError(f"option {key}: only means something with log-writes=FILE")
    if "log-append" in options:
        try:
            settings.log_append = _parse_bool("log-append", _unquote_option(options["log-append"]))
        except _Invalid as error:
            raise ConfigError(f"option log-append: {error}") from None
    if "log-sector-size" in options:
        if settings.log_append:
            raise ConfigError(
                "option log-sector-size: log-append and log-sector-size are mutually exclusive"
                " (an appended log keeps its own sector size)"
            )
        text = _unquote_option(options["log-sector-size"])
        size = _parse_size("log-sector-size", text)
        if size < 32 or size >= 1 << 24 or size & (size - 1):  # QEMU's bounds
            raise ConfigError(
                f'option log-sector-size: must be a power of two from 32 to 8M, not "{text}"'
            )
        settings.log_sector_size = size
    if "log-super-update-interval" in options:
        text = _unquote_option(options["log-super-update-interval"])
        try:
            settings.log_super_update_interval = _parse_at_least(1)(
                "log-super-update-interval", text
            )
        except _Invalid as error:
            raise ConfigError(f"option log-super-update-interval: {error}") from None


def check_power_rules(rules: Sequence[Rule], settings: Settings) -> None:
    """drop-unsynced and powercut work through the undo log: they need track-unsynced=on."""
    if settings.track_unsynced:
        return
    for rule in rules:
        key = power_key(rule)
        if key:
            raise ConfigError(
                f"{rule.source or 'rule'}: {key} needs the option "
                "track-unsynced=on (-o track-unsynced=on)"
            )


def power_key(rule: Rule) -> str:
    """The key of `rule` that needs track-unsynced=on ('drop-unsynced', 'powercut'), or ''."""
    if getattr(rule, "drop_unsynced", False):
        return "drop-unsynced"
    ext = getattr(rule, "ext", None)
    if ext is not None and ext.powercut:
        return "powercut"
    return ""


def parse_option_string(s: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}; as in QEMU, ',,' is a comma inside a value."""
    options: dict[str, str] = {}
    if not s:
        return options
    for item in _split_on_single_commas(s):
        key, equals, value = item.partition("=")
        if not item:
            raise ConfigError(f'option string "{s}": empty option (stray comma?)')
        if not equals and key in _FLAG_OPTIONS:
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
    check_power_rules(rules + option_rules, settings)
    return rules + option_rules


def _rule_items(rule: Rule) -> list[tuple[str, str]]:
    """The rule's keys and values, defaults left out except errno and new_state (the point)."""
    items = [("event", rule.event)]
    if rule.state:
        items.append(("state", str(rule.state)))
    if isinstance(rule, SetState):
        items.append(("new_state", str(rule.new_state)))
        return items
    if rule.iotypes != DEFAULT_IOTYPES:
        items.append(("iotype", ",".join(t for t in IOTYPES if t in rule.iotypes)))
    items.append(("errno", str(rule.errno)))
    if rule.sector >= 0:
        items.append(("sector", str(rule.sector)))
    if rule.once:
        items.append(("once", "on"))
    if rule.immediately:
        items.append(("immediately", "on"))
    if rule.torn >= 0:
        items.append(("torn", str(rule.torn)))
    if rule.drop_unsynced:
        items.append(("drop-unsynced", "on"))
    if rule.ext is not None:
        items.extend(_extension_items(rule.ext))
    return items


def _extension_items(ext: Extensions) -> list[tuple[str, str]]:
    items = []
    if ext.probability != 1.0:
        items.append(("probability", repr(ext.probability)))
    for key, value in (("after", ext.after), ("count", ext.count), ("sectors", ext.sectors)):
        if value:
            items.append((key, str(value)))
    if ext.delay_us:
        items.append(("delay", format_duration(ext.delay_us)))
    if ext.jitter_us:
        items.append(("jitter", format_duration(ext.jitter_us)))
    if ext.corrupt:
        items.append(("corrupt", ext.corrupt))
        items.append(("corrupt-bytes", str(ext.corrupt_bytes)))
    if ext.pid >= 0:
        items.append(("pid", str(ext.pid)))
    if ext.comm:
        items.append(("comm", ext.comm))
    if ext.uid >= 0:
        items.append(("uid", str(ext.uid)))
    if ext.heal:
        items.append(("heal", "on"))
    if ext.persistent:
        items.append(("persistent", "on"))
    if ext.powercut:
        items.append(("powercut", ext.powercut))
    if ext.powercut_save:
        items.append(("powercut-save", ext.powercut_save))
    return items


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
