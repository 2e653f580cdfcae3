"""Replaying a dm-log-writes log onto a file or block device (`blkfuse replay`), with
xfstests replay-log's options and their meaning:

    start        --start-mark M: after the first mark named M (entries before it are
                 skipped, not replayed); else --start-entry N (default 0)
    stop         after --limit N entries, or at the first entry that --next-flush (a FLUSH),
                 --next-fua (a FUA) or --end-mark M (the mark M; inclusive) asks for; with
                 --end-mark, --next-flush/--next-fua only stop at that mark, as replay-log
    --find       replay nothing: print `INDEX@SECTOR` of the entry the stop options find
                 (SECTOR: the log sector after it), exit 1 if none
    --num-entries  print the superblock's entry count
    --check N|flush|fua|discard --fsck CMD
                 fsync the target and run CMD (a shell command) after every N-th replayed
                 entry, or each FLUSH / FUA / discard entry (discard: a blkfuse addition);
                 a failing CMD stops the replay (exit 1)
    --no-discard skip discard entries

Each write entry is written at its sector. A discard punches a hole (a regular file) or is
BLKDISCARD (a block device); where that is refused, zeroes are written, always (replay-log
skips zeroing above 128 MiB; an exact image needs them). A `resize:SIZE` mark (what blkfuse's
recorder logs for a resize) truncates a regular-file target to SIZE; other marks and
flushes change nothing. The target is fsynced at the end.
"""

import errno as _errno
import fcntl
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from blkfuse.block.image import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from blkfuse.crash.logwrites import FLUSH, FUA, MARK, LogEntry, Superblock, read_log
from blkfuse.crash.recorder import parse_resize_mark

BLKDISCARD = 0x1277  # _IO(0x12, 119)
_ZERO_CHUNK = 1 << 20


class ReplayError(Exception):
    """The replay cannot go on; str() says why (the CLI prints it and exits 1)."""


@dataclass
class ReplayOptions:
    limit: int = 0
    start_entry: int = 0
    start_mark: str | None = None
    end_mark: str | None = None
    next_flush: bool = False
    next_fua: bool = False
    find: bool = False
    num_entries: bool = False
    discard: bool = True
    check: str | None = None  # a number, "flush", "fua" or "discard"
    fsck: str | None = None
    verbose: int = 0

    @property
    def stop_flags(self) -> int:
        flags = FLUSH if self.next_flush else 0
        flags |= FUA if self.next_fua else 0
        return flags | (MARK if self.end_mark is not None else 0)


def should_stop(entry: LogEntry, stop_flags: int, mark: str | None) -> bool:
    """replay-log's should_stop: the entry has a flag asked for; if a mark is asked for,
    only that mark stops."""
    if not entry.flags & stop_flags:
        return False
    if not stop_flags & MARK:
        return True
    return entry.is_mark and entry.mark == mark


class Target:
    """The file or block device entries are replayed onto."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.is_file = stat.S_ISREG(os.fstat(self.fd).st_mode)
        self._discard_refused = False

    def apply(self, entry: LogEntry, sectorsize: int, *, discard: bool = True) -> None:
        """Replay one entry (data must have been read)."""
        if entry.is_mark:
            size = parse_resize_mark(entry.mark)
            if size is not None and self.is_file:
                os.ftruncate(self.fd, size)
            return
        if entry.is_discard:
            if discard and entry.nr_sectors:
                self.discard(entry.sector * sectorsize, entry.nr_sectors * sectorsize)
            return
        if entry.data is not None:
            self.pwrite(entry.sector * sectorsize, entry.data)

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def discard(self, offset: int, length: int) -> None:
        if not self._discard_refused:
            try:
                if self.is_file:
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                else:
                    fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
                return
            except OSError as error:
                if error.errno not in (
                    _errno.EOPNOTSUPP,
                    _errno.ENOTTY,
                    _errno.EINVAL,
                    _errno.ENOSYS,
                ):
                    raise
                self._discard_refused = True
        zeros = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            count = min(len(zeros), end - offset)
            self.pwrite(offset, zeros[:count])
            offset += count

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _next_sector(entry: LogEntry, at: int) -> int:
    """The log sector after `entry`, which starts at log sector `at`."""
    return at + 1 + (0 if entry.is_discard else entry.nr_sectors)


def _positioned(entries: Iterator[LogEntry]) -> Iterator[tuple[LogEntry, int]]:
    """Each entry with the log sector after it (what replay-log prints as @SECTOR)."""
    at = 1
    for entry in entries:
        at = _next_sector(entry, at)
        yield entry, at


def _skip_to_start(
    positioned: Iterator[tuple[LogEntry, int]], superblock: Superblock, opts: ReplayOptions
) -> None:
    if opts.start_mark is not None:
        for entry, _ in positioned:
            if entry.is_mark and entry.mark == opts.start_mark:
                return
        raise ReplayError("Couldn't find starting mark")
    if opts.start_entry and opts.start_entry >= superblock.nr_entries:
        raise ReplayError("Invalid entry number")
    for _ in range(opts.start_entry):
        next(positioned)


def _check_due(opts: ReplayOptions, entry: LogEntry, replayed: int) -> bool:
    if opts.check is None:
        return False
    if opts.check == "flush":
        return entry.is_flush
    if opts.check == "fua":
        return entry.is_fua
    if opts.check == "discard":
        return entry.is_discard
    return replayed % int(opts.check, 0) == 0


def validate(opts: ReplayOptions) -> None:
    """Refuse what replay-log refuses (--check without --fsck and the reverse, a bad
    --check); ReplayError says what."""
    if (opts.check is None) != (opts.fsck is None):
        raise ReplayError("--check and --fsck go together")
    if opts.check is not None and opts.check not in ("flush", "fua", "discard"):
        try:
            number = int(opts.check, 0)
        except ValueError:
            number = 0
        if number <= 0:
            raise ReplayError(
                f'--check: expects a number of entries, flush, fua or discard, not "{opts.check}"'
            )


def replay(
    log_path: str, target_path: str | None, opts: ReplayOptions, out: Callable[[str], None] = print
) -> int:
    """Run a replay as `blkfuse replay` does; the exit status. ReplayError for a bad log
    or bad options (LogFormatError, a ValueError, for a log that is not one)."""
    validate(opts)
    superblock, entries = read_log(log_path, data=target_path is not None and not opts.find)
    positioned = _positioned(entries)
    _skip_to_start(positioned, superblock, opts)
    stop_flags = opts.stop_flags
    if opts.find:
        found = 0
        for entry, after in positioned:
            found += 1
            if (opts.limit and found == opts.limit) or should_stop(
                entry, stop_flags, opts.end_mark
            ):
                out(f"{entry.index}@{after}")
                return 0
        print("Couldn't find entry", file=sys.stderr)
        return 1
    if opts.num_entries:
        out(str(superblock.nr_entries))
        return 0
    if target_path is None:
        out(f"Log version=1, sectorsize={superblock.sectorsize}, entries={superblock.nr_entries}")
        return 0
    target = Target(target_path)
    status = 0
    try:
        replayed = 0
        stopped = False
        for entry, after in positioned:
            if opts.verbose:
                size = entry.nr_sectors * superblock.sectorsize
                header_end = after - (0 if entry.is_discard else entry.nr_sectors)
                out(  # replay-log's line: the position is the log sector after the header
                    f"replaying {entry.index}@{header_end}: sector {entry.sector}, size {size}, "
                    f"flags {entry.flags:#x}({entry.flags_text})"
                    + (f" mark {entry.mark}" if entry.mark is not None else "")
                )
            target.apply(entry, superblock.sectorsize, discard=opts.discard)
            replayed += 1
            if opts.fsck is not None and _check_due(opts, entry, replayed):
                target.fsync()
                if subprocess.run(opts.fsck, shell=True).returncode != 0:
                    print(f"Fsck errored out on entry {entry.index}", file=sys.stderr)
                    status = 1
                    break
            if (opts.limit and replayed == opts.limit) or should_stop(
                entry, stop_flags, opts.end_mark
            ):
                stopped = True
                break
        if not stopped and status == 0 and opts.end_mark is not None:
            print(
                f'end mark "{opts.end_mark}" not found: replayed to the end of the log',
                file=sys.stderr,
            )
        target.fsync()
    finally:
        target.close()
    return status
