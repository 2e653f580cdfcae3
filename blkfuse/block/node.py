"""The file node: what the block device (block/device.py) hands every change and read to,
and the filters that can sit between it and the image, as QEMU's filter nodes sit between
blkdebug and the file (blklogwrites, copy-before-write, ...). docs/design.md "The stack".

A node is anything with these methods. `Image` (block/image.py) is the bottom one; a
`Filter` wraps the node below it and passes every call on unchanged unless it overrides
the method: a filter overrides only what it observes.

    size()                             the length in bytes
    read(offset, length)               data, short only at the end
    write(offset, data, fua=)          all of `data`; `fua`: the request was a FUA write
                                       (where FUA is emulated, 7.2 or a filter that takes
                                       none, its flush comes separately; else it reaches
                                       the file as one, and the undo filter takes it as
                                       durable by itself; a recorder below blkdebug sees it)
    pwrite(offset, data, fua=)         the same write, finished before it returns (no await
                                       in between: the undo log reads what it overwrites
                                       and writes in one step)
    write_zeroes(offset, length, unmap=, fua=)
    discard(offset, length)            advisory: reads as zeroes after, or as before
    truncate(size)                     resize
    flush()                            make every change before it durable (fsync)
    extent(offset, length)             (data?, bytes): SEEK_DATA / SEEK_HOLE

Filters also get `power_cut()` (the power was just cut: called before anything is taken
back, top filter first), `mark(name)` (a named point in the stream, for a recorder) and
`close()`.
"""

from typing import Protocol

from blkfuse.block.image import Bytes


class Node(Protocol):
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def write(self, offset: int, data: Bytes, *, fua: bool = False) -> int: ...

    def pwrite(self, offset: int, data: Bytes, *, fua: bool = False) -> int: ...

    def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, *, fua: bool = False
    ) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def truncate(self, size: int) -> None: ...

    async def flush(self) -> None: ...

    def extent(self, offset: int, length: int) -> tuple[bool, int]: ...


# The node methods a Filter passes on unless its class overrides them.
NODE_METHODS = (
    "size",
    "read",
    "write",
    "pwrite",
    "write_zeroes",
    "discard",
    "truncate",
    "flush",
    "extent",
)


class Filter:
    """A node over `below` that passes everything on. A subclass overrides the methods it
    observes; the others are bound straight to the node below when the filter is made, so
    a pass-through costs nothing per request (the methods below are their documentation)."""

    # The node takes a FUA write as one (QEMU's supported_write_flags has BDRV_REQ_FUA): a
    # node that does not makes the block layer above emulate FUA with a flush after the
    # write, under every profile (device.py, `fua_flushes`).
    takes_fua = True

    def __init__(self, below: Node):
        self.below = below
        for name in NODE_METHODS:
            if getattr(type(self), name) is getattr(Filter, name):
                setattr(self, name, getattr(below, name))

    def size(self) -> int:
        return self.below.size()

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self.below.read(offset, length)

    async def write(self, offset: int, data: Bytes, *, fua: bool = False) -> int:
        return await self.below.write(offset, data, fua=fua)

    def pwrite(self, offset: int, data: Bytes, *, fua: bool = False) -> int:
        return self.below.pwrite(offset, data, fua=fua)

    def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, *, fua: bool = False
    ) -> None:
        self.below.write_zeroes(offset, length, unmap, fua=fua)

    def discard(self, offset: int, length: int) -> None:
        self.below.discard(offset, length)

    def truncate(self, size: int) -> None:
        self.below.truncate(size)

    async def flush(self) -> None:
        await self.below.flush()

    def extent(self, offset: int, length: int) -> tuple[bool, int]:
        return self.below.extent(offset, length)

    # ---- not node methods: the stack calls these on each filter ----

    def power_cut(self) -> None:
        """The power was just cut (before the undo filter takes anything back)."""

    def unflushed(self) -> bool:
        """Changes passed this filter that no flush has covered yet: a flush must reach it
        even where blkdebug's generation is clean (QEMU flushes each child by its own)."""
        return False

    def mark(self, name: str) -> None:
        """A named point in the request stream (Stack.mark: a control command's, say)."""

    def close(self) -> None:
        """The mount ends: give back what the filter holds (files, memory)."""
