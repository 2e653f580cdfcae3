"""Crash states of a recorded run: which images a power cut could have left, and each one's
bytes rebuilt from the base image and the write log.

The model is CrashMonkey's: a disk with a volatile write cache that writes back in any order.

- A **crash point** is at every flush, after every FUA write and after every mark of the
  log (from `start` on: the harness skips its own setup). The point of a flush is the moment
  it reached the disk, not yet done: the worst moment, with everything it is to make
  durable written and nothing yet promised.
- At a point, every write that an earlier (completed) flush covers is on the disk, and so is
  every FUA write; the writes since that flush (the *volatile* ones) may or may not be.
- **State s0** loses every volatile write. **States s1..sN** each draw, from a generator
  seeded by (seed, point, state), one fate per volatile write in log order: lost, kept, or
  torn (each `atomic`-byte unit it touches kept or lost by its own coin, units by address).
  A state with the same bytes and the same marks as an earlier one is left out (the check
  would see the same thing): a repeated draw, or a mark right after a flush.

An ID `pP-sS` names one state; with the same log, seed and atomic it rebuilds the same
bytes every time (`build_image`). Images start as a sparse copy of the base, so only what
the log wrote takes space.
"""

import errno
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from blkfuse.block.image import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

SECTOR = 512
DEFAULT_ATOMIC = 512

LOST, KEPT, TORN = 0, 1, 2

_ID = re.compile(r"p(\d+)-s(\d+)")


class LogRecord(Protocol):
    """What this module reads of a write-log entry (blkfuse.crash.logwrites.LogEntry)."""

    @property
    def index(self) -> int: ...
    @property
    def sector(self) -> int: ...
    @property
    def nr_sectors(self) -> int: ...
    @property
    def data(self) -> bytes | None: ...
    @property
    def mark(self) -> str | None: ...
    @property
    def is_flush(self) -> bool: ...
    @property
    def is_fua(self) -> bool: ...
    @property
    def is_discard(self) -> bool: ...
    @property
    def is_mark(self) -> bool: ...


@dataclass(frozen=True)
class Write:
    """One change to the disk: data written at `offset`, or a discard (reads as zeros)."""

    entry: int  # its index in the log
    offset: int
    length: int
    data: bytes  # empty for a discard
    discard: bool = False


@dataclass(frozen=True)
class CrashPoint:
    number: int  # P of pP-sS, from 1
    entry: int  # the log index of its entry (the flush in flight, the FUA write, the mark)
    reason: str  # "flush", "fua" or "mark"
    flushed: int  # writes[:flushed] are covered by a flush
    fua: tuple[int, ...]  # writes after the flush that are durable (FUA)
    volatile: tuple[int, ...]  # writes after the flush that may be lost
    marks: tuple[str, ...]  # every mark before the point, in order


@dataclass(frozen=True)
class CrashState:
    id: str
    point: CrashPoint
    # one fate per volatile write: LOST, KEPT, or a tuple of kept flags per atomic unit
    fates: tuple[int | tuple[bool, ...], ...]


def state_id(point: int, state: int) -> str:
    return f"p{point}-s{state}"


def parse_id(text: str) -> tuple[int, int]:
    """(P, S) from "pP-sS"; ValueError with the expected shape otherwise."""
    m = _ID.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a crash state ID: {text!r} (expected pP-sS, e.g. p17-s3)")
    return int(m.group(1)), int(m.group(2))


@dataclass
class CrashPlan:
    """The writes and crash points of one log, and the states at each point."""

    writes: list[Write] = field(default_factory=list)
    points: list[CrashPoint] = field(default_factory=list)
    seed: int = 0
    atomic: int = DEFAULT_ATOMIC
    states_per_point: int = 0  # N: seeded states beside s0

    @classmethod
    def from_log(
        cls,
        entries: Iterable[LogRecord],
        *,
        seed: int = 0,
        atomic: int = DEFAULT_ATOMIC,
        states_per_point: int = 0,
        start: int = 0,
        sector_size: int = SECTOR,
    ) -> "CrashPlan":
        """The plan of a log's entries (in log order); `sector_size` is the log's sector
        (entries count positions in it); crash points only from log index `start` on."""
        if atomic < SECTOR or atomic & (atomic - 1):
            raise ValueError(f"atomic must be a power of two of at least {SECTOR}: {atomic}")
        plan = cls(seed=seed, atomic=atomic, states_per_point=states_per_point)
        flushed = 0
        fua: list[int] = []
        volatile: list[int] = []
        marks: list[str] = []
        for entry in entries:
            if entry.is_mark:
                marks.append(entry.mark or "")
                if entry.index >= start:
                    plan._point(entry.index, "mark", flushed, fua, volatile, marks)
                continue
            if entry.is_flush:
                # The crash point of a flush is the moment it reached the disk: every write
                # since the previous flush is written but may still be lost. Once it is done
                # it covers them; its own data (a flush with data, REQ_PREFLUSH) comes after.
                if entry.index >= start:
                    plan._point(entry.index, "flush", flushed, fua, volatile, marks)
                flushed = len(plan.writes)
                fua, volatile = [], []
            if entry.nr_sectors:
                length = entry.nr_sectors * sector_size
                data = b"" if entry.is_discard else entry.data
                if data is None or (not entry.is_discard and len(data) != length):
                    raise ValueError(
                        f"log entry {entry.index}: a write of {length} bytes without its data"
                    )
                n = len(plan.writes)
                plan.writes.append(
                    Write(entry.index, entry.sector * sector_size, length, data, entry.is_discard)
                )
                (fua if entry.is_fua else volatile).append(n)
            if entry.index >= start and entry.is_fua:
                plan._point(entry.index, "fua", flushed, fua, volatile, marks)
        return plan

    def _point(
        self,
        index: int,
        reason: str,
        flushed: int,
        fua: list[int],
        volatile: list[int],
        marks: list[str],
    ) -> None:
        self.points.append(
            CrashPoint(
                len(self.points) + 1,
                index,
                reason,
                flushed,
                tuple(fua),
                tuple(volatile),
                tuple(marks),
            )
        )

    # -- states -------------------------------------------------------------------------------

    def point(self, number: int) -> CrashPoint:
        if not 1 <= number <= len(self.points):
            raise ValueError(f"no crash point p{number} (this run has p1 to p{len(self.points)})")
        return self.points[number - 1]

    def _units(self, w: Write) -> int:
        first = w.offset // self.atomic
        return -(-(w.offset + w.length) // self.atomic) - first

    def _fates(self, point: CrashPoint, number: int) -> tuple[int | tuple[bool, ...], ...]:
        if number == 0:
            return tuple(LOST for _ in point.volatile)
        rng = random.Random(f"{self.seed}:{point.number}:{number}")
        fates: list[int | tuple[bool, ...]] = []
        for i in point.volatile:
            fate = rng.randrange(3)
            units = self._units(self.writes[i])
            if fate == TORN and units > 1:
                fates.append(tuple(rng.random() < 0.5 for _ in range(units)))
            else:
                fates.append(KEPT if fate == TORN else fate)
        return tuple(fates)

    def states(self, point: CrashPoint, seen: set[object] | None = None) -> Iterator[CrashState]:
        """s0, then the seeded states, each unless an earlier one (at this point, or in
        `seen`, which it updates) has the same bytes and the same marks before it."""
        seen = set() if seen is None else seen
        for number in range(self.states_per_point + 1):
            fates = self._fates(point, number)
            kept = tuple((i, f) for i, f in zip(point.volatile, fates, strict=True) if f != LOST)
            key = (point.flushed, point.fua, kept, point.marks)
            if key in seen:
                continue
            seen.add(key)
            yield CrashState(state_id(point.number, number), point, fates)

    def all_states(self) -> Iterator[CrashState]:
        """Every distinct state of every point (a state that repeats an earlier point's
        bytes and marks, as at a mark right after a flush, is left out)."""
        seen: set[object] = set()
        for point in self.points:
            yield from self.states(point, seen)

    def state(self, id: str) -> CrashState:
        """The state an ID names (ValueError if this plan has no such state)."""
        p, s = parse_id(id)
        point = self.point(p)
        if s > self.states_per_point:
            raise ValueError(
                f"no crash state {id}: this run drew s0 to s{self.states_per_point} per point"
            )
        return CrashState(id, point, self._fates(point, s))

    # -- bytes --------------------------------------------------------------------------------

    def pieces(self, state: CrashState) -> Iterator[tuple[int, bytes | int]]:
        """What the state writes over the base, in order: (offset, data) or, for a discard,
        (offset, length)."""
        point = state.point
        fate_of = dict(zip(point.volatile, state.fates, strict=True))
        chosen = list(range(point.flushed)) + sorted(point.fua + point.volatile)
        for i in chosen:
            w = self.writes[i]
            fate = fate_of.get(i, KEPT)
            if fate == LOST:
                continue
            if fate == KEPT:
                yield (w.offset, w.length if w.discard else w.data)
                continue
            assert isinstance(fate, tuple)
            first = w.offset // self.atomic
            for u, keep in enumerate(fate):
                if not keep:
                    continue
                lo = max(w.offset, (first + u) * self.atomic)
                hi = min(w.offset + w.length, (first + u + 1) * self.atomic)
                yield (lo, hi - lo if w.discard else w.data[lo - w.offset : hi - w.offset])


def sparse_copy(source: str, target: str) -> None:
    """Copy `source` to `target` keeping its holes (only data extents are copied)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            done = start
            while done < end:
                n = os.copy_file_range(src.fileno(), dst.fileno(), end - done, done, done)
                if n == 0:
                    break
                done += n
            offset = end
        dst.truncate(size)


def punch(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros, keeping the file sparse."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError:  # a filesystem without hole punching
        os.pwrite(fd, bytes(length), offset)


def build_image(plan: CrashPlan, state: CrashState, base: str, out: str) -> None:
    """Write crash state `state` to `out`: a sparse copy of `base` with the state's writes."""
    sparse_copy(base, out)
    fd = os.open(out, os.O_WRONLY)
    try:
        for offset, piece in plan.pieces(state):
            if isinstance(piece, int):
                punch(fd, offset, piece)
            else:
                os.pwrite(fd, piece, offset)
    finally:
        os.close(fd)


def marks_before(point: CrashPoint, exclude_prefix: str = "") -> Sequence[str]:
    return [m for m in point.marks if not (exclude_prefix and m.startswith(exclude_prefix))]
