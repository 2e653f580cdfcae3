"""The write recorder of `-o log-writes=FILE`: every change that reaches the image and every
successful flush, in the order they complete, in the dm-log-writes format (logwrites.py).

It sits where QEMU puts a blklogwrites node: below blkdebug, above the file (and above the
undo log of track-unsynced), so a request a rule fails never reaches it, a torn write
reaches it with what it wrote, and a power cut's take-backs happen below it, unlogged.

What each change becomes (the log's sector is `log-sector-size`, 512 by default; QEMU's node
has that request alignment, so the block layer above it pads with read-modify-write; here
the recorder pads instead, with what the image holds once the change is done):

    write          a write entry of the data, padded out to whole log sectors
    write-zeroes   a write entry of zero data for the whole log sectors (as QEMU's driver
                   logs it); a partly zeroed sector at either end as a padded write
    discard        a discard entry (no data) for the whole log sectors; a partly discarded
                   sector at either end as a padded write of what the image holds then
                   (QEMU's node drops those parts undiscarded; here the image loses them)
    resize         a mark `resize:SIZE` (QEMU's node passes a resize through unlogged);
                   `blkfuse replay` truncates a regular-file target there
    FUA write      the write entry carries LOG_FUA_FLAG (as the kernel's dm-log-writes;
                   QEMU's driver never sets it), followed by the flush that emulates it:
                   QEMU's node declares no FUA support, so its block layer emulates FUA
                   above it under every profile (10.0 too, which passes FUA to a file)
    flush          a flush entry, if anything was recorded since the last one (QEMU's node
                   skips the flush otherwise: its write generation is clean); the superblock
                   is rewritten and the log fsynced before the flush is acknowledged
    mark NAME      a mark entry (control `mark NAME`, Mount.mark); the superblock is
                   rewritten (no fsync), so a reader sees the log up to the mark
    power cut      a mark `powercut`, superblock and fsync

The padding reads are made right after the change: a concurrent write to the same log sector
that lands in between shows in the padding (QEMU serialises such writes; blkfuse does not).
"""

import os
from collections.abc import Callable

import trio

from blkfuse.block.image import Bytes
from blkfuse.block.node import Filter, Node
from blkfuse.crash.logwrites import DEFAULT_SUPER_UPDATE_INTERVAL, LogWriter

POWERCUT_MARK = "powercut"
RESIZE_MARK_PREFIX = "resize:"


def resize_mark(size: int) -> str:
    return f"{RESIZE_MARK_PREFIX}{size}"


def parse_resize_mark(name: str | None) -> int | None:
    """The size of a `resize:SIZE` mark, else None."""
    if name is None or not name.startswith(RESIZE_MARK_PREFIX):
        return None
    digits = name[len(RESIZE_MARK_PREFIX) :]
    return int(digits) if digits.isdigit() else None


class Recorder(Filter):
    """The recorder as a filter over `below` (stack.py puts it right under the block device,
    over the undo filter). Each change is passed on, then logged once it is done; a change
    that raises is not logged. `read_image(offset, length)` reads the image as it is now
    (short at its end), for padding: the image's own pread (reads pass filters unchanged)."""

    # QEMU's blklogwrites sets no supported_write_flags: a FUA write above it is a write,
    # then a flush (logged), in QEMU 10.0 as in 7.2.
    takes_fua = False

    def __init__(
        self,
        below: Node,
        writer: LogWriter,
        read_image: Callable[[int, int], bytes],
        *,
        flush_on_close: bool = True,
    ) -> None:
        super().__init__(below)
        self.writer = writer
        self.sectorsize = writer.sectorsize
        self._read_image = read_image
        # Recorded since the last flush entry: QEMU's write_gen != flushed_gen at its node.
        self._changed = False
        # The daemon's final fsync is a flush of this node (not with cache=unsafe: there QEMU
        # never flushes below blkdebug, BDRV_O_NO_FLUSH).
        self.flush_on_close = flush_on_close

    @classmethod
    def open(
        cls,
        below: Node,
        path: str,
        read_image: Callable[[int, int], bytes],
        *,
        sectorsize: int | None = None,
        append: bool = False,
        super_update_interval: int = DEFAULT_SUPER_UPDATE_INTERVAL,
        flush_on_close: bool = True,
    ) -> "Recorder":
        writer = LogWriter(
            path,
            sectorsize=sectorsize,
            append=append,
            super_update_interval=super_update_interval,
            autosync=False,
        )
        return cls(below, writer, read_image, flush_on_close=flush_on_close)

    @property
    def path(self) -> str:
        return self.writer.path

    @property
    def entries(self) -> int:
        return self.writer.nr_entries

    # ---- the node methods it observes ----

    async def write(self, offset: int, data: Bytes, *, fua: bool = False) -> int:
        done = await self.below.write(offset, data, fua=fua)
        self.wrote(offset, data, fua=fua)
        return done

    def pwrite(self, offset: int, data: Bytes, *, fua: bool = False) -> int:
        done = self.below.pwrite(offset, data, fua=fua)
        self.wrote(offset, data, fua=fua)
        return done

    def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, *, fua: bool = False
    ) -> None:
        self.below.write_zeroes(offset, length, unmap, fua=fua)
        self.zeroed(offset, length, fua=fua)

    def discard(self, offset: int, length: int) -> None:
        self.below.discard(offset, length)
        self.discarded(offset, length)

    def truncate(self, size: int) -> None:
        self.below.truncate(size)
        self.resized(size)

    async def flush(self) -> None:
        await self.below.flush()
        await self.flushed()

    def unflushed(self) -> bool:
        """A change was logged since the last flush entry (QEMU's node: write_gen is not
        flushed_gen, so a flush of blkdebug's children reaches it and is logged)."""
        return self._changed

    def power_cut(self) -> None:
        self.writer.mark(POWERCUT_MARK)
        self.writer.sync()

    def mark(self, name: str) -> None:
        """A mark entry now (control `mark NAME`); ValueError for a bad name. The superblock
        is rewritten (no fsync): a reader sees the log up to the mark."""
        self.writer.mark(name)
        self.writer.update_super()
        self._sync_if_due()

    def close(self) -> None:
        """The mount ends. The daemon fsynced the image just before (lifecycle), as QEMU
        flushes the whole graph when it closes it: that flush is logged like any other
        (not with cache=unsafe, where no flush reaches QEMU's node: flush_on_close off)."""
        if self._changed and self.flush_on_close:
            self._changed = False
            self.writer.flush()
        self.writer.close()

    # ---- logging a change once it is done (in completion order) ----

    def wrote(self, offset: int, data: Bytes, *, fua: bool = False) -> None:
        if not len(data):
            return
        size = self.sectorsize
        end = offset + len(data)
        start, stop = offset - offset % size, -(-end // size) * size
        if start == offset and stop == end:
            self.writer.write(offset // size, data, fua=fua)
        else:
            padded = bytearray(self._image(start, stop - start))
            padded[offset - start : end - start] = data
            self.writer.write(start // size, padded, fua=fua)
        self._changed = True
        self._sync_if_due()

    def zeroed(self, offset: int, length: int, *, fua: bool = False) -> None:
        for kind, sector, count in self._split(offset, length):
            if kind == "whole":
                self.writer.write_zeroes(sector, count, fua=fua)
            else:
                self._log_sectors(sector, count, fua)
        self._changed = length > 0 or self._changed
        self._sync_if_due()

    def discarded(self, offset: int, length: int) -> None:
        for kind, sector, count in self._split(offset, length):
            if kind == "whole":
                self.writer.discard(sector, count)
            else:
                self._log_sectors(sector, count, False)
        self._changed = length > 0 or self._changed
        self._sync_if_due()

    def resized(self, size: int) -> None:
        self.writer.mark(resize_mark(size))
        self._changed = True
        self._sync_if_due()

    async def flushed(self) -> None:
        """After a successful flush of the image; returns once the log is durable."""
        if not self._changed:
            return
        self._changed = False
        self.writer.flush()
        await self._fsync()

    # ---- helpers ----

    def _image(self, offset: int, length: int) -> bytes:
        data = self._read_image(offset, length)
        return data + bytes(length - len(data))  # past the end of the image: zeroes

    def _split(self, offset: int, length: int) -> list[tuple[str, int, int]]:
        """[offset, offset+length) as log sectors, in address order: ("whole", sector, count)
        for the sectors it covers whole, ("part", sector, count) for those it covers in part
        (one at either end, or one piece of one or two sectors when none is whole)."""
        if length <= 0:
            return []
        size = self.sectorsize
        end = offset + length
        first_whole, end_whole = -(-offset // size), end // size
        pieces: list[tuple[str, int, int]] = []
        if first_whole >= end_whole:
            # No whole sector: one or two partial ones, logged as one write (QEMU pads such
            # a request into one buffer: bdrv_init_padding's merge_reads).
            first = offset // size
            return [("part", first, -(-end // size) - first)]
        if offset % size:
            pieces.append(("part", offset // size, 1))
        pieces.append(("whole", first_whole, end_whole - first_whole))
        if end % size:
            pieces.append(("part", end_whole, 1))
        return pieces

    def _log_sectors(self, sector: int, count: int, fua: bool) -> None:
        size = self.sectorsize
        self.writer.write(sector, self._image(sector * size, count * size), fua=fua)

    def _sync_if_due(self) -> None:
        """Every super_update_interval entries: fsync inline (a change hook cannot wait;
        it is one fsync per 4096 entries by default)."""
        if self.writer.sync_due:
            self.writer.fsync()

    async def _fsync(self) -> None:
        fd = self.writer.fd
        self.writer.sync_due = False
        with trio.CancelScope(shield=True):  # the flush is acknowledged only after it
            await trio.to_thread.run_sync(os.fsync, fd)
