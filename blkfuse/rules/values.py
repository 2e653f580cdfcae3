"""The value grammars every vocabulary shares: numbers as QEMU reads them, on/off, sizes,
durations, errno names. One grammar each: the config file, `-o`, the control file and the
Python API (`Mount(size=...)`) all read a size or a duration here.

A parser takes (key, text) and returns the value or raises Invalid, whose text says what is
wrong without saying where: the caller knows the file and line, or the option, and adds it.
"""

import difflib
import errno as errno_module
import re
from collections.abc import Callable, Iterable
from fractions import Fraction

# A FUSE reply carries -errno and the kernel refuses anything at or below -512 (-ERESTARTSYS).
MAX_ERRNO = 511
UINT64_MAX = 2**64 - 1
INT_MAX = 2**31 - 1  # QEMU keeps states, align and max-transfer in an int
INT64_MAX = 2**63 - 1


class Invalid(ValueError):
    """A bad value, before the caller knows where it came from (it adds the location)."""


class InvalidEvent(Invalid):
    """An event name that does not exist (the control file answers ENOENT for it)."""


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


# ---- numbers ------------------------------------------------------------------------------

# QEMU reads numbers with qemu_strtou64(base 0): C whitespace, a sign, then 0x hex,
# 0-led octal or decimal, and nothing after. Explicit digit classes keep Unicode digits out.
_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def parse_number(key: str, text: str) -> int:
    """A QEMU_OPT_NUMBER value as a Python int (negative only when written with '-')."""
    match = _NUMBER.match(text)
    if match is None:
        raise Invalid(f'{key} expects a number (decimal, 0x hex or 0-led octal), not "{text}"')
    sign, digits = match.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits[0] == "0":
        value = int(digits, 8)
    else:
        value = int(digits)
    if value > UINT64_MAX:
        raise Invalid(f'{key} "{text}" is too large')
    return -value if sign == "-" else value


def parse_at_least(minimum: int, maximum: int = INT64_MAX) -> Callable[[str, str], int]:
    """A parser of whole numbers from `minimum` to `maximum`."""

    def parse(key: str, text: str) -> int:
        value = parse_number(key, text)
        if value < minimum:
            raise Invalid(f'{key} must be at least {minimum}, not "{text}"')
        if value > maximum:
            raise Invalid(f'{key} "{text}" is too large (at most {maximum})')
        return value

    return parse


def parse_choice(choices: tuple[str, ...], what: str = "") -> Callable[[str, str], str]:
    """A parser of one word of `choices`; `what` says what the choice is, for the message."""

    def parse(key: str, text: str) -> str:
        if text not in choices:
            raise Invalid(
                f'{key} expects one of {", ".join(choices)}{what}, not "{text}"'
                f"{did_you_mean(text, choices)}"
            )
        return text

    return parse


# ---- on/off -------------------------------------------------------------------------------

BOOLEANS = {
    "on": True,
    "yes": True,
    "true": True,
    "y": True,
    "off": False,
    "no": False,
    "false": False,
    "n": False,
}


def parse_bool(key: str, text: str) -> bool:
    # QEMU's qapi_bool_parse: these lower-case words only; "1", "0" and "ON" are errors.
    try:
        return BOOLEANS[text]
    except KeyError:
        raise Invalid(
            f'{key} expects on or off (or yes/no, true/false, y/n), not "{text}"'
        ) from None


def format_bool(value: bool) -> str:
    return "on" if value else "off"


# ---- errno --------------------------------------------------------------------------------

ERRNO_NAMES = {
    name: getattr(errno_module, name)
    for name in dir(errno_module)
    if name.startswith("E") and name.isupper()
}


def parse_errno(key: str, text: str) -> int:
    """A number, or (an extension) an errno name such as ENOSPC."""
    name = text.strip()
    if name[:1].isalpha():
        if name in ERRNO_NAMES:
            return ERRNO_NAMES[name]
        raise Invalid(f'unknown errno name "{text}"{did_you_mean(name, ERRNO_NAMES)}')
    value = parse_number(key, text)
    if value < 0:
        raise Invalid(
            f'errno must not be negative, not "{text}" (QEMU would silently '
            "skip the I/O; use a positive errno, or 0 to let requests through)"
        )
    if value > MAX_ERRNO:
        raise Invalid(f'errno "{text}" is too large: a FUSE reply carries at most {MAX_ERRNO}')
    return value


# ---- sizes --------------------------------------------------------------------------------

# QEMU_OPT_SIZE (qemu_strtosz): decimal with an optional fraction, or hex; an optional unit
# letter, binary (k is 1024). Exactly QEMU's: "4kB", "4 k" and "1GiB" are refused, as QEMU does.
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
SIZE_EXAMPLES = "like 4096, 4k, 1.5G or 1M"


def parse_size(key: str, text: str) -> int:
    """Bytes from '4096', '4k', '1.5G', '0x1000' (a fraction of a byte is dropped)."""
    match = _SIZE.match(text)
    if match is None:
        raise Invalid(f'{key} expects a size ({SIZE_EXAMPLES}), not "{text}"')
    number, unit = match.groups()
    scale = _SIZE_UNITS[unit.lower()]
    if number[:2] in ("0x", "0X"):
        value = int(number[2:], 16) * scale
    else:
        whole, _, fraction = number.partition(".")
        value = int(whole) * scale + (
            int(fraction) * scale // 10 ** len(fraction) if fraction else 0
        )
    if value > UINT64_MAX:
        raise Invalid(f'{key} "{text}" is too large')
    return value


# ---- durations ----------------------------------------------------------------------------

# Units, largest first; a duration is one or more NUMBER UNIT parts with units in this order:
# 1h30m, 1m30.5s, 250ms, 1.5s, 200us.
_DURATION_UNITS: dict[str, int | Fraction] = {
    "h": 3600 * 1000000,
    "m": 60 * 1000000,
    "s": 1000000,
    "ms": 1000,
    "us": 1,
    "µs": 1,
    "ns": Fraction(1, 1000),
}
_UNIT_RANK = {"h": 0, "m": 1, "s": 2, "ms": 3, "us": 4, "µs": 4, "ns": 5}
_DURATION_PART = re.compile(r"[ \t]*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*(ns|us|µs|ms|s|m|h)")
MAX_DURATION_US = 24 * 3600 * 1000000
DURATION_EXAMPLES = "like 200us, 10ms, 1.5s, 90m or 1h30m; units h m s ms us ns"


def parse_duration(key: str, text: str) -> int:
    """'200us', '10ms', '1.5s', '90m', '1h30m' -> microseconds (the unit is not optional:
    '10' means nothing). At most 24 hours."""
    total: Fraction = Fraction(0)
    position, last_rank, parts = 0, -1, 0
    while True:
        match = _DURATION_PART.match(text, position)
        if match is None:
            break
        number, unit = match.groups()
        if _UNIT_RANK[unit] <= last_rank:
            raise Invalid(
                f'{key} "{text}": give each unit once, largest first (like 1h30m or 1s500ms)'
            )
        last_rank = _UNIT_RANK[unit]
        total += Fraction(number) * _DURATION_UNITS[unit]
        position, parts = match.end(), parts + 1
    if not parts or text[position:].strip():
        raise Invalid(f'{key} expects a duration with a unit ({DURATION_EXAMPLES}), not "{text}"')
    micros = round(total)
    if micros > MAX_DURATION_US:
        raise Invalid(f'{key} "{text}" is too long (at most 24 hours)')
    if micros == 0 and total:
        raise Invalid(f'{key} "{text}" is shorter than the 1us it is counted in')
    return micros


def format_duration(micros: int) -> str:
    """Microseconds as the shortest exact one-unit duration: 1500000 -> '1500ms', 2000000 ->
    '2s', 5400000000 -> '90m' (what parse_duration reads back)."""
    for unit in ("h", "m", "s", "ms"):
        scale = int(_DURATION_UNITS[unit])
        if micros and micros % scale == 0:
            return f"{micros // scale}{unit}"
    return f"{micros}us"
