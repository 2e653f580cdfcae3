"""What QEMU's block layer does around blkdebug, for one image (docs: docs/reference.md "Events").

QEMU stacks a raw format node over the blkdebug node over the file. A request's life
there decides which events blkdebug sees, in which order, and when it is checked:

    raw node       read_aio / write_aio per chunk of max-transfer; writethrough emulates
                   FUA with a flush after the last chunk; keeps the format-layer "written
                   since flush" generation that decides whether flush_to_disk fires.
                   Absent with format=none (qemu-io --image-opts driver=blkdebug): then
                   no read_aio / write_aio / flush_to_* at all, and FUA is emulated at
                   the blkdebug node instead
    blkdebug node  pads unaligned requests to `align` (read-modify-write, pwritev_rmw_*),
                   pwritev or pwritev_zero, the check, pwritev_done; keeps its own
                   generation, which decides whether a flush is checked at all. A padded
                   request longer than max-transfer is split again here, so each piece is
                   checked on its own (found by the differential test: QEMU writes the
                   pieces before a failing one). Write-zeroes and discard are split by
                   opt-/max-write-zero and opt-/max-discard as bdrv_co_do_pwrite_zeroes
                   and bdrv_co_pdiscard split them; a write-zeroes piece shorter than
                   its alignment falls back to a plain write (iotype write, no event),
                   a discard piece shorter than `align` is dropped unchecked
    filters        the nodes between blkdebug and the file (stack.py, node.py): the undo
                   log of track-unsynced now, as QEMU's filter nodes (blklogwrites, ...)
    file           the backing image (image.py)

Cache modes are qemu-io's -t: writethrough and directsync make every write FUA, unsafe
acknowledges flushes after flush_to_os without reaching blkdebug (BDRV_O_NO_FLUSH), none
and directsync open the file O_DIRECT (image.py; invisible to rules).

BlockDevice reproduces that with the engine and the node below it (the top of the stack,
stack.py), and nothing about FUSE. The `caller` keyword of each request is the FUSE caller
(an engine.Sender: daemon/callers.py's Caller) or None.

A check answers 0, an errno, or (blkfuse's extension rules) an Effect: the request is held
in its own task (Holds: nothing else waits for it), then fails or goes on, and a
corruption changes the data of a read or write, inside the request and the rule's sectors
only (never read-modify-write padding, never write-zeroes, discard or block status).

Power cuts (README "Power cuts"): the undo log is a filter of the stack (crash/undo.py) and
sees every change and flush there; here, while the power is off every request fails with EIO
before raising any event (a request that was suspended when the power went fails when it
wakes up: _check_power after each wait).
"""

import errno as _errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio

from blkfuse.block.image import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    MAPPED_READ_MIN,
    Bytes,
)
from blkfuse.block.stack import Stack
from blkfuse.crash.snapshot import sparse_copy
from blkfuse.crash.undo import CutReport, rule_cut_seed
from blkfuse.engine.core import Engine, Request, Sender
from blkfuse.engine.effects import Effect, corrupt
from blkfuse.errors import BlkfuseError
from blkfuse.rules import profiles
from blkfuse.rules.model import CACHE_MODES, FORMATS, SECTOR_SIZE, Settings
from blkfuse.rules.profiles import DEFAULT, Profile

# QEMU keeps a node's length in sectors (bdrv_getlength): SECTOR_SIZE, as for sector rules.
_MAX_BOUNCE_BUFFER = 32768 * SECTOR_SIZE  # io.c: the largest fallback write of zeroes
_INT64_MAX = 2**63 - 1


log = logging.getLogger(__name__)


def _failure(error: int) -> OSError:
    return OSError(error, os.strerror(error))


class Holds:
    """The requests a delay rule holds right now: each sleeps in its own task (nothing else
    waits for it). `end_all` (unmounting) cuts every hold short, so shutdown never waits out
    a long delay; `abort` (a power cut) ends them with an error each held request raises."""

    def __init__(self) -> None:
        # each hold -> what it raises when it ends (None: the request goes on)
        self._scopes: dict[trio.CancelScope, OSError | None] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    async def hold(self, seconds: float) -> None:
        failure = None
        with trio.move_on_after(seconds) as scope:
            self._scopes[scope] = None
            try:
                await trio.sleep_forever()
            finally:
                failure = self._scopes.pop(scope, None)
        if failure is not None:  # a fresh exception per request: tracebacks differ
            raise OSError(failure.errno, failure.strerror)

    def end_all(self) -> None:
        """The held requests go on now (or fail with their rule's errno)."""
        for scope in list(self._scopes):
            scope.cancel()

    def abort(self, failure: OSError) -> int:
        """End every hold now; each held request raises `failure` (it must not go on to
        change the image, whenever its task runs). Their number."""
        scopes = list(self._scopes)
        for scope in scopes:
            self._scopes[scope] = failure
            scope.cancel()
        return len(scopes)


_REQUEST_MAX_BYTES = (2**31 - 1) // 512 * 512  # BDRV_REQUEST_MAX_BYTES, a sector multiple

# What a plain read and write raise at the raw and blkdebug nodes (the lean path counts them).
_READ_EVENTS = ("read_aio",)
_WRITE_EVENTS = ("write_aio", "pwritev", "pwritev_done")


def _export_requests(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each block request QEMU's FUSE export makes for a range."""
    while length > 0:
        count = min(length, _REQUEST_MAX_BYTES)
        yield offset, count
        offset += count
        length -= count


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


# ---- fallocate(2) modes: decoded here only ----


def fallocate_request(mode: int) -> str:
    """The block request fallocate(2) `mode` becomes, as QEMU 7.2's FUSE export maps it
    (fuse_fallocate): PUNCH_HOLE|KEEP_SIZE "discard", ZERO_RANGE (KEEP_SIZE or not)
    "write-zeroes", 0 "allocate" (growing only). OSError for anything else: PUNCH_HOLE
    without KEEP_SIZE EINVAL, other bits EOPNOTSUPP."""
    if mode & FALLOC_FL_PUNCH_HOLE:
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise _failure(_errno.EINVAL)
        if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
            raise _failure(_errno.EOPNOTSUPP)
        return "discard"
    if mode & FALLOC_FL_ZERO_RANGE:
        if mode & ~(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
            raise _failure(_errno.EOPNOTSUPP)
        return "write-zeroes"
    if mode == 0:
        return "allocate"
    raise _failure(_errno.EOPNOTSUPP)


def fallocate_iotype(mode: int) -> str:
    """The io type a fallocate(2) request is (the trace's op), valid mode or not."""
    return "discard" if mode & FALLOC_FL_PUNCH_HOLE else "write-zeroes"


def fallocate_size(mode: int, offset: int, length: int, size: int) -> int:
    """The image's size after fallocate(2) on an image of `size`: write-zeroes without
    KEEP_SIZE and allocate past the end grow it to offset+length; nothing else changes it.
    OSError for a mode fallocate_request refuses."""
    request = fallocate_request(mode)
    if request == "discard" or mode & FALLOC_FL_KEEP_SIZE or offset + length <= size:
        return size
    if request == "allocate" and offset < size:
        return size  # inside the image: EOPNOTSUPP, as QEMU
    return offset + length


class BlockDevice:
    def __init__(
        self,
        engine: Engine,
        stack: Stack,
        *,
        align: int | None = None,
        max_transfer: int | None = None,
        opt_write_zero: int | None = None,
        max_write_zero: int | None = None,
        opt_discard: int | None = None,
        max_discard: int | None = None,
        cache: str = "writeback",
        format: str = "raw",
        profile: Profile = DEFAULT,
    ):
        if cache not in CACHE_MODES:
            raise ValueError(f"unknown cache mode {cache!r}")
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}")
        self.engine = engine
        self.holds = Holds()  # requests a delay rule holds
        self.stack = stack
        self.below = stack.top  # every change and read goes to this node
        self.powered = True
        # When the last cut switched the power off: (CLOCK_MONOTONIC ns, CLOCK_REALTIME ns),
        # stamped as `powered` goes False, so cuts of several mounts can be compared (Fleet).
        self.cut_at: tuple[int, int] | None = None
        self.last_cut: CutReport | None = None  # status "last_cut"
        self.rule_cuts = 0  # cuts powercut rules fired: each draws its own seed
        self.align = align or 1
        self.max_transfer = max_transfer or 0
        self.opt_write_zero = opt_write_zero or 0
        self.max_write_zero = max_write_zero or 0
        self.opt_discard = opt_discard or 0
        self.max_discard = max_discard or 0
        self.cache = cache
        self.format = format
        self.raw = format == "raw"
        self.fua_always = cache in ("writethrough", "directsync")
        # whose block layer (rules/profiles.py): QEMU 7.2 emulates a FUA write with a flush
        # after it; 10.0 hands FUA down to the file, which writes with RWF_DSYNC, unless a
        # filter below takes no FUA (the write recorder, as QEMU 10.0's blklogwrites: its
        # block layer then emulates FUA with a flush, as 7.2 does everywhere)
        self.profile = profile
        self.fua_flushes = profile.fua_is_a_flush or not stack.takes_fua()
        self.no_flush = cache == "unsafe"
        undo = stack.undo
        if undo is not None:
            # A FUA write that reaches the file makes that write durable, and only it (not
            # the unsynced writes before it, as a flush would); unsafe ignores FUA.
            undo.fua_durable = not self.fua_flushes and not self.no_flush
        # "Written since the last successful flush", as QEMU's write_gen/flushed_gen pairs.
        # Failed writes count too; a failed flush leaves its generation dirty.
        self._format_written = 0
        self._format_flushed = 0
        self._blkdebug_written = 0
        self._blkdebug_flushed = 0
        self._flush_lock = trio.Lock()  # QEMU lets one flush per node run at a time
        self._blkdebug_flush_lock = trio.Lock()
        # The lean path (read_now/write_now) is possible at all: the raw node over blkdebug,
        # no alignment padding, no max-transfer split. Reads: no filter of the stack observes
        # them (each passes read straight on); writes: no filter at all (the undo log and a
        # write log see every change). Anything else that must see every request turns it
        # off with lean_off() and back with lean_on().
        self._lean_blockers = 0
        self._lean_read_kind = engine.request_kind("read", _READ_EVENTS)
        self._lean_write_kind = engine.request_kind("write", _WRITE_EVENTS)
        self._lean_static = self.raw and self.align == 1 and not self.max_transfer
        self.lean = self._lean_static
        image = self._image = stack.image
        self._lean_reads = self.below.read == image.read and (
            image.reads_inline or image.reads_nowait
        )
        self._lean_writes = self.below is image and not self.fua_always
        # What the FUSE layer asks before trying read_now/write_now: those may apply at all.
        self.lean_reads = self.lean and self._lean_reads
        self.lean_writes = self.lean and self._lean_writes

    # ---- the lean path: a request nothing can see, in the fewest steps ----

    def lean_off(self) -> None:
        """From now on every request takes the full path (until as many lean_on())."""
        self._lean_blockers += 1
        self.lean = self.lean_reads = self.lean_writes = False

    def lean_on(self) -> None:
        self._lean_blockers -= 1
        self.lean = self._lean_static and not self._lean_blockers
        self.lean_reads = self.lean and self._lean_reads
        self.lean_writes = self.lean and self._lean_writes

    def read_now(self, offset: int, length: int) -> bytes | bytearray | memoryview | None:
        """read(), done here and now if nothing can see it (engine.unseen) and the image
        reads inline; None if it must take the full path (nothing was done then). The
        engine ends up exactly as after read(): read_aio counted, the check found nothing.
        A large read's data is a view of a mapping of the file made for it (Image.read_mapped,
        unmapped when the view goes): the FUSE reply copies it straight from the page cache."""
        if not self.lean_reads:
            return None
        image = self._image
        size = image.known_size
        if size is None:
            size = image.size()
        if length <= 0 or offset >= size:
            return None
        if length > size - offset:
            length = size - offset
        if length >= MAPPED_READ_MIN and image.can_map(offset, length):
            # Large and in the page cache: a view of the file's mapping, not a copy
            if not self.engine.unseen(self._lean_read_kind, offset, length):
                return None
            return image.read_mapped(offset, length)
        if image.reads_inline:
            if not self.engine.unseen(self._lean_read_kind, offset, length):
                return None
            image.inline_reads += 1
            if not image.direct:
                # image.pread's first step, here: a call less per request (docs/benchmarks.md)
                data = os.pread(image.fd, length, offset)
                if len(data) == length:
                    return data
            return image.pread(offset, length)
        # A disk-backed file: lean only if the page cache holds it all, asked first (a
        # read has no effect: one the engine then refuses is simply done again in full).
        cached = image.read_cached(offset, length)
        if cached is None:
            if image.misses_alone() and self.engine.unseen(self._lean_read_kind, offset, length):
                return image.read_alone(offset, length)  # queue depth 1, reads mostly miss
            return None
        if not self.engine.unseen(self._lean_read_kind, offset, length):
            return None
        image.cached_hit()
        return cached

    async def read_unseen(self, offset: int, length: int) -> bytes | bytearray | None:
        """read() of a request nothing can see (engine.unseen) whose data the image must
        wait for (a page-cache miss read_now could not answer): counted as read() counts it,
        then straight to the image, which reads it through io_uring or a worker thread;
        None (nothing done) if it must take the full path. As exact as read(): that too
        counts the request's events and checks it before it awaits the image, and nothing
        else happens after (a rule or breakpoint added meanwhile cannot reach it there
        either)."""
        length = self._unseen_length(offset, length)
        if not length:
            return None
        return await self._image.read(offset, length)

    def read_later(
        self, offset: int, length: int, done: Callable[[Any], None]
    ) -> bytes | bytearray | bool:
        """read() of a request nothing can see that read_now could not answer (the page cache
        misses), without a task: the data if the image can give it now after all; True if
        the image started the read and will call done(data) or done(OSError) when it ends
        (Image.read_later); False if it must take the full path (nothing was done then). As
        exact as read_unseen, for the same reason."""
        if not self._image.can_read_later():
            return False
        length = self._unseen_length(offset, length)
        if not length:
            return False
        return self._image.read_later(offset, length, done)

    def _unseen_length(self, offset: int, length: int) -> int:
        """read_now's first steps, for the reads that wait (read_unseen, read_later): the
        length clamped to the image's end, counted and checked as read() does it
        (engine.unseen); 0 if the full path must take the read (nothing done). read_now
        repeats these lines rather than call this: a call cost its hot read 1,600
        instructions (25%, scripts/handler-cost, 2026-12-06)."""
        if not self.lean_reads:
            return 0
        image = self._image
        size = image.known_size
        if size is None:
            size = image.size()
        if length <= 0 or offset >= size:
            return 0
        if length > size - offset:
            length = size - offset
        if not self.engine.unseen(self._lean_read_kind, offset, length):
            return 0
        return length

    def write_now(self, offset: int, data: Bytes, *, grow: bool = True) -> int | None:
        """write() of all of `data` (not FUA), done here and now if nothing can see it: no
        filter (undo log, write log), the image writes inline, and engine.unseen; else None
        (nothing done). `grow` False: a write past the image's end is not done here either
        (the full path answers it, short or ENOSPC). The engine and the flush generations
        end up exactly as after write()."""
        length = len(data)
        image = self._image
        if not (self.lean_writes and length and image.writes_inline):
            return None
        if not grow:
            size = image.known_size
            if size is None:
                size = image.size()
            if offset + length > size:
                return None
        if not self.engine.unseen(self._lean_write_kind, offset, length):
            return None
        try:
            image.pwrite(offset, data)
        finally:
            # counted failed or not, as _aligned_write and write() count them
            self._blkdebug_written += 1
            self._format_written += 1
        return length

    @classmethod
    def from_settings(cls, engine: Engine, stack: Stack, settings: Settings) -> "BlockDevice":
        """The device a mount with these settings has, over `stack` (stack.build_stack)."""
        return cls(
            engine,
            stack,
            align=settings.align,
            max_transfer=settings.max_transfer,
            opt_write_zero=settings.opt_write_zero,
            max_write_zero=settings.max_write_zero,
            opt_discard=settings.opt_discard,
            max_discard=settings.max_discard,
            cache=settings.cache,
            format=settings.format,
            profile=profiles.profile(settings.qemu),
        )

    def size(self, *, live: bool = False) -> int:
        """The image's size; `live`: asked of the backing file now (which a change made to it
        from outside the mount needs: stat shows it), else as the image keeps it."""
        if live:
            self.stack.image.forget_size()
        return self.below.size()

    def stat(self) -> os.stat_result:
        """The backing file's (owner, group and mode are what the mount shows)."""
        return self.stack.image.stat()

    def statvfs(self) -> os.statvfs_result:
        """The file system the backing file lives on."""
        return self.stack.image.statvfs()

    def truncate(self, size: int) -> None:
        """Resize. No event and no check, but QEMU's bdrv_co_truncate counts it as written
        at each node (bdrv_co_write_req_finish), so the next flush is checked."""
        self._check_power()
        self.below.truncate(size)
        self._blkdebug_written += 1
        self._format_written += 1

    async def fallocate(
        self,
        mode: int,
        offset: int,
        length: int,
        *,
        writethrough: bool = False,
        caller: Sender | None = None,
    ) -> None:
        """fallocate(2) on the image, as QEMU 7.2's FUSE export maps it (fuse_fallocate):

            PUNCH_HOLE|KEEP_SIZE   discard, the range clamped to the image
            ZERO_RANGE             write-zeroes; the image grows first when the range ends
                                   past it (with KEEP_SIZE: the range is clamped instead)
            0 (allocate)           only past the end, where it grows the image (QEMU's
                                   export tries a preallocating truncate there, which
                                   blkdebug refuses); inside the image EOPNOTSUPP, as QEMU
            anything else          EOPNOTSUPP (PUNCH_HOLE without KEEP_SIZE: EINVAL)

        A range that starts at or past the end is a no-op for KEEP_SIZE modes (QEMU's export
        would ask the block layer for a negative length and get EIO). Ranges are handed down
        in requests of at most BDRV_REQUEST_MAX_BYTES, as the export's loop does; the first
        failing one ends it. `writethrough` (a handle opened O_DSYNC): write-zeroes are FUA."""
        self._check_power()  # even a no-op range fails while the power is off
        size = self.below.size()
        request = fallocate_request(mode)
        new_size = fallocate_size(mode, offset, length, size)
        if request == "discard":
            for piece, count in _export_requests(offset, min(length, size - offset)):
                if self.profile.punch_hole_is_write_zeroes:
                    # QEMU 10.0's export: write-zeroes that may unmap and must not fall
                    # back to writing zeroes (BDRV_REQ_NO_FALLBACK: ENOTSUP instead)
                    await self.write_zeroes(
                        piece,
                        count,
                        unmap=True,
                        writethrough=writethrough,
                        caller=caller,
                        no_fallback=True,
                    )
                else:
                    await self.discard(piece, count, caller=caller)
        elif request == "write-zeroes":
            if mode & FALLOC_FL_KEEP_SIZE:
                length = min(length, size - offset)
            elif new_size > size:
                self.truncate(new_size)
            for piece, count in _export_requests(offset, length):
                await self.write_zeroes(piece, count, writethrough=writethrough, caller=caller)
        elif new_size > size:  # allocate: only past the end
            self.truncate(new_size)
        else:
            raise _failure(_errno.EOPNOTSUPP)

    async def _event(self, event: str, request: Request) -> None:
        suspension = self.engine.fire(event, request)
        if suspension is not None:
            await suspension.wait()
            self._check_power()

    async def _settle(self, outcome: int | Effect) -> tuple[int, Effect | None]:
        """A check's non-zero outcome -> (errno, the corruption to apply), after its delay.
        A cut during the hold fails the request (Holds.abort); so does a hold that
        ends while the power is off. A powercut rule cuts here: the request fails."""
        if isinstance(outcome, int):
            return outcome, None
        if outcome.delay:
            await self.holds.hold(outcome.delay)
            self._check_power()
        if outcome.powercut:
            await self._rule_cut(outcome)
            return _errno.EIO, None
        return outcome.errno, (outcome if outcome.corrupt else None)

    async def _check_errno(
        self, iotype: str, offset: int, length: int, caller: Sender | None
    ) -> int:
        """A check where there is no data to corrupt: 0 or the errno, after any delay."""
        _, error = self.engine.decide(iotype, offset, length, caller)
        if error:
            error, _ = await self._settle(error)
        return error

    def _pieces(self, start: int, end: int) -> tuple[tuple[int, int], ...]:
        """The driver calls blkdebug's node makes for [start, end): one, or max-transfer
        sized pieces (QEMU's bdrv_aligned_preadv/pwritev fragmenting), each checked."""
        step = self.max_transfer
        if not step or end - start <= step:
            return ((start, end),)
        return tuple((pos, min(pos + step, end)) for pos in range(start, end, step))

    async def _check_pieces(self, iotype: str, start: int, end: int, caller: Sender | None) -> list:
        """Check each piece; raise for the first failing one. Returns the corruptions to
        apply, as (effect, piece start, piece end)."""
        corruptions = []
        for piece_start, piece_end in self._pieces(start, end):
            _, outcome = self.engine.decide(iotype, piece_start, piece_end - piece_start, caller)
            if outcome:
                error, effect = await self._settle(outcome)
                if error:
                    raise _failure(error)
                if effect is not None:
                    corruptions.append((effect, piece_start, piece_end))
        return corruptions

    def _padded(self, offset: int, length: int) -> tuple[int, int]:
        align = self.align
        if align == 1:
            return offset, offset + length
        return offset - offset % align, -(-(offset + length) // align) * align

    # ---- read ----

    async def read(
        self, offset: int, length: int, *, caller: Sender | None = None
    ) -> bytes | bytearray:
        """Data at [offset, offset+length), short at end of image. Raises OSError."""
        self._check_power()
        size = self.below.size()
        if length <= 0 or offset >= size:
            return b""
        length = min(length, size - offset)
        step = self.max_transfer
        if not step or length <= step or not self.raw:
            return await self._read_chunk(offset, length, caller)
        end = offset + length
        return b"".join(
            [
                await self._read_chunk(pos, min(step, end - pos), caller)
                for pos in range(offset, end, step)
            ]
        )

    async def _read_chunk(
        self, offset: int, length: int, caller: Sender | None
    ) -> bytes | bytearray:
        if self.raw:
            suspension = self.engine.fire("read_aio", Request("read", offset, length))
            if suspension is not None:
                await suspension.wait()
                self._check_power()
        start, end = self._padded(offset, length)
        corruptions = None
        if self.max_transfer:
            corruptions = await self._check_pieces("read", start, end, caller)
        else:
            _, outcome = self.engine.decide("read", start, end - start, caller)
            if outcome:
                error, effect = await self._settle(outcome)
                if error:
                    raise _failure(error)
                if effect is not None:
                    corruptions = [(effect, start, end)]
        # The image answers inline from memory, or hands a read that would wait on a disk
        # to a worker thread (image.py): the events and the check above are done either way.
        if start == offset and end == offset + length:
            data = await self.below.read(offset, length)
        else:
            data = (await self.below.read(start, end - start))[
                offset - start : offset - start + length
            ]
        if corruptions:
            # what is returned changes, the image does not
            for effect, piece_start, piece_end in corruptions:
                data = corrupt(data, offset, effect, piece_start, piece_end)
        return data

    # ---- write ----

    async def write(
        self, offset: int, data: Bytes, *, writethrough: bool = False, caller: Sender | None = None
    ) -> int:
        """Write all of `data` or raise OSError. Chunks before a failing one stay written.

        `writethrough` (a FUA write: a handle opened O_SYNC/O_DSYNC, RWF_DSYNC, or cache
        writethrough/directsync): a successful write is followed by a flush, whose
        failure fails the write although the data reached the image.
        """
        length = len(data)
        if length == 0:
            return 0
        self._check_power()
        fua = writethrough or self.fua_always
        if not self.raw:
            await self._write_chunk(offset, data, caller, fua)
            return length
        try:
            step = self.max_transfer
            # FUA goes down with each chunk (a filter below sees it); with a profile that
            # emulates FUA, the raw node flushes after the last chunk instead.
            if not step or length <= step:
                await self._write_chunk(offset, data, caller, fua)
            else:
                view = memoryview(data)
                for pos in range(0, length, step):
                    await self._write_chunk(offset + pos, view[pos : pos + step], caller, fua)
            if fua and self.fua_flushes:
                await self.flush(caller=caller)
        finally:
            # The raw node counts the write only now, after its FUA flush: so that
            # flush never fires flush_to_disk for its own write.
            self._format_written += 1
        return length

    async def _write_chunk(
        self, offset: int, data: Bytes, caller: Sender | None, fua: bool = False
    ) -> None:
        length = len(data)
        request = Request("write", offset, length)
        if self.raw:
            suspension = self.engine.fire("write_aio", request)
            if suspension is not None:
                await suspension.wait()
                self._check_power()
        start, end = self._padded(offset, length)
        if start != offset or end != offset + length:
            try:
                data = await self._read_modify(offset, data, start, end, request, caller)
            except OSError:
                # Deliberate difference: QEMU 7.2 ignores this and writes garbage.
                try:
                    await self._event("pwritev_done", request)
                finally:
                    self._blkdebug_written += 1
                raise
        await self._aligned_write(start, data, request, caller, fua)

    async def _aligned_write(
        self, start: int, data: Bytes, request: Request, caller: Sender | None, fua: bool
    ) -> None:
        """bdrv_aligned_pwritev of data at the blkdebug node: pwritev, a check and a write
        per max-transfer piece, the FUA flush (format none only: the raw node emulates FUA
        above, after the last chunk), pwritev_done. `fua` goes down with each piece."""
        engine = self.engine
        error = 0
        try:
            suspension = engine.fire("pwritev", request)
            if suspension is not None:
                await suspension.wait()
                self._check_power()
            for piece_start, piece_end in self._pieces(start, start + len(data)):
                piece = data[piece_start - start : piece_end - start]
                rule, outcome = engine.decide("write", piece_start, piece_end - piece_start, caller)
                if isinstance(outcome, int):
                    error = outcome
                else:  # an extension rule's delay or corruption (an Effect comes with its rule)
                    error, effect = await self._settle(outcome)
                    if effect is not None:
                        # silent corruption on the way to the disk, reported done: only
                        # inside the caller's data, never the read-modify-write padding
                        piece = corrupt(
                            piece,
                            piece_start,
                            effect,
                            request.offset,
                            request.offset + request.length,
                        )
                if rule is not None:
                    if rule.torn >= 0:  # extension: the head persists, the tail is lost
                        piece_end = min(piece_end, piece_start + rule.torn * SECTOR_SIZE)
                        piece = piece[: piece_end - piece_start]
                    elif error:
                        break  # pieces before it stay written, as in QEMU
                try:
                    if piece:
                        self._check_power()  # a request that outlived a cut changes nothing
                        await self.below.write(piece_start, piece, fua=fua)
                except OSError as failure:  # the undo log is full, or the backing file
                    error = failure.errno or _errno.EIO
                if error:
                    break
                if engine.heal_rules:
                    engine.written(piece_start, piece_end - piece_start)
            if fua and not error:
                if not self.fua_flushes:
                    error = await self._fua_to_file()
                elif not self.raw:
                    # Emulated FUA: this write is not yet counted, so the flush is checked
                    # only if something before it was written since the last flush.
                    error = await self._blkdebug_flush_errno(caller)
            await self._event("pwritev_done", request)
        finally:
            self._blkdebug_written += 1
        if error:
            raise _failure(error)

    async def _rmw_read(
        self,
        offset: int,
        length: int,
        start: int,
        end: int,
        request: Request,
        caller: Sender | None,
    ) -> tuple[bytes | bytearray | None, bytes | bytearray | None, bool]:
        """The padding blocks of an unaligned request: (head, tail, merged).

        Like QEMU's bdrv_padding_rmw_read: a padded request of one block, or of two
        blocks with both ends unaligned, is read in one go (merged: `head` is all of
        [start, end)); otherwise head and tail blocks are read separately, each between
        its own pair of events. A failed read raises.
        """
        align = self.align
        has_head = offset != start
        has_tail = offset + length != end
        if end - start == align or (end - start == 2 * align and has_head and has_tail):
            if has_head:
                await self._event("pwritev_rmw_head", request)
            if has_tail:
                await self._event("pwritev_rmw_tail", request)
            merged = await self._padding_read(start, end - start, caller)
            if has_head:
                await self._event("pwritev_rmw_after_head", request)
            if has_tail:
                await self._event("pwritev_rmw_after_tail", request)
            return merged, None, True
        head = tail = None
        if has_head:
            await self._event("pwritev_rmw_head", request)
            head = await self._padding_read(start, align, caller)
            await self._event("pwritev_rmw_after_head", request)
        if has_tail:
            await self._event("pwritev_rmw_tail", request)
            tail = await self._padding_read(end - align, align, caller)
            await self._event("pwritev_rmw_after_tail", request)
        return head, tail, False

    async def _read_modify(
        self,
        offset: int,
        data: Bytes,
        start: int,
        end: int,
        request: Request,
        caller: Sender | None,
    ) -> bytearray:
        """The aligned buffer for an unaligned write, padding read from the image."""
        head, tail, merged = await self._rmw_read(offset, len(data), start, end, request, caller)
        if merged:
            assert head is not None  # merged: head is the whole padded range
            padded = bytearray(head)
        else:
            padded = bytearray(end - start)
            if head is not None:
                padded[: self.align] = head
            if tail is not None:
                padded[-self.align :] = tail
        padded[offset - start : offset - start + len(data)] = data
        return padded

    async def _padding_read(
        self, offset: int, length: int, caller: Sender | None
    ) -> bytes | bytearray:
        # A rule may delay or fail this read; a corruption is not applied: the padding is
        # written back, and corrupting it would change bytes outside the request.
        await self._check_pieces("read", offset, offset + length, caller)
        data = await self.below.read(offset, length)
        return data + bytes(length - len(data))  # past the end of the image: zeros

    # ---- write-zeroes ----

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        unmap: bool = False,
        writethrough: bool = False,
        caller: Sender | None = None,
        no_fallback: bool = False,
    ) -> None:
        """Zero [offset, offset+length) (fallocate ZERO_RANGE; with `unmap` the backing
        file may punch a hole, as `write -z -u`). Raises OSError; pieces before a failing
        one stay zeroed. Counts as written for the next flush, failed or not.
        `no_fallback` (QEMU's BDRV_REQ_NO_FALLBACK): what would need padding or a write of
        zeroes fails with ENOTSUP instead."""
        if length <= 0:
            return
        self._check_power()
        fua = writethrough or self.fua_always
        if not self.raw:
            await self._zero_pwritev(offset, length, unmap, fua, caller, no_fallback)
            return
        try:
            # The raw node passes the request down whole (no event: raw_co_pwrite_zeroes)
            await self._zero_pwritev(offset, length, unmap, fua, caller, no_fallback)
            if fua:
                await self.flush(caller=caller)
        finally:
            self._format_written += 1

    async def _zero_pwritev(
        self,
        offset: int,
        length: int,
        unmap: bool,
        fua: bool,
        caller: Sender | None,
        no_fallback: bool = False,
    ) -> None:
        """bdrv_co_do_zero_pwritev at the blkdebug node: unaligned ends are padded and
        written as data (pwritev, iotype write), the aligned middle as zeroes; with
        `no_fallback` padding is refused (ENOTSUP, before any event)."""
        request = Request("write-zeroes", offset, length)
        end_of_request = offset + length
        start, end = self._padded(offset, length)
        if start == offset and end == end_of_request:
            await self._aligned_zero(offset, end, unmap, fua, request, caller, no_fallback)
            return
        if no_fallback:
            raise _failure(_errno.ENOTSUP)
        align = self.align
        try:
            head, tail, merged = await self._rmw_read(offset, length, start, end, request, caller)
        except OSError:
            self._blkdebug_written += 1  # deliberate difference, as for writes
            raise
        if merged:
            assert head is not None  # merged: head is the whole padded range
            buffer = bytearray(head)
            buffer[offset - start : end_of_request - start] = bytes(length)
            await self._aligned_write(start, buffer, request, caller, fua)
            return
        position = offset
        if head is not None:
            buffer = bytearray(head)
            buffer[offset - start :] = bytes(align - (offset - start))
            await self._aligned_write(start, buffer, request, caller, fua)
            position = start + align
        middle_end = end - align if tail is not None else end
        if middle_end > position:
            await self._aligned_zero(position, middle_end, unmap, fua, request, caller)
        if tail is not None:
            buffer = bytearray(tail)
            buffer[: end_of_request - middle_end] = bytes(end_of_request - middle_end)
            await self._aligned_write(middle_end, buffer, request, caller, fua)

    async def _aligned_zero(
        self,
        start: int,
        end: int,
        unmap: bool,
        fua: bool,
        request: Request,
        caller: Sender | None,
        no_fallback: bool = False,
    ) -> None:
        """bdrv_aligned_pwritev with BDRV_REQ_ZERO_WRITE: pwritev_zero, the pieces,
        pwritev_done."""
        error = 0
        try:
            await self._event("pwritev_zero", request)
            error = await self._do_pwrite_zeroes(
                start, end - start, unmap, fua, caller, no_fallback
            )
            await self._event("pwritev_done", request)
        finally:
            self._blkdebug_written += 1
        if error:
            raise _failure(error)

    async def _do_pwrite_zeroes(
        self,
        offset: int,
        length: int,
        unmap: bool,
        fua: bool,
        caller: Sender | None,
        no_fallback: bool = False,
    ) -> int:
        """bdrv_co_do_pwrite_zeroes at the blkdebug node; 0 or the errno.

        Pieces: up to the first opt-write-zero boundary, then at most max-write-zero,
        then the tail after the last boundary. blkdebug refuses (ENOTSUP) a piece shorter
        than its alignment, and QEMU falls back to writing a buffer of zeroes: checked as
        iotype write, at most max-transfer long.
        """
        alignment = max(self.opt_write_zero, self.align)
        max_zeroes = self.max_write_zero or _INT64_MAX
        max_zeroes -= max_zeroes % alignment
        max_transfer = self.max_transfer or _MAX_BOUNCE_BUFFER
        head = offset % alignment
        tail = (offset + length) % alignment
        need_flush = False
        error = 0
        while length > 0 and not error:
            num = length
            if head:
                num = min(length, max_transfer, alignment - head)
                head = (head + num) % alignment
            elif tail and num > alignment:
                num -= tail
            num = min(num, max_zeroes)
            if num < alignment and no_fallback:
                error = _errno.ENOTSUP  # no fallback write of zeroes: the caller hears it
            elif num < alignment:
                # blkdebug_co_pwrite_zeroes: -ENOTSUP; the fallback write of zeroes
                num = min(num, max_transfer)
                error = await self._check_errno("write", offset, num, caller)
                if not error:
                    try:
                        self._check_power()
                        await self.below.write(offset, bytes(num), fua=fua)
                    except OSError as failure:
                        error = failure.errno or _errno.EIO
            else:
                error = await self._check_errno("write-zeroes", offset, num, caller)
                file_align = self.stack.image.zero_align  # the O_DIRECT file node's own alignment
                if not error and no_fallback and (offset % file_align or num % file_align):
                    error = _errno.ENOTSUP  # the file node would pad it: refused as well
                if not error:
                    try:
                        self._check_power()
                        self.below.write_zeroes(offset, num, unmap, fua=fua)
                    except OSError as failure:  # a full undo log: ENOSPC
                        error = failure.errno or _errno.EIO
            need_flush = fua and not self.raw  # the raw node emulates FUA above
            offset += num
            length -= num
        if not error and need_flush:
            error = await self._blkdebug_flush_errno(caller)
        return error

    # ---- discard ----

    async def discard(self, offset: int, length: int, *, caller: Sender | None = None) -> None:
        """Discard [offset, offset+length) (fallocate PUNCH_HOLE|KEEP_SIZE). No event.
        Raises OSError; pieces before a failing one stay discarded. Counts as written
        for the next flush, failed or not."""
        if length <= 0:
            return
        self._check_power()
        try:
            await self._pdiscard(offset, length, caller)
        finally:
            self._blkdebug_written += 1
            if self.raw:
                self._format_written += 1

    async def _pdiscard(self, offset: int, length: int, caller: Sender | None) -> None:
        """bdrv_co_pdiscard at the blkdebug node: pieces up to the first opt-discard
        boundary, then at most max-discard, then the tail; blkdebug drops (ENOTSUP, no
        check) a piece shorter than `align`. The raw node above splits at the same
        opt-discard boundaries, which changes nothing a rule can see."""
        request_align = self.align
        align = max(self.opt_discard, request_align)
        head = offset % align
        tail = (offset + length) % align
        max_discard = self.max_discard or _INT64_MAX
        max_discard -= max_discard % align
        while length > 0:
            num = length
            if head:
                num = min(length, align - head)
                if num % request_align:
                    num %= request_align
                head = (head + num) % align
            elif tail:
                if num > align:
                    num -= tail
                elif tail % request_align and tail > request_align:
                    tail %= request_align
                    num -= tail
            num = min(num, max_discard)
            if num >= request_align:
                error = await self._check_errno("discard", offset, num, caller)
                if error:
                    raise _failure(error)
                self._check_power()
                self.below.discard(offset, num)
            offset += num
            length -= num

    # ---- block status (SEEK_DATA / SEEK_HOLE) ----

    def _length(self) -> int:
        """The node's length as QEMU sees it: whole sectors (bdrv_getlength rounds up)."""
        return _round_up(self.below.size(), SECTOR_SIZE)

    async def block_status(
        self, offset: int, length: int, *, want_zero: bool = True, caller: Sender | None = None
    ) -> tuple[bool, int]:
        """(data?, bytes): the extent at `offset`, at most `length` long; (False, 0) at or
        past the end. The blkdebug node checks [offset, offset+length) rounded out to
        `align` (iotype block-status); the answer comes from the backing file's
        SEEK_DATA/SEEK_HOLE (want_zero, as the FUSE export asks) or is "all data" (as
        qemu-io's alloc and map ask, with want_zero false). Raises OSError."""
        self._check_power()
        total = self._length()
        if offset >= total or length <= 0:
            return False, 0
        length = min(length, total - offset)
        start, end = self._padded(offset, length)
        error = await self._check_errno("block-status", start, end - start, caller)
        if error:
            raise _failure(error)
        if not want_zero:
            return True, length
        return self.below.extent(offset, length)

    async def seek(self, offset: int, whence: int, *, caller: Sender | None = None) -> int:
        """lseek SEEK_DATA / SEEK_HOLE, as QEMU 7.2's FUSE export (fuse_lseek) answers it:
        one block-status query per extent from `offset` on, each checked. ENXIO past the
        end (and for SEEK_DATA at the end), EINVAL for another whence."""
        self._check_power()
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise _failure(_errno.EINVAL)
        if offset < 0:
            raise _failure(_errno.ENXIO)
        want_data = whence == os.SEEK_DATA
        while True:
            total = self._length()
            is_data, count = await self.block_status(offset, total - offset, caller=caller)
            if not count:
                if offset > total or want_data:
                    raise _failure(_errno.ENXIO)
                return offset
            if is_data == want_data:
                return offset
            offset += count

    # ---- flush ----

    async def flush(self, *, caller: Sender | None = None) -> None:
        """fsync: events always; the check and the real fsync only if something was
        written since the last successful flush. Raises OSError."""
        self._check_power()
        if not self.raw:
            error = await self._blkdebug_flush_errno(caller)
            if error:
                raise _failure(error)
            return
        async with self._flush_lock:
            request = Request("flush", 0, 0)
            format_generation = self._format_written
            await self._event("flush_to_os", request)
            if not self.no_flush:
                if self._format_flushed != format_generation:
                    await self._event("flush_to_disk", request)
                error = await self._blkdebug_flush_errno(caller)
                if error:
                    raise _failure(error)
            self._format_flushed = format_generation

    async def _blkdebug_flush_errno(self, caller: Sender | None) -> int:
        """bdrv_co_flush of the blkdebug node: 0 or the errno. cache=unsafe never gets
        past BDRV_O_NO_FLUSH to the check or the real fsync."""
        async with self._blkdebug_flush_lock:
            if not self.powered:
                return _errno.EIO
            generation = self._blkdebug_written
            try:
                if self._blkdebug_flushed != generation and not self.no_flush:
                    rule, error = self.engine.decide("flush", 0, 0, caller)
                    if rule is not None:
                        if type(error) is not int:  # an extension rule's delay
                            error, _ = await self._settle(error)
                        if rule.drop_unsynced:
                            await self._drop_unsynced()
                        if error:
                            return error
                    await self.below.flush()
                elif not self.no_flush and self.stack.holds_unsynced():
                    # Nothing this node counted, but changes reached the image unsynced (a
                    # FUA write's own data, format none): fsync them, no check.
                    await self.below.flush()
            except OSError as failure:  # the power went during the fsync
                return failure.errno or _errno.EIO
            self._blkdebug_flushed = generation
            return 0

    async def _fua_to_file(self) -> int:
        """A FUA write that reached the file (QEMU 10.0: pwritev2 with RWF_DSYNC): its data
        is on the disk when it returns; no event, no check. 0 or the errno.

        The undo log took the write as durable as it was made (UndoFilter.fua_durable), and
        nothing else: the unsynced writes before it stay unsynced, as RWF_DSYNC leaves them.
        The backing file is fsynced in a worker thread (coarser than RWF_DSYNC on the one
        write, which would wait for the disk in the trio thread, where the undo filter
        writes), past the filters, so none of them takes it for a flush of everything."""
        if self.no_flush:
            return 0
        try:
            await self.stack.image.flush()
        except OSError as failure:
            return failure.errno or _errno.EIO
        if not self.powered:  # the power went during the fsync: the write is not acknowledged
            return _errno.EIO
        return 0

    # ---- power cuts (README "Power cuts") ----

    def _check_power(self) -> None:
        if not self.powered:
            raise OSError(_errno.EIO, "the power is off (blkfuse powercut; poweron to restore)")

    async def _drop_unsynced(self) -> None:
        """fsyncgate: a failing flush loses the dirty data; the disk keeps the flushed image."""
        report = await self.stack.drop_unsynced()
        if report is not None:
            log.info("a flush met a drop-unsynced rule: %d unsynced writes reverted", report.writes)

    async def _rule_cut(self, effect: Effect) -> None:
        """A powercut rule acted on this request: cut now (a request that reaches a rule after
        another cut finds the power off: nothing more to do). The seed comes from the mount's
        and the cut's number among the rule cuts of this mount (`rule_cut_seed`: the first
        uses the mount's seed), so cuts after a poweron draw new coins."""
        if not self.powered:
            return
        ordinal, mount_seed = self.rule_cuts, self.engine.seed
        seed = rule_cut_seed(mount_seed, ordinal)
        self.rule_cuts += 1
        why = f"a powercut rule (the mount's rule cut {ordinal + 1}, its seed from -o seed={mount_seed})"
        await self.power_cut(effect.powercut, seed, effect.powercut_save or None, why=why)

    async def power_cut(
        self, keep: str, seed: int | None, save: str | None = None, *, why: str = "powercut"
    ) -> CutReport:
        """Lose the unsynced writes as `keep` says, make the image show it (fsynced), and
        leave the power off; with `save`, write a sparse copy of the image there. Held and
        suspended requests fail with EIO, whenever their tasks run (even after a poweron:
        none of them may change the image the cut left). The report is also `last_cut`,
        and logged."""
        if self.stack.undo is None:
            raise BlkfuseError(
                _errno.EINVAL,
                "powercut needs -o track-unsynced=on (without it "
                "blkfuse keeps nothing to undo unsynced writes "
                "with)",
            )
        if not self.powered:
            raise BlkfuseError(_errno.EINVAL, "the power is already off (poweron first)")
        self.powered = False
        self.lean_off()  # every request now meets the cut on the full path
        self.cut_at = (time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time_ns())
        lost = OSError(_errno.EIO, "the power was cut while the request was held")
        self.engine.release_suspended(lost)
        self.holds.abort(lost)
        report = await self.stack.power_cut(keep, seed)
        if save is not None:
            try:
                await trio.to_thread.run_sync(sparse_copy, self.stack.image.fd, save)
                report.saved = save
            except OSError as error:
                report.save_error = f"{save}: {error.strerror or error}"
        self.last_cut = report
        # the stamps let cuts of several mounts be compared (Fleet)
        log.warning(
            "power cut (keep=%s seed=%s) at CLOCK_MONOTONIC %d ns, CLOCK_REALTIME %d ns, by %s: %s",
            keep,
            seed,
            *self.cut_at,
            why,
            report.text(),
        )
        return report

    def power_on(self) -> bool:
        """The device is back, nothing unsynced (the cut fsynced). False if it was on."""
        if self.powered:
            return False
        self.powered = True
        self.lean_on()
        log.warning("power on")
        # Everything on the image is synced now, as after a successful flush.
        self._format_flushed = self._format_written
        self._blkdebug_flushed = self._blkdebug_written
        return True
