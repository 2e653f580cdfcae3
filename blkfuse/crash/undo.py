"""The undo log of `-o track-unsynced=on`: what every write since the last successful flush
overwrote, so that a power cut (or a flush failing with drop-unsynced) can take writes back.

The model is a disk with a volatile write cache: a write that no successful flush has covered
may still be lost. Each change to the image (a write, a piece of a split write, a resize) is
one entry, in the order it reached the image: its byte range, the image size before it, and
the bytes it overwrote (its pre-image; none for the part beyond the old end). Undoing entries
newest first gives back exactly the image as it was before them.

A pre-image keeps only the data of the range: its holes (SEEK_DATA/SEEK_HOLE on the backing
file) are noted as holes and cost nothing, and undoing punches them again. So a discard, a
write-zeroes or a write over never-written space (mkfs on a sparse image) holds no bytes.

Pre-images are appended to one log space: the first MEMORY_BYTES in memory, and beyond that
the whole in-memory buffer goes to an unlinked scratch file (in $TMPDIR, or `scratch_dir`),
so memory stays bounded. The cap (`-o unsynced-cap=SIZE`) bounds pre-image bytes plus
ENTRY_BYTES per entry: an entry that would pass it is refused with ENOSPC *before* the image
is touched, so the write fails whole and nothing is ever lost from the log silently.

A cut decides what survives:
    none     every entry is undone (the image is as of the last successful flush)
    prefix   entries are kept in the order they reached the image, up to a random point
    random   each `atomic`-byte unit that an entry touched is kept (its current bytes) or
             lost (its bytes as of the last flush) with probability 1/2, independently; the
             image size is one more such coin (kept: the current size; lost: the flushed size)
The coins come from random.Random(seed) in a fixed order (units by address, then the size), so
the same seed on the same history gives the same image. A cut a powercut rule fires takes its
seed from the mount's seed and how many rule cuts came before it (`rule_cut_seed`).

A write that reached the file as a FUA write (QEMU 10.0's file node writes it with RWF_DSYNC;
UndoFilter.fua_durable) is durable when it returns, and only it: it is no entry (nothing
takes it back), but the log notes its range and after which entry it came. A cut then
treats the flushed image with the durable writes applied, in order, as what a lost byte goes
back to: an entry before a durable write never restores over the durable write's bytes (and
never truncates below its end), while the rest of that entry stays revertible; an entry
after it has the durable bytes in its pre-image anyway. So a journal's commit record written
FUA survives the cut, and the un-flushed data before it may still be lost, as on a disk.

UndoFilter is the log as a node of the stack (block/node.py, block/stack.py), right on the
image: every change passing it is recorded first, a successful flush forgets what it covered,
and `cut` is the power cut.
"""

import errno as _errno
import hashlib
import logging
import os
import random
import re
import tempfile
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blkfuse.block.node import Filter
from blkfuse.rules.model import POWERCUT_MODES

if TYPE_CHECKING:
    from blkfuse.block.image import Bytes, Image

MEMORY_BYTES = 8 << 20  # pre-image bytes held in memory before spilling to scratch
ENTRY_BYTES = 32  # bookkeeping per entry (four int64s), counted in the cap
DEFAULT_CAP = 1 << 30
DEFAULT_ATOMIC = 512
KEEP_MODES = POWERCUT_MODES

_LOST_RUN = re.compile(b"0+")

log = logging.getLogger(__name__)


class LogFull(OSError):
    """The entry would pass the cap: the write that wanted it must fail (ENOSPC)."""


@dataclass
class CutReport:
    """What a cut did; `text()` is the control answer."""

    keep: str
    seed: int | None
    writes: int = 0  # entries before the cut
    writes_kept: int = 0
    writes_torn: int = 0  # random: some units kept, some lost
    writes_lost: int = 0
    units: int = 0  # random: atomic units touched
    units_kept: int = 0
    atomic: int = DEFAULT_ATOMIC
    bytes_kept: int = 0  # prefix/none: bytes written by kept / lost entries
    bytes_lost: int = 0
    size: int = 0  # the image size after the cut
    # [offset, length] runs, merged and sorted: the bytes the cut set back to what they were
    # at the last successful flush (or that it cut off or brought back at the end), and the
    # ranges of the writes it tore (random: some of their units kept, some lost)
    lost: list[list[int]] = field(default_factory=list)
    torn: list[list[int]] = field(default_factory=list)
    saved: str | None = None  # where a copy of the image as the cut left it was written
    save_error: str | None = None  # why that copy could not be written

    def as_dict(self) -> dict[str, Any]:
        """What `status --json` shows as "last_cut" and the cut's answer ends with."""
        return {
            "keep": self.keep,
            "seed": self.seed,
            "writes": self.writes,
            "writes_kept": self.writes_kept,
            "writes_torn": self.writes_torn,
            "writes_lost": self.writes_lost,
            "atomic": self.atomic,
            "size": self.size,
            "lost": self.lost,
            "torn": self.torn,
            "saved": self.saved,
            "save_error": self.save_error,
        }

    def text(self) -> str:
        seed = f" seed={self.seed}" if self.seed is not None else ""
        head = f"powercut keep={self.keep}{seed}: "
        if self.keep == "random":
            body = (
                f"{self.writes} unsynced writes ({self.writes_kept} kept, "
                f"{self.writes_torn} torn, {self.writes_lost} lost), {self.units} units "
                f"of {self.atomic} bytes ({self.units_kept} kept, "
                f"{self.units - self.units_kept} lost), size {self.size}"
            )
        else:
            body = (
                f"{self.writes} unsynced writes ({self.writes_kept} kept, "
                f"{self.writes_lost} lost), {self.bytes_kept} bytes kept, {self.bytes_lost} "
                f"bytes lost, size {self.size}"
            )
        if self.saved is not None:
            body += f", image saved to {self.saved}"
        elif self.save_error is not None:
            body += f", image NOT saved ({self.save_error})"
        return head + body


def rule_cut_seed(seed: int, ordinal: int) -> int:
    """The seed of a mount's cut number `ordinal` (0: the first) fired by a powercut rule,
    from the mount's seed (-o seed=N): the first uses the mount's seed itself; each later one
    the first 4 bytes, big-endian, of SHA-256 of the ASCII text "SEED:cut:ORDINAL" (for seed
    7, the second cut: `printf 7:cut:1 | sha256sum | cut -c1-8` in hex). So two rule cuts of
    one run draw different coins, and each is replayed alone by `powercut seed=` with the
    seed its report names."""
    if ordinal == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:cut:{ordinal}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class UndoLog:
    """Entries since the last successful flush, oldest first. Single-threaded (trio)."""

    def __init__(
        self, cap: int = DEFAULT_CAP, atomic: int = DEFAULT_ATOMIC, scratch_dir: str | None = None
    ):
        self.cap = cap
        self.atomic = atomic
        self.scratch_dir = scratch_dir
        self._offset = array("q")  # per entry: first byte changed
        self._length = array("q")  # bytes changed
        self._size = array("q")  # image size before the entry
        self._where = array("q")  # its pre-image's position in the log space
        self._stored = array("q")  # its pre-image's bytes there (its data, not its holes)
        # per entry: None, its old range is all data (stored whole); else the (start, end)
        # pairs, flattened, of the data in it (stored one after the other); the rest is hole
        self._layout: list[tuple[int, ...] | None] = []
        # Log space [0, spilled) is in the scratch file; the pre-images of entries from
        # _memory_first on are in memory, one bytes object each (not one growing bytearray:
        # appending 4 KiB to a large bytearray copies it, ~40 us a write).
        self._memory: list[bytes] = []
        self._memory_first = 0
        self._memory_bytes = 0
        self._spilled = 0
        self._scratch: int | None = None
        self._held = 0  # pre-image bytes of live entries
        # The durable (FUA) writes that came after some live entry: (after, start, end) each,
        # `after` being how many entries were in the log when it was made; oldest first.
        self._durable_after = array("q")
        self._durable_start = array("q")
        self._durable_end = array("q")
        self.bytes = 0  # bytes the live entries changed (status "bytes")
        self.refused = 0  # entries refused at the cap
        self.last_refusal: str | None = None

    def __len__(self) -> int:
        return len(self._offset)

    def held(self) -> int:
        """What counts against the cap now."""
        return self._held + ENTRY_BYTES * (len(self._offset) + len(self._durable_after))

    # ---- recording -------------------------------------------------------------------------

    def record_write(self, image: "Image", offset: int, length: int) -> None:
        """Call right before writing [offset, offset+length) to `image` (no await between).
        Raises LogFull (ENOSPC), or OSError if the scratch file cannot be written."""
        size = image.size()
        self._add(image, offset, length, size)

    def record_durable(self, offset: int, length: int) -> bool:
        """Call right before writing [offset, offset+length) as a durable (FUA) write: no
        entry, no pre-image; the entries before it will not take its bytes back. Raises
        LogFull (ENOSPC) where the note would pass the cap. With no entry in the log there
        is nothing it must be kept from, so nothing is noted: False."""
        n = len(self._offset)
        if not n or length <= 0:
            return False
        if self.held() + ENTRY_BYTES > self.cap:
            self.refused += 1
            self.last_refusal = (
                f"the unsynced-write log is full: the note of a {length}-byte FUA write at "
                f"offset {offset} would pass unsynced-cap={self.cap} "
                f"({len(self)} writes, {self._held} bytes of pre-images held); "
                "it failed with ENOSPC (fsync the image, or raise the cap)"
            )
            raise LogFull(_errno.ENOSPC, self.last_refusal)
        self._durable_after.append(n)
        self._durable_start.append(offset)
        self._durable_end.append(offset + length)
        return True

    def drop_last_durable(self) -> None:
        """The durable write just noted failed: forget its note."""
        for column in (self._durable_after, self._durable_start, self._durable_end):
            column.pop()

    def record_resize(self, image: "Image", new_size: int) -> None:
        """Call right before truncating `image` to `new_size`."""
        size = image.size()
        if new_size < size:
            self._add(image, new_size, size - new_size, size)
        elif new_size > size:
            self._add(image, size, new_size - size, size)

    def _add(self, image: "Image", offset: int, length: int, size: int) -> None:
        kept = max(0, min(offset + length, size) - offset)
        layout = _data_runs(image, offset, offset + kept) if kept else None
        if layout is not None:
            kept = sum(layout[j + 1] - layout[j] for j in range(0, len(layout), 2))
        if self.held() + kept + ENTRY_BYTES > self.cap:
            self.refused += 1
            self.last_refusal = (
                f"the unsynced-write log is full: a {length}-byte change at "
                f"offset {offset} would pass unsynced-cap={self.cap} "
                f"({len(self)} writes, {self._held} bytes of pre-images held); "
                "it failed with ENOSPC (fsync the image, or raise the cap)"
            )
            raise LogFull(_errno.ENOSPC, self.last_refusal)
        if layout is None:
            preimage = image.pread(offset, kept) if kept else b""
        else:
            preimage = b"".join(
                image.pread(layout[j], layout[j + 1] - layout[j]) for j in range(0, len(layout), 2)
            )
        self._offset.append(offset)
        self._length.append(length)
        self._size.append(size)
        self._where.append(self._spilled + self._memory_bytes)
        self._stored.append(kept)
        self._layout.append(layout)
        self._memory.append(preimage)
        self._memory_bytes += kept
        if self._memory_bytes > MEMORY_BYTES:
            try:
                self._spill()
            except OSError:  # the scratch file is full or failing: refuse whole
                for column in (self._offset, self._length, self._size, self._where, self._stored):
                    column.pop()
                self._layout.pop()
                self._memory.pop()
                self._memory_bytes -= kept
                raise
        self._held += kept
        self.bytes += length

    def _spill(self) -> None:
        if self._scratch is None:
            directory = self.scratch_dir or tempfile.gettempdir()
            handle, path = tempfile.mkstemp(prefix="blkfuse-unsynced-", dir=directory)
            os.unlink(path)  # nothing to clean up, whatever happens to the daemon
            self._scratch = handle
        view = memoryview(b"".join(self._memory))
        done = 0
        while done < len(view):
            done += os.pwrite(self._scratch, view[done:], self._spilled + done)
        self._spilled += len(view)
        self._memory = []
        self._memory_first = len(self._offset)
        self._memory_bytes = 0

    def _preimage(self, i: int) -> bytes:
        if i >= self._memory_first:
            return self._memory[i - self._memory_first]
        kept = self._stored[i]
        assert self._scratch is not None  # entries before _memory_first were spilled
        data = os.pread(self._scratch, kept, self._where[i])
        if len(data) != kept:
            raise OSError(_errno.EIO, "the unsynced-write scratch file lost data")
        return data

    # ---- forgetting ------------------------------------------------------------------------

    def forget(self, count: int | None = None) -> None:
        """A successful flush covered the first `count` entries (all by default)."""
        if count is None or count >= len(self):
            self._offset = array("q")
            self._length = array("q")
            self._size = array("q")
            self._where = array("q")
            self._stored = array("q")
            self._layout = []
            self._memory = []
            self._memory_first = self._memory_bytes = 0
            self._held = self.bytes = 0
            self._durable_after = array("q")
            self._durable_start = array("q")
            self._durable_end = array("q")
            if self._spilled and self._scratch is not None:
                os.ftruncate(self._scratch, 0)  # give the scratch space back
            self._spilled = 0
            return
        for i in range(count):
            self._held -= self._stored[i]
            self.bytes -= self._length[i]
        for column in (self._offset, self._length, self._size, self._where, self._stored):
            del column[:count]
        del self._layout[:count]
        # a durable write that came after no remaining entry needs no note any more
        gone = bisect_right(self._durable_after, count)
        for column in (self._durable_after, self._durable_start, self._durable_end):
            del column[:gone]
        for j in range(len(self._durable_after)):
            self._durable_after[j] -= count
        if count <= self._memory_first:
            self._memory_first -= count
        else:
            gone = count - self._memory_first
            self._memory_bytes -= sum(len(chunk) for chunk in self._memory[:gone])
            del self._memory[:gone]
            self._memory_first = 0

    def close(self) -> None:
        if self._scratch is not None:
            os.close(self._scratch)
            self._scratch = None

    # ---- cutting ---------------------------------------------------------------------------

    def cut(self, image: "Image", keep: str = "none", seed: int | None = None) -> CutReport:
        """Apply a power cut to `image` (pwrites, hole punches and a truncate; the caller
        fsyncs), then forget everything. `seed` is needed for random and prefix."""
        if keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}, not {keep!r}")
        n = len(self)
        report = CutReport(
            keep=keep, seed=seed if keep != "none" else None, writes=n, atomic=self.atomic
        )
        rng = random.Random(seed)
        lost: list[tuple[int, int]] = []  # [start, end) ranges, merged at the end
        size_before = image.size()
        if keep == "random":
            torn: list[tuple[int, int]] = []
            self._cut_random(image, rng, report, lost, torn)
            report.torn = _merged(torn)
        else:
            first_lost = rng.randint(0, n) if keep == "prefix" else 0
            self._undo_from(image, first_lost, lost)
            report.writes_kept, report.writes_lost = first_lost, n - first_lost
            report.bytes_kept = sum(self._length[:first_lost])
            report.bytes_lost = sum(self._length[first_lost:])
        report.size = image.size()
        if report.size != size_before:  # cut off, or brought back, at the end
            lost.append((min(report.size, size_before), max(report.size, size_before)))
        report.lost = _merged(lost)
        self.forget()
        return report

    def _restore(self, image: "Image", i: int, lo: int, hi: int) -> None:
        """Put entry i's pre-image back over [lo, hi), a part of its range: its data
        written, its holes punched; what lay beyond the image's old end reads as zeros."""
        offset, size, layout = self._offset[i], self._size[i], self._layout[i]
        old_end = min(hi, max(lo, size))
        if lo < old_end:
            stored = self._preimage(i)
            if layout is None:
                image.pwrite(lo, stored[lo - offset : old_end - offset])
            else:
                position, where = lo, 0  # where: the run's place in `stored`
                for j in range(0, len(layout), 2):
                    start, end = layout[j], layout[j + 1]
                    first, last = max(start, lo), min(end, old_end)
                    if first < last:
                        if position < first:
                            _punch(image, position, first)
                        skip = where + first - start
                        image.pwrite(first, stored[skip : skip + last - first])
                        position = last
                    where += end - start
                if position < old_end:
                    _punch(image, position, old_end)
        if old_end < hi:
            _punch(image, old_end, hi)

    def _durable_from_newest(self) -> "_DurableSince":
        """The durable writes, to be taken in as the entries are walked newest first."""
        return _DurableSince(self._durable_after, self._durable_start, self._durable_end)

    def _undo_from(self, image: "Image", first: int, lost: list[tuple[int, int]]) -> None:
        """Undo entries first..n-1, newest first: the image as it was before entry `first`,
        with every durable write since then on it (their bytes, and the size up to their
        end). Appends what it restored to `lost`."""
        durable = self._durable_from_newest()
        for i in range(len(self) - 1, first - 1, -1):
            covered = durable.since(i)
            offset, length, size = self._offset[i], self._length[i], self._size[i]
            floor = max(size, covered.end)  # a durable write past the old end stays
            for lo, hi in covered.outside(offset, min(offset + length, floor)):
                self._restore(image, i, lo, hi)  # past `size`: zeros
            lost.extend(covered.outside(offset, offset + length))
            if image.size() != floor:
                image.truncate(floor)

    def _units(self, i: int) -> tuple[int, int]:
        atomic = self.atomic
        return self._offset[i] // atomic, -(-(self._offset[i] + self._length[i]) // atomic)

    def _cut_random(
        self,
        image: "Image",
        rng: random.Random,
        report: CutReport,
        lost: list[tuple[int, int]],
        torn: list[tuple[int, int]],
    ) -> None:
        n = len(self)
        if not n:
            return
        # The touched units as merged [first, end) runs, one coin per unit, by address.
        spans = sorted(self._units(i) for i in range(n) if self._length[i])
        runs: list[list[int]] = []
        for first, end in spans:
            if runs and first <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], end)
            else:
                runs.append([first, end])
        starts = [first for first, _ in runs]
        coins = []  # per run: bit j set = unit first+j kept
        for first, end in runs:
            bits = rng.getrandbits(end - first)
            coins.append(bits)
            report.units += end - first
            report.units_kept += bits.bit_count()
        durable = self._durable_from_newest()
        # lost, the size is the flushed one, or up to the end of a durable write past it
        synced_size = max(self._size[0], max(self._durable_end, default=0))
        current_size = image.size()
        final_size = current_size if rng.getrandbits(1) else synced_size

        atomic = self.atomic
        for i in range(n - 1, -1, -1):
            covered = durable.since(i)
            first, end = self._units(i)
            if first == end:
                continue
            r = bisect_right(starts, first) - 1
            count = end - first
            mine = (coins[r] >> (first - runs[r][0])) & ((1 << count) - 1)
            kept = mine.bit_count()
            if kept == count:
                report.writes_kept += 1
                continue
            offset, length = self._offset[i], self._length[i]
            if kept == 0:
                report.writes_lost += 1
            else:
                report.writes_torn += 1
                torn.append((offset, offset + length))
            # Restore this entry's bytes in its lost units; beyond its old end, zeros.
            lsb_first = format(mine, f"0{count}b")[::-1].encode()
            for gone in _LOST_RUN.finditer(lsb_first):
                lo = max(offset, (first + gone.start()) * atomic)
                hi = min(offset + length, (first + gone.end()) * atomic, final_size)
                for piece in covered.outside(lo, hi):  # never over a durable write
                    self._restore(image, i, *piece)
                    lost.append(piece)
        report.writes_kept += sum(1 for i in range(n) if not self._length[i])
        if image.size() != final_size:
            image.truncate(final_size)


class _DurableSince:
    """The durable writes made after entry i, as disjoint sorted [start, end) ranges, for i
    going down (entries walked newest first): `since(i)` takes in those noted after it."""

    def __init__(self, after: "array[int]", start: "array[int]", end: "array[int]"):
        self._after, self._start, self._end = after, start, end
        self._next = len(after) - 1  # the newest not yet taken in
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.end = 0  # the furthest end of them

    def since(self, i: int) -> "_DurableSince":
        while self._next >= 0 and self._after[self._next] > i:
            self._add(self._start[self._next], self._end[self._next])
            self._next -= 1
        return self

    def _add(self, start: int, end: int) -> None:
        if start >= end:
            return
        self.end = max(self.end, end)
        starts, ends = self.starts, self.ends
        lo = bisect_right(ends, start - 1)  # the first range ending at or after `start`
        hi = bisect_right(starts, end)  # past the last range starting at or before `end`
        if lo < hi:
            start, end = min(start, starts[lo]), max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]

    def outside(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) that no durable write covers, in order."""
        if start >= end:
            return []
        starts, ends = self.starts, self.ends
        pieces = []
        j = bisect_right(ends, start)
        while start < end:
            if j == len(starts) or starts[j] >= end:
                pieces.append((start, end))
                break
            if starts[j] > start:
                pieces.append((start, starts[j]))
            start = max(start, ends[j])
            j += 1
        return pieces


class UndoFilter(Filter):
    """The undo log as a filter right over the image (-o track-unsynced=on).

    Each change is recorded and then made with no await between (the pre-image read and
    the write are one step, so the log's order is the image's); a write is therefore done
    on the calling thread (Image.pwrite), never handed to a worker. A full log refuses the
    change with ENOSPC before the image is touched.

    `fua_durable`: a write that comes with the FUA bit reaches the file as a FUA write
    (QEMU 10.0's file node: RWF_DSYNC), so it is durable as soon as it is made, and only
    it. The block device sets it (device.py): where it emulates FUA with a flush after the
    write (QEMU 7.2, a filter that takes no FUA, cache=unsafe) the bit changes nothing here
    and the flush makes the write durable, with everything before it."""

    below: "Image"

    def __init__(self, image: "Image", undo: UndoLog):
        super().__init__(image)
        self.log = undo
        self.cuts = 0  # power cuts so far: a flush spanning one fails
        self.fua_durable = False

    def _record(self, offset: int, length: int) -> None:
        if length > 0:
            try:
                self.log.record_write(self.below, offset, length)
            except LogFull as full:
                log.warning("%s", full.strerror)
                raise

    def _record_durable(self, offset: int, length: int) -> bool:
        try:
            return self.log.record_durable(offset, length)
        except LogFull as full:
            log.warning("%s", full.strerror)
            raise

    async def write(self, offset: int, data: "Bytes", *, fua: bool = False) -> int:
        return self.pwrite(offset, data, fua=fua)

    def pwrite(self, offset: int, data: "Bytes", *, fua: bool = False) -> int:
        if not (fua and self.fua_durable):
            self._record(offset, len(data))
            return self.below.pwrite(offset, data, fua=fua)
        noted = self._record_durable(offset, len(data))
        try:
            return self.below.pwrite(offset, data, fua=fua)
        except OSError:
            # A failed FUA write promised nothing: the entries before it take their bytes
            # back over it at a cut (what it wrote where no entry holds a pre-image stays,
            # as a disk may have written part of it).
            if noted:
                self.log.drop_last_durable()
            raise

    def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, *, fua: bool = False
    ) -> None:
        self._record(offset, length)
        self.below.write_zeroes(offset, length, unmap, fua=fua)

    def discard(self, offset: int, length: int) -> None:
        self._record(offset, length)  # a discarded range reads as zeroes: undoable
        self.below.discard(offset, length)

    def truncate(self, size: int) -> None:
        self.log.record_resize(self.below, size)
        self.below.truncate(size)

    async def flush(self) -> None:
        """fsync; if no power cut came meanwhile, the entries it covered (those before it
        started) are synced now and forgotten."""
        cuts, covered = self.cuts, len(self.log)
        await self.below.flush()
        if self.cuts != cuts:
            raise OSError(_errno.EIO, "the power was cut during the fsync")
        if covered:
            self.log.forget(covered)

    def power_cut(self) -> None:
        self.cuts += 1

    def unflushed(self) -> bool:
        return len(self.log) > 0

    async def cut(self, keep: str, seed: int | None = None) -> CutReport:
        """Take back the unsynced writes as `keep` says, and fsync the result."""
        report = self.log.cut(self.below, keep, seed)
        await self.below.flush()
        return report

    def close(self) -> None:
        self.log.close()


# Below this, a range on tmpfs is not asked for its holes (see _data_runs).
SMALL_RANGE = 64 << 10


def _data_runs(image: "Image", start: int, end: int) -> tuple[int, ...] | None:
    """The data in [start, end) of the image as flattened (start, end) pairs, the rest being
    holes (SEEK_DATA/SEEK_HOLE: Image.extent); None when it is all data (the common case,
    a write over data), or when the file cannot tell (then all is data)."""
    fd = getattr(image, "fd", None)
    if fd is not None:
        try:
            st = os.fstat(fd)
            if st.st_blocks * 512 >= st.st_size:
                return None  # allocated whole: no hole anywhere (one fstat, ~0.5 us)
            if getattr(image, "seek_hole_scans", False) and end - start < SMALL_RANGE:
                # tmpfs: SEEK_HOLE walks every page up to the next hole (milliseconds per
                # write on a big file); a small range keeps its bytes (zeros for a hole)
                return None
            # the common case in one lseek (~1 us; Image.extent takes two)
            if os.lseek(fd, start, os.SEEK_HOLE) >= end:
                return None
        except OSError:
            return None
    is_data, count = image.extent(start, end - start)
    if is_data and count >= end - start:
        return None
    runs: list[int] = []
    position = start
    while position < end:
        if position > start:
            is_data, count = image.extent(position, end - position)
        count = max(1, min(count, end - position))
        if is_data:
            if runs and runs[-1] == position:
                runs[-1] = position + count
            else:
                runs += (position, position + count)
        position += count
    return tuple(runs)


def _punch(image: "Image", start: int, end: int) -> None:
    """Make [start, end) read as zeros again: a hole where the file system can punch one."""
    image.write_zeroes(start, end - start, True)


def _merged(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """[start, end) ranges -> sorted [offset, length] runs, overlapping and touching merged."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], end - out[-1][0])
        else:
            out.append([start, end - start])
    return out
