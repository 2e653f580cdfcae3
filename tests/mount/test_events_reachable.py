"""`blkfuse events` says which events and io types a request through a mount reaches: checked
against a real mount driven by every call the FUSE layer passes on (read, write, an unaligned
write, fsync, an O_DSYNC write, fallocate ZERO_RANGE and PUNCH_HOLE, lseek), so what the
command says cannot go stale.

The test reads the command's own output, not the constants behind it.
"""

import os
import re

from blkfuse.block.image import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)

from conftest import blkfuse

BLOCK = 4096


def what_events_says() -> tuple[set[str], set[str], set[str], set[str]]:
    """(reachable events, unreachable events, reachable io types, unreachable io types), as
    `blkfuse events` prints them."""
    r = blkfuse("events")
    assert r.returncode == 0, r.stderr
    events_part, iotypes_part = r.stdout.split("io types", 1)
    reachable, unreachable = set(), set()
    for line in events_part.splitlines()[1:]:
        m = re.fullmatch(r"  ([* ]) (\S+)(?:  \(also .*\))?", line)
        assert m, f"unexpected line in `blkfuse events`: {line!r}"
        (reachable if m.group(1) == "*" else unreachable).add(m.group(2))
    io_reached, io_never = set(), set()
    for line in iotypes_part.splitlines()[1:]:
        name = line.split()[0]
        (io_never if "never reached" in line else io_reached).add(name)
    return reachable, unreachable, io_reached, io_never


def drive_every_call(path) -> None:
    """One of each call the FUSE layer passes to the block layer."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pread(fd, BLOCK, 0)
        os.pwrite(fd, b"a" * BLOCK, 0)
        os.pwrite(fd, b"b" * (3 * BLOCK), 100)  # unaligned at both ends: read-modify-write
        os.fsync(fd)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 8 * BLOCK, 2 * BLOCK)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 12 * BLOCK, 2 * BLOCK)
        os.lseek(fd, 0, os.SEEK_DATA)
        os.lseek(fd, 0, os.SEEK_HOLE)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_DSYNC)
    try:
        os.pwrite(fd, b"c" * BLOCK, 16 * BLOCK)
    finally:
        os.close(fd)


def test_events_names_exactly_the_events_and_io_types_a_mount_raises(mount):
    reachable, unreachable, io_reached, io_never = what_events_says()
    assert reachable and unreachable and io_reached
    m = mount("-o", "align=4096", size=1 << 20)
    # One errno-0 rule per io type: it lets its requests through and counts them (hits).
    ids = {}
    for iotype in sorted(io_reached | io_never):
        answer = m.ctl(f"inject-error event=none iotype={iotype} errno=0")
        ids[iotype] = int(re.search(r"added rule (\d+)", answer).group(1))
    drive_every_call(m.file)
    status = m.status()
    raised = set(status["events"])  # the engine's counts, `none` (at mount) included
    assert raised == reachable, (
        f"said reachable but not raised: {sorted(reachable - raised)}; "
        f"raised but said unreachable: {sorted(raised - reachable)}"
    )
    assert not raised & unreachable
    hits = {r["id"]: r["hits"] for r in status["rules"]}
    met = {iotype for iotype, rule_id in ids.items() if hits[rule_id]}
    assert met == io_reached, (
        f"said reached but met no rule: {sorted(io_reached - met)}; "
        f"met a rule but said never reached: {sorted(met - io_reached)}"
    )
