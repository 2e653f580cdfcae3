"""The rule keys: one table (KEYS), one row per key, and everything about a key comes from its
row: the config reader, `-o inject-error.N.KEY`, the control file's rule commands, `blkfuse
check` (portable or not), the status (text and JSON), the control `help` and the README's key
table (tests/unit/test_keys.py holds them to it).

Adding a key is adding a row (and the field it sets, on the rule or on its Extensions):

    KeySpec("torn", "torn", parse_torn, default=-1,
            help="a write it fails keeps its first N sectors (power cuts)",
            example="torn=3"),

`qemu=True` only for what QEMU 7.2's blkdebug accepts; `example` is what the round-trip test
feeds through every place; `needs` names a mount option (options.py) that must be on (the
config reader and the control file both refuse the key without it).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blkfuse.rules import listing
from blkfuse.rules.events import DEFAULT_IOTYPES, EVENTS, IOTYPES, canonical_event
from blkfuse.rules.model import CORRUPT_MODES, POWERCUT_MODES, Extensions, Rule
from blkfuse.rules.values import (
    INT64_MAX,
    INT_MAX,
    Invalid,
    InvalidEvent,
    did_you_mean,
    format_bool,
    format_duration,
    parse_at_least,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_errno,
    parse_number,
)

INJECT, SET_STATE = "inject-error", "set-state"
KINDS = (INJECT, SET_STATE)

_ALWAYS = object()  # a `default` no value equals: the key is always shown


@dataclass(frozen=True)
class KeySpec:
    """One rule key."""

    name: str  # as written: "drop-unsynced"
    field: str  # the attribute it sets (the status JSON's name for it): "drop_unsynced"
    parse: Callable[[str, str], Any]  # (key, text) -> value; raises values.Invalid
    format: Callable[[Any], str] = str  # value -> text that `parse` reads back
    default: Any = _ALWAYS  # left out of the rule's text when the value equals it
    kinds: tuple[str, ...] = (INJECT,)
    qemu: bool = False  # QEMU 7.2's blkdebug knows it; else a blkfuse extension
    on_ext: bool = False  # the field is on the rule's Extensions, not on the rule
    json: Callable[[Any], Any] = lambda value: value  # value -> the status JSON's
    needs: str = ""  # a mount option (options.py) it needs on: "track-unsynced"
    value: str = "N"  # the help's placeholder: KEY=VALUE
    help: str = ""  # one line, for `help`, --help and the README
    example: str = ""  # words of a rule that sets it (tests/unit/test_keys.py round-trips it)


# ---- the parsers only rule keys use -------------------------------------------------------


def parse_count(key: str, text: str) -> int:
    """state, new_state, sector: a non-negative number that fits QEMU's C field.

    QEMU would keep a state in an int and a sector in an int64_t, silently wrapping a larger
    value (a sector of 2^64-1 becomes -1, "any sector"); refusing is kinder.
    """
    value = parse_number(key, text)
    if value < 0:
        raise Invalid(f'{key} must not be negative, not "{text}"')
    limit = INT64_MAX if key == "sector" else INT_MAX
    if value > limit:
        raise Invalid(f'{key} "{text}" is too large (at most {limit})')
    return value


def parse_torn(key: str, text: str) -> int:
    """torn=N: how many 512-byte sectors of a failed write persist (an extension)."""
    value = parse_number(key, text)
    if value < 0 or value > INT_MAX:
        raise Invalid(f'torn must be a number of sectors from 0 to {INT_MAX}, not "{text}"')
    return value


def parse_event(key: str, text: str) -> str:
    event = canonical_event(text)
    if event is None:
        raise InvalidEvent(f'unknown event "{text}"{did_you_mean(text, EVENTS)}')
    return event


# One shared set per io type: 100,000 rules need not hold 100,000 equal frozensets.
_ONE_IOTYPE = {iotype: frozenset((iotype,)) for iotype in IOTYPES}


def parse_iotype(key: str, text: str) -> frozenset:
    if text in _ONE_IOTYPE:
        return _ONE_IOTYPE[text]
    if "," in text:
        # QEMU 7.2 parses iotype as one enum value; a list is "invalid parameter value".
        raise Invalid(
            f'iotype takes one io type, not several ("{text}"); write one rule per io type'
        )
    raise Invalid(f'unknown io type "{text}"{did_you_mean(text, IOTYPES)}')


def format_iotypes(iotypes: frozenset) -> str:
    return ",".join(t for t in IOTYPES if t in iotypes)


def parse_probability(key: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails this too
        raise Invalid(
            f'probability expects a number above 0 and at most 1 (like 0.01), not "{text}"'
        )
    return value


def parse_id(key: str, text: str) -> int:
    """pid and uid: what the kernel puts in a FUSE request (a 32-bit number)."""
    value = parse_number(key, text)
    if not 0 <= value < 2**32 - 1:
        raise Invalid(f'{key} expects a number from 0 to {2**32 - 2}, not "{text}"')
    return value


# The kernel keeps 15 bytes of a command name (TASK_COMM_LEN 16, with its NUL).
_COMM_MAX = 15


def parse_comm(key: str, text: str) -> str:
    if not text:
        raise Invalid("comm expects a command name (as in /proc/PID/comm), not an empty one")
    if len(text.encode()) > _COMM_MAX:
        kept = text.encode()[:_COMM_MAX].decode(errors="ignore")
        raise Invalid(
            f'comm "{text}" can never match: the kernel keeps only the first '
            f'{_COMM_MAX} bytes of a command name ("{kept}")'
        )
    return text


parse_corrupt = parse_choice(CORRUPT_MODES)
# powercut=none|random|prefix: what the cut the rule fires keeps (an extension)
parse_powercut = parse_choice(POWERCUT_MODES, " (what the cut keeps of the unsynced writes)")


def parse_save_path(key: str, text: str) -> str:
    """powercut-save=PATH: where the daemon writes its copy of the image (it runs in /)."""
    if not text.startswith("/"):
        raise Invalid(f'{key} expects an absolute path (the daemon runs in /), not "{text}"')
    return text


def _none_if(empty: Any) -> Callable[[Any], Any]:
    return lambda value: None if value == empty else value


# ---- the table ----------------------------------------------------------------------------

# In the order rules are shown (QEMU's own keys first, in QEMU's order).
KEYS: tuple[KeySpec, ...] = (
    KeySpec("event", "event", parse_event, kinds=KINDS, qemu=True, value="EVENT",
            help="the event that arms the rule (a set-state: that changes the state)",
            example="event=read_aio"),
    KeySpec("state", "state", parse_count, default=0, kinds=KINDS, qemu=True,
            help="only in this state (0 or absent: any)",
            example="state=2"),
    KeySpec("new_state", "new_state", parse_count, kinds=(SET_STATE,), qemu=True,
            help="the state to move to",
            example="new_state=3"),
    KeySpec("iotype", "iotypes", parse_iotype, format_iotypes, default=DEFAULT_IOTYPES,
            qemu=True, json=lambda value: [t for t in IOTYPES if t in value], value="TYPE",
            help=f"only this io type ({' '.join(IOTYPES)}; default all but block-status)",
            example="iotype=write"),
    KeySpec("errno", "errno", parse_errno, qemu=True, value="N|ENAME",
            help="fail with this errno (default 5, EIO; 0 lets it through; a name: extension)",
            example="errno=28"),
    KeySpec("sector", "sector", parse_count, default=-1, qemu=True,
            help="only requests covering byte N*512 (any sector if absent)",
            example="sector=8"),
    KeySpec("once", "once", parse_bool, format_bool, default=False, qemu=True, value="on|off",
            help="spent after failing one request",
            example="once=on"),
    KeySpec("immediately", "immediately", parse_bool, format_bool, default=False, qemu=True,
            value="on|off", help="(QEMU: fail in the submitting coroutine; same effect here)",
            example="immediately=on"),
    KeySpec("torn", "torn", parse_torn, default=-1,
            help="a write it fails keeps its first N sectors (power cuts)",
            example="torn=3"),
    KeySpec("drop-unsynced", "drop_unsynced", parse_bool, format_bool, default=False,
            value="on|off", needs="track-unsynced",
            help="a flush it fails first loses the unsynced writes (needs track-unsynced)",
            example="drop-unsynced=on"),
    KeySpec("probability", "probability", parse_probability, repr, default=1.0, on_ext=True,
            value="P", help="act on a request with this chance, 0 < P <= 1 (seeded)",
            example="probability=0.25"),
    KeySpec("after", "after", parse_at_least(0), default=0, on_ext=True,
            help="let the first N requests that reach it through",
            example="after=2"),
    KeySpec("count", "count", parse_at_least(1), default=0, on_ext=True, json=_none_if(0),
            help="act on at most N requests, then be spent",
            example="count=3"),
    KeySpec("sectors", "sectors", parse_at_least(1), default=0, on_ext=True,
            json=_none_if(0), help="with sector: cover sectors [sector, sector+N)",
            example="sector=8 sectors=16"),
    KeySpec("delay", "delay_us", parse_duration, format_duration, default=0, on_ext=True,
            value="DURATION", help="hold the request this long (200us, 10ms, 1.5s, 1h30m)",
            example="delay=1h30m"),
    KeySpec("jitter", "jitter_us", parse_duration, format_duration, default=0, on_ext=True,
            value="DURATION", help="plus a uniform, seeded share of this much",
            example="jitter=200us"),
    KeySpec("corrupt", "corrupt", parse_corrupt, default="", on_ext=True, json=_none_if(""),
            value="|".join(CORRUPT_MODES), help="silently change the data read or written",
            example="corrupt=flip"),
    KeySpec("corrupt-bytes", "corrupt_bytes", parse_at_least(1), default=1, on_ext=True,
            help="bytes changed per corrupted request (default 1)",
            example="corrupt=zero corrupt-bytes=4"),
    KeySpec("pid", "pid", parse_id, default=-1, on_ext=True, json=_none_if(-1),
            help="only requests sent by this process or thread",
            example="pid=77"),
    KeySpec("comm", "comm", parse_comm, default="", on_ext=True, json=_none_if(""),
            value="NAME", help="only requests sent by this command name (/proc/PID/comm)",
            example="comm=dd"),
    KeySpec("uid", "uid", parse_id, default=-1, on_ext=True, json=_none_if(-1),
            help="only requests sent by this user",
            example="uid=1000"),
    KeySpec("heal", "heal", parse_bool, format_bool, default=False, on_ext=True,
            value="on|off", help="with sector: a write over all its sectors repairs them",
            example="sector=8 heal=on"),
    KeySpec("persistent", "persistent", parse_bool, format_bool, default=False, on_ext=True,
            value="on|off", help="stay armed when later events replace the active set",
            example="persistent=on"),
    KeySpec("powercut", "powercut", parse_powercut, default="", on_ext=True, json=_none_if(""),
            needs="track-unsynced", value="|".join(POWERCUT_MODES),
            help="cut the power at the request it acts on, keeping this (needs track-unsynced)",
            example="powercut=random"),
    KeySpec("powercut-save", "powercut_save", parse_save_path, default="", on_ext=True,
            json=_none_if(""), value="PATH",
            help="with powercut: save a sparse copy of the image as the cut left it",
            example="powercut=none powercut-save=/tmp/cut.img"),
)  # fmt: skip

BY_NAME = {spec.name: spec for spec in KEYS}
# The keys of each kind, in table order; QEMU's and blkfuse's.
SECTION_KEYS = {kind: tuple(s.name for s in KEYS if kind in s.kinds) for kind in KINDS}
QEMU_KEYS = {kind: tuple(s.name for s in KEYS if kind in s.kinds and s.qemu) for kind in KINDS}
EXTENSION_KEYS = {
    kind: tuple(s.name for s in KEYS if kind in s.kinds and not s.qemu) for kind in KINDS
}

_NO_EXTENSIONS = Extensions()


def value_of(rule: Rule, spec: KeySpec) -> Any:
    """The rule's value for this key (an Extensions default for a rule without them)."""
    if spec.on_ext:
        ext = getattr(rule, "ext", None)
        return getattr(ext if ext is not None else _NO_EXTENSIONS, spec.field)
    return getattr(rule, spec.field)


def rule_specs(rule: Rule) -> tuple[KeySpec, ...]:
    return _BY_KIND[rule.kind]


_BY_KIND = {kind: tuple(s for s in KEYS if kind in s.kinds) for kind in KINDS}


def rule_items(rule: Rule) -> list[tuple[str, str]]:
    """The rule's keys and values as text, in table order, defaults left out."""
    items = []
    for spec in _BY_KIND[rule.kind]:
        value = value_of(rule, spec)
        if spec.default is _ALWAYS or value != spec.default:
            items.append((spec.name, spec.format(value)))
    return items


def rule_json(rule: Rule) -> dict[str, Any]:
    """Every key of the rule, defaults included, by field name; and `extension`: whether
    it uses any key QEMU does not know."""
    d: dict[str, Any] = {}
    extension = False
    for spec in _BY_KIND[rule.kind]:
        value = value_of(rule, spec)
        d[spec.field] = spec.json(value)
        if not spec.qemu and spec.default is not _ALWAYS and value != spec.default:
            extension = True
    d["extension"] = extension
    return d


def help_lines(kind: str) -> list[str]:
    """`KEY=VALUE  help` per key of `kind`, extensions marked with *."""
    return listing.help_lines([(s.qemu, f"{s.name}={s.value}", s.help) for s in _BY_KIND[kind]])


def markdown() -> str:
    """The README's key table."""
    return listing.markdown(
        ("key", "rules", "QEMU", "meaning"),
        (
            (
                f"`{s.name}={s.value}`",
                ", ".join(f"`[{kind}]`" for kind in s.kinds),
                "yes" if s.qemu else "no (extension)",
                s.help,
            )
            for s in KEYS
        ),
    )
