"""The nodes under the block device, built from a mount's settings (docs/design.md "The
stack"). QEMU's order, top to bottom:

    BlockDevice   raw + blkdebug semantics (device.py): events, rules, padding, splitting
    filters       each a node.Filter over the next, in build_stack's order
    Image         the backing file

A filter is added by one line in build_stack (its position says what it sees: a filter
above the undo filter sees the writes a power cut may take back, in the order they
reached the image). The daemon and the control reach the filters through the stack
(`device.stack.find(Kind)`); a power cut is announced to each of them (Filter.power_cut).
"""

import os
from typing import TypeVar

from blkfuse.block.image import DEFAULT_IO_THREADS, Image
from blkfuse.block.node import Filter, Node
from blkfuse.crash.logwrites import DEFAULT_SUPER_UPDATE_INTERVAL
from blkfuse.crash.undo import DEFAULT_ATOMIC, DEFAULT_CAP, CutReport, UndoFilter, UndoLog
from blkfuse.rules.model import Settings

_F = TypeVar("_F", bound=Filter)


class Stack:
    """The image and the filters over it; `top` is what the block device talks to."""

    def __init__(self, image: Image):
        self.image = image
        self.top: Node = image
        self.filters: list[Filter] = []  # top first

    def add(self, node: _F) -> _F:
        """Put `node` (made over the current top) on top."""
        if node.below is not self.top:
            raise ValueError("a filter goes over the current top of the stack")
        self.filters.insert(0, node)
        self.top = node
        return node

    def find(self, kind: type[_F]) -> _F | None:
        """The (topmost) filter of this kind, or None."""
        for node in self.filters:
            if isinstance(node, kind):
                return node
        return None

    @property
    def undo(self) -> UndoFilter | None:
        """The undo log's filter (-o track-unsynced=on), or None."""
        return self.find(UndoFilter)

    def holds_unsynced(self) -> bool:
        """Changes reached the image that no flush covered yet (known to the undo log, and
        to any filter whose unflushed() says so, the write recorder): a flush must reach
        them even where blkdebug's generation would skip it."""
        return any(node.unflushed() for node in self.filters)

    def takes_fua(self) -> bool:
        """Every filter takes FUA writes as such (the image does: RWF_DSYNC). One that does
        not (the write recorder, as QEMU's blklogwrites) gets FUA emulated with a flush."""
        return all(node.takes_fua for node in self.filters)

    async def power_cut(self, keep: str, seed: int | None) -> CutReport:
        """Every filter hears of the cut (top first), then the undo filter takes back the
        unsynced writes as `keep` says. Needs the undo filter (the caller checked)."""
        undo = self.undo
        assert undo is not None
        for node in self.filters:
            node.power_cut()
        return await undo.cut(keep, seed)

    def mark(self, name: str) -> None:
        """Tell every filter, top first, of a named point in the request stream."""
        for node in self.filters:
            node.mark(name)

    async def drop_unsynced(self) -> CutReport | None:
        """fsyncgate: the unsynced writes are lost, the disk keeps the flushed image. None
        without the undo log."""
        undo = self.undo
        return None if undo is None else await undo.cut("none")

    def close(self) -> None:
        """Close the filters, top first, then the image."""
        for node in self.filters:
            node.close()
        self.image.close()


def open_image(path: str, settings: Settings, *, read_only: bool = False) -> Image:
    """The backing file as a mount with these settings opens it."""
    return Image(
        path,
        read_only=read_only,
        # cache=none/directsync: O_DIRECT, as QEMU's file node (BDRV_O_NOCACHE)
        direct=settings.cache in ("none", "directsync"),
        io_threads=DEFAULT_IO_THREADS if settings.io_threads is None else settings.io_threads,
        # page cache misses through io_uring where it works; "0": the pool (A/B runs)
        uring=os.environ.get("BLKFUSE_URING", "1") != "0",
    )


def build_stack(settings: Settings, image: Image) -> Stack:
    """The filters `settings` ask for, over `image`: bottom first."""
    stack = Stack(image)
    if settings.track_unsynced:
        undo = UndoLog(
            cap=settings.unsynced_cap or DEFAULT_CAP, atomic=settings.atomic or DEFAULT_ATOMIC
        )
        stack.add(UndoFilter(image, undo))
    if settings.log_writes is not None:
        # Over the undo filter, as QEMU's blklogwrites node under blkdebug: it logs what
        # reaches the image, not what a power cut takes back.
        from blkfuse.crash.recorder import Recorder

        stack.add(
            Recorder.open(
                stack.top,
                os.path.abspath(settings.log_writes),  # as the status shows it
                image.pread,
                sectorsize=settings.log_sector_size,
                append=settings.log_append,
                super_update_interval=settings.log_super_update_interval
                or DEFAULT_SUPER_UPDATE_INTERVAL,
                flush_on_close=settings.cache != "unsafe",
            )
        )
    return stack
