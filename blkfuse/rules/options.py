"""The mount options (`-o KEY=VALUE,...` beside the rules): one table (OPTIONS), one row per
option, and everything about an option comes from its row: parse_options reads them in table
order into Settings, `blkfuse check` marks the ones QEMU's blkdebug rejects, `blkfuse mount
--help` lists them, and so does the README (tests/unit/test_keys.py holds them to it).

Adding an option is adding a row (and its Settings field):

    OptionSpec("io-threads", "io_threads", _whole(0, 256), note=_TUNING,
               help="worker threads for disk I/O (default 4; 0: all inline)", example="2"),

A row's parser gets the settings read so far (rows above it): max-transfer checks align.
`qemu=True` only for blkdebug's own blockdev options; the others say in `note` what does the
same in QEMU, if anything (blkfuse check prints it); `needs` names an option that must be on.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blkfuse.rules import listing
from blkfuse.rules.model import CACHE_MODES, FORMATS, Settings
from blkfuse.rules.profiles import PROFILES
from blkfuse.rules.values import (
    INT_MAX,
    Invalid,
    did_you_mean,
    format_bool,
    parse_at_least,
    parse_bool,
    parse_size,
)

Parser = Callable[[str, str, Settings], Any]


@dataclass(frozen=True)
class OptionSpec:
    """One -o option."""

    name: str  # as written: "max-transfer"
    field: str  # the Settings attribute it sets
    parse: Parser  # (key, text, settings so far) -> value; raises values.Invalid
    format: Callable[[Any], str] = str  # value -> text (blkfuse check's summary)
    qemu: bool = False  # a blockdev option of QEMU 7.2's blkdebug driver
    note: str = ""  # why it is not portable ({value} is replaced): "qemu-io -t {value}"
    needs: str = ""  # an option that must be set for this one to mean anything
    about: str = ""  # not a rule's option but what they are checked against: shown, not flagged
    flag: bool = False  # may be written without =VALUE (meaning on)
    shown: bool = True  # in blkfuse check's summary when given
    value: str = "N"  # the help's placeholder
    help: str = ""  # one line, for --help and the README
    example: str = ""  # a value (tests/unit/test_keys.py reads it through every place)


def _plain(key: str, text: str, settings: Settings) -> str:
    return text


def _path(what: str) -> Parser:
    def parse(key: str, text: str, settings: Settings) -> str:
        if not text:
            raise Invalid(f"the {what} path is empty")
        return text

    return parse


def _align(key: str, text: str, settings: Settings) -> int:
    align = parse_size(key, text)
    if align <= 0 or align > INT_MAX or align & (align - 1):
        raise Invalid(f'must be a positive power of two below 2^31, not "{text}"')
    return align


def _max_transfer(key: str, text: str, settings: Settings) -> int:
    max_transfer = parse_size(key, text)
    if max_transfer <= 0 or max_transfer > INT_MAX:
        raise Invalid(f'must be positive and below 2^31, not "{text}"')
    if settings.align and max_transfer % settings.align:
        # As QEMU: a chunk must be a whole number of aligned blocks.
        raise Invalid(f"{max_transfer} is not a multiple of align={settings.align}")
    return max_transfer


def _limit(opt_field: str | None) -> Parser:
    """opt-/max-write-zero, opt-/max-discard: positive, below 2^31, a multiple of the
    alignment QEMU's blkdebug_open wants ("Cannot meet constraints with ...")."""

    def parse(key: str, text: str, settings: Settings) -> int:
        multiple_of = settings.align or 1
        if opt_field is not None:
            multiple_of = max(multiple_of, getattr(settings, opt_field) or 0)
        value = parse_size(key, text)
        if value <= 0 or value >= INT_MAX:
            raise Invalid(f'must be positive and below 2^31, not "{text}"')
        if value % multiple_of:
            raise Invalid(
                f"{value} is not a multiple of {multiple_of} (align, or the matching opt- value)"
            )
        return value

    return parse


def _choice(choices: tuple[str, ...], meaning: str) -> Parser:
    def parse(key: str, text: str, settings: Settings) -> str:
        if text not in choices:
            raise Invalid(
                f'unknown {meaning} "{text}"{did_you_mean(text, choices)}'
                f" (one of {', '.join(choices)})"
            )
        return text

    return parse


def _on_off(key: str, text: str, settings: Settings) -> bool:
    if key == "locking" and text == "auto":
        return True  # QEMU: on where OFD locks exist, which is every Linux here
    return parse_bool(key, text)


def _whole(low: int, high: int) -> Parser:
    """Daemon tuning (image.py, fuseloop.py): a plain decimal number in [low, high]."""

    def parse(key: str, text: str, settings: Settings) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise Invalid(f'expects a whole number from {low} to {high}, not "{text}"')
        return value

    return parse


def _size_at_least(minimum: int) -> Parser:
    def parse(key: str, text: str, settings: Settings) -> int:
        value = parse_size(key, text)
        if value < minimum:
            raise Invalid(f'must be at least {minimum}, not "{value}"')
        return value

    return parse


def _atomic(key: str, text: str, settings: Settings) -> int:
    atomic = parse_size(key, text)
    if atomic < 512 or atomic > 1 << 30 or atomic & (atomic - 1):
        raise Invalid(f'must be a power of two from 512 to 1G, not "{text}"')
    return atomic


def _number(parse: Callable[[str, str], int]) -> Parser:
    return lambda key, text, settings: parse(key, text)


def _log_sector_size(key: str, text: str, settings: Settings) -> int:
    if settings.log_append:
        raise Invalid(
            "log-append and log-sector-size are mutually exclusive"
            " (an appended log keeps its own sector size)"
        )
    size = parse_size(key, text)
    if size < 32 or size >= 1 << 24 or size & (size - 1):  # QEMU's blk_log_writes_open bounds
        raise Invalid(f'must be a power of two from 32 to 8M, not "{text}"')
    return size


_MOUNT = "a blkfuse mount option"
_POWER = "a blkfuse extension option"
_TUNING = "blkfuse's own tuning"
# QEMU blklogwrites' options, under their names (README "Record and replay"): in QEMU they
# belong to a node below blkdebug, which rejects them.
_LOG = "a blklogwrites node under blkdebug in QEMU"

# In the order they are read and shown: QEMU's blkdebug options first.
OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("config", "config_path", _path("config file"), qemu=True, shown=False, value="PATH",
               help="the blkdebug config file (as --config)", example="rules.conf"),
    OptionSpec("image", "image", _plain, qemu=True, shown=False, value="PATH",
               help="blkdebug's image (must be the IMAGE argument)", example="disk.img"),
    OptionSpec("x-image", "image", _plain, qemu=True, shown=False, value="PATH",
               help="blkdebug's image, its older name", example="disk.img"),
    OptionSpec("align", "align", _align, qemu=True, value="SIZE",
               help="request alignment: unaligned requests are padded (read-modify-write)", example="4k"),
    OptionSpec("max-transfer", "max_transfer", _max_transfer, qemu=True, value="SIZE",
               help="split requests into pieces of at most this, each checked", example="64k"),
    OptionSpec("opt-write-zero", "opt_write_zero", _limit(None), qemu=True, value="SIZE",
               help="write-zeroes split at multiples of this", example="8k"),
    OptionSpec("max-write-zero", "max_write_zero", _limit("opt_write_zero"), qemu=True,
               value="SIZE", help="write-zeroes pieces at most this long", example="64k"),
    OptionSpec("opt-discard", "opt_discard", _limit(None), qemu=True, value="SIZE",
               help="discards split at multiples of this", example="8k"),
    OptionSpec("max-discard", "max_discard", _limit("opt_discard"), qemu=True, value="SIZE",
               help="discard pieces at most this long", example="64k"),
    OptionSpec("cache", "cache", _choice(CACHE_MODES, "cache mode (qemu-io -t)"),
               note="qemu-io -t {value}", value="MODE",
               help=f"qemu-io's -t: {' '.join(CACHE_MODES)} (default writeback)", example="unsafe"),
    OptionSpec("format", "format", _choice(FORMATS, "format"),
               note="qemu-io --image-opts driver=blkdebug,...", value="|".join(FORMATS),
               help="raw: the raw node over blkdebug (default); none: blkdebug alone", example="none"),
    OptionSpec("nonempty", "nonempty", _on_off, format_bool, note=_MOUNT, flag=True,
               value="on|off", help="mount over a directory that has entries", example="on"),
    OptionSpec("locking", "locking", _on_off, format_bool, note=_MOUNT, value="on|off|auto",
               help="lock the image as QEMU does (default on)", example="off"),
    OptionSpec("growable", "growable", _on_off, format_bool, note=_MOUNT, value="on|off",
               help="writes past the end and truncate resize the image (qsd's export)", example="on"),
    OptionSpec("track-unsynced", "track_unsynced", _on_off, format_bool, note=_POWER,
               value="on|off", help="keep the unsynced writes' undo log: powercut, drop-unsynced", example="on"),
    OptionSpec("unsynced-cap", "unsynced_cap", _size_at_least(4096), note=_POWER,
               needs="track-unsynced", value="SIZE",
               help="the undo log's cap (default 1G): a write past it fails ENOSPC", example="1M"),
    OptionSpec("atomic", "atomic", _atomic, note=_POWER, needs="track-unsynced", value="SIZE",
               help="the unit a random power cut keeps or loses (default 512)", example="4k"),
    OptionSpec("io-threads", "io_threads", _whole(0, 256), note=_TUNING,
               help="worker threads for disk I/O (default 4; 0: all inline)", example="2"),
    OptionSpec("poll-us", "poll_us", _whole(0, 100_000), note=_TUNING,
               help="busy-poll /dev/fuse this long before sleeping", example="0"),
    OptionSpec("log-writes", "log_writes", _path("log file"), note=_LOG, value="FILE",
               help="record every change and flush, dm-log-writes format (crash/recorder.py)",
               example="ops.log"),
    OptionSpec("log-append", "log_append", _on_off, format_bool, note=_LOG, needs="log-writes",
               value="on|off", help="append to the existing log instead of starting it over",
               example="on"),
    OptionSpec("log-sector-size", "log_sector_size", _log_sector_size, note=_LOG,
               needs="log-writes", value="SIZE",
               help="the log's sector size (default 512; not with log-append)", example="4k"),
    OptionSpec("log-super-update-interval", "log_super_update_interval",
               _number(parse_at_least(1)), note=_LOG, needs="log-writes",
               help="rewrite the log's superblock every N entries", example="64"),
    OptionSpec("qemu", "qemu", _choice(tuple(PROFILES), "QEMU profile"), value="|".join(PROFILES),
               about="QEMU {value}'s blkdebug and block layer",
               help="whose blkdebug and block layer to follow (default 7.2)", example="10.0"),
    OptionSpec("seed", "seed", _number(parse_at_least(0)),
               help="the seed of every random decision (default random; in the status)",
               example="7"),
)  # fmt: skip

BY_NAME = {spec.name: spec for spec in OPTIONS}
FLAG_OPTIONS = tuple(spec.name for spec in OPTIONS if spec.flag)
# What QEMU's blkdebug rejects (`blkfuse check --qemu` names them).
EXTENSION_OPTIONS = tuple(spec.name for spec in OPTIONS if not spec.qemu and not spec.about)


def unquote(value: str) -> str:
    """Option values need no quotes; a config-file habit of adding them is forgiven."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def read_options(options: dict[str, str], settings: Settings) -> None:
    """Set `settings` from the options of the table given in `options` (rules are not
    here). Raises Invalid prefixed with the option: 'option align: ...'."""
    for spec in OPTIONS:
        if spec.name not in options:
            continue
        if spec.needs and not getattr(settings, BY_NAME[spec.needs].field):
            needed = BY_NAME[spec.needs]
            value = "on" if needed.value == "on|off" else needed.value
            raise Invalid(f"option {spec.name}: only means something with {spec.needs}={value}")
        try:
            value = spec.parse(spec.name, unquote(options[spec.name]), settings)
        except Invalid as error:
            message = str(error).removeprefix(f"{spec.name} ")
            raise Invalid(f"option {spec.name}: {message}") from None
        setattr(settings, spec.field, value)


def summary(settings: Settings) -> list[str]:
    """`KEY=VALUE` for each given option blkfuse check shows, with why it is not portable."""
    parts = []
    for spec in OPTIONS:
        if spec.name not in settings.options or not spec.shown:
            continue
        value = getattr(settings, spec.field)
        part = f"{spec.name}={spec.format(value)}"
        if spec.about:
            part += f" ({spec.about.replace('{value}', spec.format(value))})"
        elif not spec.qemu:
            note = spec.note.replace("{value}", spec.format(value))
            part += f" (not portable: {note})" if note else " (not portable)"
        parts.append(part)
    return parts


def help_lines() -> list[str]:
    """`KEY=VALUE  help` per option, those QEMU's blkdebug rejects marked with *."""
    return listing.help_lines([(s.qemu, f"{s.name}={s.value}", s.help) for s in OPTIONS])


def markdown() -> str:
    """The README's option table."""
    return listing.markdown(
        ("option", "QEMU", "meaning"),
        (
            (
                f"`{s.name}={s.value}`",
                "yes"
                if s.qemu
                else f"no ({s.note or s.about or 'blkfuse'})".replace("{value}", "MODE"),
                s.help,
            )
            for s in OPTIONS
        ),
    )
