"""QEMU profiles: whose blkdebug and block layer blkfuse follows (`-o qemu=7.2|10.0`).

blkfuse reproduces QEMU's blkdebug and the block layer around it. Where QEMU versions answer
differently, each difference is one switch here, and the engine and the block layer consult
the profile instead of knowing versions. The default is 7.2 (the seeds' blkdebug.c, Debian
12's qemu-utils); 10.0 is Debian 13's. docs/design.md ("QEMU profiles") has a row per switch
with the test that shows it; the live differential tests pick the profile of the qemu-io
they run against (`qemu-io --version`).
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass

from blkfuse.rules.model import InjectError, Rule


@dataclass(frozen=True)
class Profile:
    name: str
    # blkdebug's rule_check: a `once` rule whose errno is 0 is spent when it matches (10.0),
    # or stays armed because errno 0 returns before the once removal (7.2).
    once_spends_errno0: bool
    # A FUA write (cache writethrough/directsync, O_DSYNC, RWF_DSYNC): 7.2's raw and blkdebug
    # nodes emulate FUA with a flush after the write (flush_to_os/flush_to_disk and a flush
    # check); 10.0 passes FUA down to the file, which writes with RWF_DSYNC: no flush, no
    # flush events, no flush check.
    fua_is_a_flush: bool
    # fallocate(PUNCH_HOLE|KEEP_SIZE) through the FUSE export: a discard (7.2: iotype
    # discard, no event, pieces it cannot discard dropped), or a write-zeroes that may unmap
    # and must not fall back (10.0: pwritev_zero/pwritev_done, iotype write-zeroes, and
    # ENOTSUP where padding or a write of zeroes would be needed). Measured with qsd 10.0.13.
    punch_hole_is_write_zeroes: bool


QEMU_7_2 = Profile(
    name="7.2", once_spends_errno0=False, fua_is_a_flush=True, punch_hole_is_write_zeroes=False
)
QEMU_10_0 = Profile(
    name="10.0", once_spends_errno0=True, fua_is_a_flush=False, punch_hole_is_write_zeroes=True
)

PROFILES = {p.name: p for p in (QEMU_7_2, QEMU_10_0)}
DEFAULT = QEMU_7_2


def profile(name: str) -> Profile:
    """The profile called `name` ("7.2", "10.0"); KeyError for another."""
    return PROFILES[name]


def for_version(version_text: str) -> Profile:
    """The profile for a QEMU version as `qemu-io --version` prints it ("qemu-io version
    10.0.13 (Debian ...)"): the newest profile not newer than that version."""
    m = re.search(r"version (\d+)\.(\d+)", version_text)
    if not m:
        raise ValueError(f"no QEMU version in {version_text!r}")
    have = (int(m.group(1)), int(m.group(2)))
    fitting = [p for p in PROFILES.values() if _key(p) <= have]
    return max(fitting, key=_key) if fitting else DEFAULT


def _key(p: Profile) -> tuple[int, int]:
    major, minor = p.name.split(".")
    return int(major), int(minor)


def profile_notes(profile: Profile, rules: Iterable[Rule], cache: str) -> list[str]:
    """What the profile changes for these rules and this cache mode, one line each, for
    `blkfuse check` (so a config written for one QEMU shows where the other differs)."""
    notes = []
    for rule in rules:
        if isinstance(rule, InjectError) and rule.once and rule.errno == 0:
            if profile.once_spends_errno0:
                what = "spent by its first match (QEMU 10.0; 7.2 keeps it armed)"
            else:
                what = "stays armed after a match (QEMU 7.2; 10.0 spends it)"
            notes.append(f"{rule.source}: once with errno 0: {what}")
    if cache in ("writethrough", "directsync"):
        if profile.fua_is_a_flush:
            what = "a flush after each write (flush_to_os/flush_to_disk, a flush check)"
        else:
            what = "FUA writes to the file: no flush, no flush events or check"
        notes.append(f"cache={cache} under QEMU {profile.name}: {what}")
    return notes
