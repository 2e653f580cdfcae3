"""What QEMU's block layer does around blkdebug, for one image (DESIGN.md §4).

QEMU stacks a raw format node over the blkdebug node over the file. A request's life
there decides which events blkdebug sees, in which order, and when it is checked:

    raw node       read_aio / write_aio per chunk of max-transfer; writethrough emulates
                   FUA with a flush after the last chunk; keeps the format-layer "written
                   since flush" generation that decides whether flush_to_disk fires
    blkdebug node  pads unaligned requests to `align` (read-modify-write, pwritev_rmw_*),
                   pwritev, the check, pwritev_done; keeps its own generation, which
                   decides whether a flush is checked at all. A padded request longer than
                   max-transfer is split again here, so each piece is checked on its own
                   (found by the differential test: QEMU writes the pieces before a
                   failing one)
    file           the backing image

BlockDevice reproduces that with the engine and the image, and nothing about FUSE.

A check answers 0, an errno, or (blkfuse's extension rules) an Effect: the request is held
with trio.sleep in its own task (nothing else waits for it), then fails or goes on, and a
corruption changes the data read or written, inside the request and the rule's sectors only.
"""

import os

import trio

from .effects import Effect, corrupt
from .engine import Caller, Engine, Request
from .image import Image


def _failure(error: int) -> OSError:
    return OSError(error, os.strerror(error))


async def _hold(engine: Engine, outcome: int | Effect) -> tuple[int, Effect | None]:
    """A check's non-zero outcome -> (errno, the corruption to apply), after its delay."""
    if type(outcome) is int:
        return outcome, None
    if outcome.delay:
        await engine.hold(outcome.delay)
    return outcome.errno, (outcome if outcome.corrupt else None)


class BlockDevice:
    def __init__(self, engine: Engine, image: Image, *, align: int | None = None,
                 max_transfer: int | None = None):
        self.engine = engine
        self.image = image
        self.align = align or 1
        self.max_transfer = max_transfer or 0
        # "Written since the last successful flush", as QEMU's write_gen/flushed_gen pairs.
        # Failed writes count too; a failed flush leaves its generation dirty.
        self._format_written = 0
        self._format_flushed = 0
        self._blkdebug_written = 0
        self._blkdebug_flushed = 0
        self._flush_lock = trio.Lock()    # QEMU lets one flush per node run at a time

    def size(self) -> int:
        return self.image.size()

    def truncate(self, size: int) -> None:
        self.image.truncate(size)

    async def _event(self, event: str, request: Request) -> None:
        suspension = self.engine.fire(event, request)
        if suspension is not None:
            await suspension.wait()

    def _pieces(self, start: int, end: int):
        """The driver calls blkdebug's node makes for [start, end): one, or max-transfer
        sized pieces (QEMU's bdrv_aligned_preadv/pwritev fragmenting), each checked."""
        step = self.max_transfer
        if not step or end - start <= step:
            return ((start, end),)
        return tuple((pos, min(pos + step, end)) for pos in range(start, end, step))

    async def _check_pieces(self, iotype: str, start: int, end: int,
                            caller: Caller | None) -> list:
        """Check each piece; raise for the first failing one. Returns the corruptions to
        apply as (effect, piece start, piece end)."""
        corruptions = []
        for piece_start, piece_end in self._pieces(start, end):
            length = piece_end - piece_start
            # (without a caller, QEMU's three arguments: engines that wrap check keep working)
            outcome = (self.engine.check(iotype, piece_start, length) if caller is None
                       else self.engine.check(iotype, piece_start, length, caller))
            if outcome:
                error, effect = await _hold(self.engine, outcome)
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

    async def read(self, offset: int, length: int, *, caller: Caller | None = None) -> bytes:
        """Data at [offset, offset+length), short at end of image. Raises OSError."""
        size = self.image.size()
        if length <= 0 or offset >= size:
            return b""
        length = min(length, size - offset)
        step = self.max_transfer
        if not step or length <= step:
            return await self._read_chunk(offset, length, caller)
        end = offset + length
        return b"".join([await self._read_chunk(pos, min(step, end - pos), caller)
                         for pos in range(offset, end, step)])

    async def _read_chunk(self, offset: int, length: int, caller: Caller | None) -> bytes:
        suspension = self.engine.fire("read_aio", Request("read", offset, length))
        if suspension is not None:
            await suspension.wait()
        start, end = self._padded(offset, length)
        corruptions = None
        if self.max_transfer:
            corruptions = await self._check_pieces("read", start, end, caller)
        else:
            outcome = (self.engine.check("read", start, end - start) if caller is None
                       else self.engine.check("read", start, end - start, caller))
            if outcome:
                error, effect = await _hold(self.engine, outcome)
                if error:
                    raise _failure(error)
                if effect is not None:
                    corruptions = [(effect, start, end)]
        if start == offset and end == offset + length:
            data = self.image.pread(offset, length)
        else:
            data = self.image.pread(start, end - start)[offset - start:offset - start + length]
        if corruptions:
            # what is returned changes, the image does not
            for effect, piece_start, piece_end in corruptions:
                data = corrupt(data, offset, effect, piece_start, piece_end)
        return data

    # ---- write ----

    async def write(self, offset: int, data, *, writethrough: bool = False,
                    caller: Caller | None = None) -> int:
        """Write all of `data` or raise OSError. Chunks before a failing one stay written.

        `writethrough` (a handle opened O_SYNC/O_DSYNC): a successful write is followed
        by a flush, whose failure fails the write although the data reached the image.
        """
        length = len(data)
        if length == 0:
            return 0
        try:
            step = self.max_transfer
            if not step or length <= step:
                await self._write_chunk(offset, data, caller)
            else:
                view = memoryview(data)
                for pos in range(0, length, step):
                    await self._write_chunk(offset + pos, view[pos:pos + step], caller)
            if writethrough:
                await self.flush(caller=caller)
        finally:
            # The raw node counts the write only now, after its FUA flush: so that
            # flush never fires flush_to_disk for its own write (DESIGN.md §4).
            self._format_written += 1
        return length

    async def _write_chunk(self, offset: int, data, caller: Caller | None) -> None:
        length = len(data)
        request = Request("write", offset, length)
        engine = self.engine
        suspension = engine.fire("write_aio", request)
        if suspension is not None:
            await suspension.wait()
        start, end = self._padded(offset, length)
        error = 0
        try:
            if start != offset or end != offset + length:
                try:
                    data = await self._read_modify(offset, data, start, end, request, caller)
                except OSError as failure:
                    # Deliberate difference: QEMU 7.2 ignores this and writes garbage.
                    error = failure.errno
            if not error:
                suspension = engine.fire("pwritev", request)
                if suspension is not None:
                    await suspension.wait()
                for piece_start, piece_end in self._pieces(start, end):
                    piece = data[piece_start - start:piece_end - start]
                    size = piece_end - piece_start
                    error = (engine.check("write", piece_start, size) if caller is None
                             else engine.check("write", piece_start, size, caller))
                    if error:
                        error, effect = await _hold(self.engine, error)
                        if error:
                            break       # pieces before it stay written, as in QEMU
                        if effect is not None:
                            # silent corruption on the way to the disk: inside the data
                            # written (never the read-modify-write padding), reported done
                            piece = corrupt(piece, piece_start, effect,
                                            offset, offset + length)
                    self.image.pwrite(piece_start, piece)
                    if engine.heal_rules:
                        engine.written(piece_start, piece_end - piece_start)
            await self._event("pwritev_done", request)
        finally:
            self._blkdebug_written += 1
        if error:
            raise _failure(error)

    async def _read_modify(self, offset: int, data, start: int, end: int,
                           request: Request, caller: Caller | None) -> bytearray:
        """The aligned buffer for an unaligned write, padding read from the image.

        Like QEMU's bdrv_padding_rmw_read: a padded request of one block, or of two
        blocks with both ends unaligned, is read in one go; otherwise head and tail
        blocks are read separately, each between its own pair of events.
        """
        align = self.align
        head = offset != start
        tail = offset + len(data) != end
        padded = bytearray(end - start)
        if end - start == align or (end - start == 2 * align and head and tail):
            if head:
                await self._event("pwritev_rmw_head", request)
            if tail:
                await self._event("pwritev_rmw_tail", request)
            padded[:] = await self._padding_read(start, end - start, caller)
            if head:
                await self._event("pwritev_rmw_after_head", request)
            if tail:
                await self._event("pwritev_rmw_after_tail", request)
        else:
            if head:
                await self._event("pwritev_rmw_head", request)
                padded[:align] = await self._padding_read(start, align, caller)
                await self._event("pwritev_rmw_after_head", request)
            if tail:
                await self._event("pwritev_rmw_tail", request)
                padded[-align:] = await self._padding_read(end - align, align, caller)
                await self._event("pwritev_rmw_after_tail", request)
        padded[offset - start:offset - start + len(data)] = data
        return padded

    async def _padding_read(self, offset: int, length: int, caller: Caller | None) -> bytes:
        # A rule may delay or fail this read; a corruption is not applied: the padding is
        # written back, and corrupting it would change bytes outside the request.
        await self._check_pieces("read", offset, offset + length, caller)
        data = self.image.pread(offset, length)
        return data + bytes(length - len(data))     # past the end of the image: zeros

    # ---- flush ----

    async def flush(self, *, caller: Caller | None = None) -> None:
        """fsync: events always; the check and the real fsync only if something was
        written since the last successful flush. Raises OSError."""
        async with self._flush_lock:
            request = Request("flush", 0, 0)
            format_generation = self._format_written
            await self._event("flush_to_os", request)
            if self._format_flushed != format_generation:
                await self._event("flush_to_disk", request)
            blkdebug_generation = self._blkdebug_written
            if self._blkdebug_flushed != blkdebug_generation:
                error = (self.engine.check("flush", 0, 0) if caller is None
                         else self.engine.check("flush", 0, 0, caller))
                if error:
                    error, _ = await _hold(self.engine, error)
                    if error:
                        raise _failure(error)
                await self.image.fsync()
                self._blkdebug_flushed = blkdebug_generation
            self._format_flushed = format_generation
