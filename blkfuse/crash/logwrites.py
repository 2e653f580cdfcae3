"""The dm-log-writes log format, version 1: the one place that reads and writes it.

The kernel's dm-log-writes, xfstests' replay-log and QEMU's blklogwrites driver share it.
All fields are little-endian; a "sector" is the log's sector size (`sectorsize`, a power of
two, 512 by default), and every position and length in the log counts in those sectors:

    sector 0        the superblock: magic 0x6a736677736872, version 1, nr_entries (u64 each),
                    sectorsize (u32), zero-padded to one sector
    sector 1 on     the entries, one after the other; each is one header sector (sector,
                    nr_sectors, flags, data_len: u64 each, then zeroes) followed, unless it is
                    a discard, by its nr_sectors sectors of data

Flags: FLUSH 1, FUA 2, DISCARD 4, MARK 8. A flush is an entry with no sectors. A mark has no
sectors either: its name is stored inside its header sector right after the four fields, with
data_len its length in bytes, as the kernel's log_mark() stores it. replay-log rejects a header
whose first byte after the fields is not zero unless the entry is exactly a mark, and a header
with neither flags nor sectors; the writer never produces either.

The superblock's nr_entries is what readers trust: entries written after the last superblock
update are invisible to them unless asked for (`read_log(..., trailing=True)`). The writer
rewrites it (and fsyncs the log) on every flush and every `super_update_interval` entries, as
QEMU's driver does.
"""

import dataclasses
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH = 1
FUA = 2
DISCARD = 4
MARK = 8
FLAG_MASK = FLUSH | FUA | DISCARD | MARK
DEFAULT_SECTOR_SIZE = 512
DEFAULT_SUPER_UPDATE_INTERVAL = 4096

_SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize
_ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len
ENTRY_HEADER_BYTES = _ENTRY.size

Bytes = bytes | bytearray | memoryview

_FLAG_NAMES = ((FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"), (MARK, "MARK"))


class LogFormatError(ValueError):
    """The file is not a valid dm-log-writes v1 log (or not at the place read)."""


def sector_size_valid(sectorsize: int) -> bool:
    """QEMU's rule: a power of two that holds a header, below 16 MiB."""
    return (
        sectorsize > 0
        and sectorsize & (sectorsize - 1) == 0
        and sectorsize >= ENTRY_HEADER_BYTES
        and sectorsize < 1 << 24
    )


def max_mark_length(sectorsize: int) -> int:
    """The longest mark name in bytes: the header sector minus the fields and a final NUL."""
    return sectorsize - ENTRY_HEADER_BYTES - 1


def flags_text(flags: int) -> str:
    """`FLUSH|FUA`, `NONE`, or with unknown bits `UNKNOWN.0x..` (replay-log's spelling)."""
    names = [name for bit, name in _FLAG_NAMES if flags & bit]
    if flags & ~FLAG_MASK:
        names.append(f"UNKNOWN.{flags & ~FLAG_MASK:#x}")
    return "|".join(names) or "NONE"


@dataclass(frozen=True)
class Superblock:
    nr_entries: int
    sectorsize: int
    magic: int = MAGIC
    version: int = VERSION

    def pack(self) -> bytes:
        raw = _SUPER.pack(self.magic, self.version, self.nr_entries, self.sectorsize)
        return raw.ljust(self.sectorsize, b"\0")


@dataclass(frozen=True)
class LogEntry:
    """One entry. `sector` and `nr_sectors` count log sectors. `data` is the entry's data
    (nr_sectors sectors) for an entry that carries some, else None (a discard, a flush, a
    mark, or when read with data=False). `mark` is a mark's name, else None."""

    index: int
    sector: int
    nr_sectors: int
    flags: int
    data: bytes | None = None
    mark: str | None = None

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & FLUSH)

    @property
    def is_fua(self) -> bool:
        return bool(self.flags & FUA)

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & DISCARD)

    @property
    def is_mark(self) -> bool:
        return bool(self.flags & MARK)

    @property
    def is_write(self) -> bool:
        """Carries data to put on the disk (a plain, FUA or flush-with-data write)."""
        return self.nr_sectors > 0 and not self.flags & (DISCARD | MARK)

    @property
    def flags_text(self) -> str:
        return flags_text(self.flags)


def _header(sector: int, nr_sectors: int, flags: int, payload: bytes, sectorsize: int) -> bytes:
    return (_ENTRY.pack(sector, nr_sectors, flags, len(payload)) + payload).ljust(sectorsize, b"\0")


class LogWriter:
    """Appends entries to a log file (or block device), keeping the superblock current.

    Without `append` the log starts empty: a regular file is truncated and a superblock with
    no entries written at once (QEMU writes none until the first flush; starting with one
    makes a log that saw no flush readable). With `append` the log continues an existing one
    (its sector size wins; an empty file starts a new log), as QEMU's log-append does.

    Every append is one positioned write of header and data; the superblock is rewritten and
    the log fsynced on each flush entry and each `super_update_interval`-th entry, and by
    `sync()`. With autosync=False the superblock is rewritten then but the fsync is left
    to the caller (`sync_due` says it is due; `fsync()`), who may run it off its event
    loop. Data lengths must be whole log sectors (the recorder aligns them)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sectorsize: int | None = None,
        append: bool = False,
        super_update_interval: int = DEFAULT_SUPER_UPDATE_INTERVAL,
        autosync: bool = True,
    ) -> None:
        if append and sectorsize is not None:
            raise ValueError("log-append and log-sector-size are mutually exclusive")
        if super_update_interval < 1:
            raise ValueError(f"invalid log superblock update interval {super_update_interval}")
        self.path = os.fspath(path)
        self.super_update_interval = super_update_interval
        self.autosync = autosync
        self.sync_due = False  # autosync off: the superblock was updated, fsync() is due
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._open(sectorsize, append)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, sectorsize: int | None, append: bool) -> None:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if append and size:
            superblock = _read_super(self.fd, self.path)
            self.sectorsize = superblock.sectorsize
            self.nr_entries = superblock.nr_entries
            self.next_sector = _end_of_entries(self.fd, superblock, self.path)
            return
        self.sectorsize = DEFAULT_SECTOR_SIZE if sectorsize is None else sectorsize
        if not sector_size_valid(self.sectorsize):
            raise ValueError(f"invalid log sector size {self.sectorsize}")
        self.nr_entries = 0
        self.next_sector = 1
        if not append and _is_regular(self.fd):
            os.ftruncate(self.fd, 0)
        self.sync()

    # --- appending ---------------------------------------------------------------------
    def write(self, sector: int, data: Bytes, *, fua: bool = False) -> int:
        """A write of `data` (whole sectors) at `sector`; returns the entry's index."""
        if len(data) % self.sectorsize or not data:
            raise ValueError(f"write of {len(data)} bytes is not whole log sectors")
        flags = FUA if fua else 0
        header = _header(sector, len(data) // self.sectorsize, flags, b"", self.sectorsize)
        return self._append([header, data], len(data) // self.sectorsize, flags)

    def write_zeroes(self, sector: int, nr_sectors: int, *, fua: bool = False) -> int:
        """A write-zeroes, logged as a write of zero data as QEMU's driver logs it."""
        if nr_sectors < 1:
            raise ValueError("write-zeroes of no sectors")
        flags = FUA if fua else 0
        header = _header(sector, nr_sectors, flags, b"", self.sectorsize)
        zeroes = bytes(nr_sectors * self.sectorsize)
        return self._append([header, zeroes], nr_sectors, flags)

    def discard(self, sector: int, nr_sectors: int) -> int:
        """A discard: the range only, no data follows."""
        header = _header(sector, nr_sectors, DISCARD, b"", self.sectorsize)
        return self._append([header], 0, DISCARD)

    def flush(self) -> int:
        """A flush entry; rewrites the superblock and fsyncs the log."""
        return self._append([_header(0, 0, FLUSH, b"", self.sectorsize)], 0, FLUSH)

    def mark(self, name: str) -> int:
        """A mark named `name`, stored in its header sector as the kernel stores it."""
        raw = name.encode()
        if not raw or b"\0" in raw or len(raw) > max_mark_length(self.sectorsize):
            raise ValueError(
                f"mark name must be 1 to {max_mark_length(self.sectorsize)} bytes "
                f"without NUL, got {len(raw)}"
            )
        return self._append([_header(0, 0, MARK, raw, self.sectorsize)], 0, MARK)

    def _append(self, parts: list[Bytes], data_sectors: int, flags: int) -> int:
        offset = self.next_sector * self.sectorsize
        expected = sum(len(p) for p in parts)
        written = os.pwritev(self.fd, parts, offset)
        if written != expected:  # a short write to a regular file: the log's disk is full
            raise OSError(28, f"short write to log {self.path}")
        self.next_sector += 1 + data_sectors
        index = self.nr_entries
        self.nr_entries += 1
        if flags & FLUSH or self.nr_entries % self.super_update_interval == 0:
            if self.autosync:
                self.sync()
            else:
                self.update_super()
                self.sync_due = True
        return index

    # --- superblock ----------------------------------------------------------------------
    def update_super(self) -> None:
        """Write the superblock with the current entry count (no fsync)."""
        raw = Superblock(self.nr_entries, self.sectorsize).pack()
        if os.pwrite(self.fd, raw, 0) != len(raw):
            raise OSError(28, f"short write to log {self.path}")

    def sync(self) -> None:
        """Superblock, then fsync: every entry so far is durable and visible to readers."""
        self.update_super()
        os.fsync(self.fd)

    def fsync(self) -> None:
        """fsync the log (what autosync=False leaves to the caller, e.g. in a thread)."""
        self.sync_due = False
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- reading -----------------------------------------------------------------------------
def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _pread_exact(fd: int, size: int, offset: int, path: str, what: str) -> bytes:
    raw = os.pread(fd, size, offset)
    if len(raw) != size:
        raise LogFormatError(f"{path}: truncated {what} at byte {offset}")
    return raw


def _read_super(fd: int, path: str) -> Superblock:
    raw = os.pread(fd, _SUPER.size, 0)
    if len(raw) < _SUPER.size:
        raise LogFormatError(f"{path}: too short for a dm-log-writes superblock")
    magic, version, nr_entries, sectorsize = _SUPER.unpack(raw)
    if magic != MAGIC:
        raise LogFormatError(f"{path}: not a dm-log-writes log (magic {magic:#x})")
    if version != VERSION:
        raise LogFormatError(f"{path}: unsupported log version {version}")
    if not sector_size_valid(sectorsize):
        raise LogFormatError(f"{path}: invalid log sector size {sectorsize}")
    return Superblock(nr_entries, sectorsize, magic, version)


def _parse_header(raw: bytes, index: int, path: str, sectorsize: int, at: int) -> LogEntry:
    sector, nr_sectors, flags, data_len = _ENTRY.unpack_from(raw)
    if flags & ~FLAG_MASK:
        raise LogFormatError(f"{path}: invalid flags {flags:#x} in log entry {index}")
    if not flags and not nr_sectors:
        raise LogFormatError(f"{path}: empty log entry {index} (log sector {at})")
    mark = None
    if flags & MARK:
        if data_len > sectorsize - ENTRY_HEADER_BYTES:
            raise LogFormatError(f"{path}: mark of {data_len} bytes in log entry {index}")
        name = raw[ENTRY_HEADER_BYTES : ENTRY_HEADER_BYTES + data_len]
        mark = name.split(b"\0", 1)[0].decode(errors="replace")
    return LogEntry(index, sector, nr_sectors, flags, None, mark)


def _end_of_entries(fd: int, superblock: Superblock, path: str) -> int:
    """The log sector after the superblock's last entry (where an append goes)."""
    at = 1
    for index in range(superblock.nr_entries):
        raw = _pread_exact(fd, superblock.sectorsize, at * superblock.sectorsize, path, "entry")
        entry = _parse_header(raw, index, path, superblock.sectorsize, at)
        at += 1 + (0 if entry.is_discard else entry.nr_sectors)
    return at


def _entries(
    path: str, superblock: Superblock, *, data: bool, trailing: bool
) -> Iterator[LogEntry]:
    sectorsize = superblock.sectorsize
    with open(path, "rb", buffering=0) as log:
        fd = log.fileno()
        at = 1
        index = 0
        while True:
            if index >= superblock.nr_entries:
                if not trailing:
                    return
                raw = os.pread(fd, sectorsize, at * sectorsize)
                if len(raw) < sectorsize:
                    return
                try:
                    entry = _parse_header(raw, index, path, sectorsize, at)
                except LogFormatError:
                    return  # past the superblock a bad header is just the end
            else:
                raw = _pread_exact(fd, sectorsize, at * sectorsize, path, f"entry {index}")
                entry = _parse_header(raw, index, path, sectorsize, at)
            at += 1
            if not entry.is_discard and entry.nr_sectors:
                size = entry.nr_sectors * sectorsize
                past_super = index >= superblock.nr_entries
                if data:
                    payload = os.pread(fd, size, at * sectorsize)
                    if len(payload) != size:
                        if past_super:
                            return  # a trailing entry whose data never made it
                        raise LogFormatError(f"{path}: truncated data of log entry {index}")
                    entry = dataclasses.replace(entry, data=payload)
                elif past_super and (at * sectorsize + size > os.fstat(fd).st_size):
                    return
                at += entry.nr_sectors
            yield entry
            index += 1


def read_super(path: str | os.PathLike[str]) -> Superblock:
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_super(fd, os.fspath(path))
    finally:
        os.close(fd)


def read_log(
    path: str | os.PathLike[str], *, data: bool = True, trailing: bool = False
) -> tuple[Superblock, Iterator[LogEntry]]:
    """The superblock and an iterator over the entries, read lazily in log order.

    The iterator stops after the superblock's nr_entries, as replay-log does; with
    `trailing` it goes on past them while whole, valid entries follow (entries appended after
    the last superblock update: a daemon killed between flushes leaves some). With
    data=False, write data is skipped (every `data` is None): for listing big logs."""
    superblock = read_super(path)
    return superblock, _entries(os.fspath(path), superblock, data=data, trailing=trailing)
