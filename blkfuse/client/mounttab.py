"""The kernel's mount table (/proc/self/mounts), read one way for the whole project.

The kernel writes space, tab, newline and backslash inside a field as octal escapes
(`\\040` for a space); every field is decoded here, so a mountpoint named "my mnt" compares
equal to the path a caller has. Paths are compared after os.path.realpath, which never needs
to stat a dead FUSE mount's root (it only resolves symlinks along the way).
"""

import os
import re
from typing import NamedTuple

MOUNTS = "/proc/self/mounts"
# The same table with each mount's device number (major:minor), which /proc/self/mounts lacks:
# a loop device's mounts are found by number, however its source is spelt.
MOUNTINFO = "/proc/self/mountinfo"

# How a blkfuse mount shows in the table (daemon.py mounts with fsname=blkfuse,subtype=blkfuse).
FSTYPE = "fuse.blkfuse"
SOURCE = "blkfuse"

_ESCAPE = re.compile(r"\\([0-7]{3})")


class Entry(NamedTuple):
    """One line of the mount table, fields decoded."""

    source: str
    mountpoint: str
    fstype: str
    options: str

    @property
    def is_blkfuse(self) -> bool:
        return self.fstype == FSTYPE or (self.source == SOURCE and self.fstype.startswith("fuse"))


def unescape(field: str) -> str:
    """A mount-table field with its octal escapes decoded."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Entry]:
    """The entries of a mount table's text (lines with fewer than four fields are skipped)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            entries.append(Entry(*(unescape(f) for f in fields[:4])))
    return entries


def entries(path: str = MOUNTS) -> list[Entry]:
    """Every mount this process can see ([] if the table cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return parse(f.read())
    except OSError:
        return []


def find(path: str | os.PathLike[str]) -> Entry | None:
    """The topmost mount at `path`, or None when nothing is mounted there."""
    target = os.path.realpath(path)
    found = None
    for entry in entries():
        if entry.mountpoint == target:
            found = entry  # later lines are mounted on top of earlier ones
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Something is mounted at `path` (a dead FUSE mount included)."""
    return find(path) is not None


def is_blkfuse_mount(path: str | os.PathLike[str]) -> bool:
    """A blkfuse mount is at `path` (live or with its daemon gone)."""
    entry = find(path)
    return entry is not None and entry.is_blkfuse


def blkfuse_mounts() -> list[Entry]:
    """Every blkfuse mount this process can see."""
    return [e for e in entries() if e.is_blkfuse]


def mountpoints_of(devices: set[str], path: str = MOUNTINFO) -> list[str]:
    """Where the block devices `devices` ("major:minor", as /sys/block/*/dev says) are
    mounted, in table order ([] if the table cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        fields = line.split()  # ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ...
        if len(fields) >= 5 and fields[2] in devices:
            found.append(unescape(fields[4]))
    return found
