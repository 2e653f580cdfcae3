"""The stack of nodes under the block device (block/node.py, block/stack.py): what a filter
over the undo filter sees of a real BlockDevice's requests, over a real backing file."""

import errno

import pytest
import trio

from blkfuse.block.device import BlockDevice
from blkfuse.block.image import Image
from blkfuse.block.node import Filter
from blkfuse.block.stack import Stack, build_stack
from blkfuse.crash.undo import UndoFilter, UndoLog
from blkfuse.engine.core import Engine
from blkfuse.rules.model import InjectError, Settings

KiB = 1024


class Seen(Filter):
    """Records what reaches it, as a write recorder below blkdebug would."""

    def __init__(self, below):
        super().__init__(below)
        self.seen = []

    async def write(self, offset, data, *, fua=False):
        done = await self.below.write(offset, data, fua=fua)
        self.seen.append(("write", offset, len(data), fua))
        return done

    def write_zeroes(self, offset, length, unmap=False, *, fua=False):
        self.below.write_zeroes(offset, length, unmap, fua=fua)
        self.seen.append(("zero", offset, length, fua))

    def discard(self, offset, length):
        self.below.discard(offset, length)
        self.seen.append(("discard", offset, length))

    def truncate(self, size):
        self.below.truncate(size)
        self.seen.append(("truncate", size))

    async def flush(self):
        await self.below.flush()
        self.seen.append(("flush",))

    def power_cut(self):
        self.seen.append(("power_cut",))

    def mark(self, name):
        self.seen.append(("mark", name))


def stack_with_seen(tmp_path, size=64 * KiB):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(size))
    image = Image(str(path))
    stack = Stack(image)
    stack.add(UndoFilter(image, UndoLog()))
    seen = stack.add(Seen(stack.top))
    return stack, seen, path


def test_a_filter_sees_each_change_with_its_fua_bit_flushes_resizes_and_the_power_cut(tmp_path):
    stack, seen, path = stack_with_seen(tmp_path)
    rules = [InjectError("none", errno=errno.EIO, iotypes=frozenset({"write"}), sector=64)]
    device = BlockDevice(Engine(rules), stack, align=4096)

    async def main():
        await device.write(0, b"a" * 4096)
        await device.write(8 * KiB, b"b" * 4096, writethrough=True)
        with pytest.raises(OSError):
            await device.write(32 * KiB, b"x" * 512)  # failed by its rule: never reaches it
        await device.write_zeroes(16 * KiB, 8 * KiB)
        await device.discard(24 * KiB, 4 * KiB)
        device.truncate(128 * KiB)
        stack.mark("checkpoint")
        await device.flush()
        await device.write(4 * KiB, b"c" * 100)  # padded to its 4 KiB block
        await device.power_cut("none", None)

    trio.run(main)
    assert seen.seen == [
        ("write", 0, 4096, False),
        ("write", 8 * KiB, 4096, True),
        ("flush",),  # the raw node's emulated FUA, after the write
        ("zero", 16 * KiB, 8 * KiB, False),
        ("discard", 24 * KiB, 4 * KiB),
        ("truncate", 128 * KiB),
        ("mark", "checkpoint"),
        ("flush",),
        ("write", 4 * KiB, 4096, False),
        ("power_cut",),
    ]
    data = path.read_bytes()
    assert data[4 * KiB : 8 * KiB] == bytes(4096)  # the unsynced write was taken back
    assert data[8 * KiB : 12 * KiB] == b"b" * 4096


def test_a_failing_flush_is_not_seen_and_the_undo_filter_keeps_its_log(tmp_path):
    stack, seen, _ = stack_with_seen(tmp_path)
    rule = InjectError("none", errno=errno.EIO, iotypes=frozenset({"flush"}), once=True)
    device = BlockDevice(Engine([rule]), stack)

    async def main():
        await device.write(0, b"a" * 4096)
        with pytest.raises(OSError):
            await device.flush()
        assert len(stack.undo.log) == 1
        await device.flush()
        assert len(stack.undo.log) == 0

    trio.run(main)
    assert seen.seen == [("write", 0, 4096, False), ("flush",)]


def test_a_filter_passes_on_what_it_does_not_override_straight_to_the_node_below(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"z" * 4096)
    image = Image(str(path))
    plain = Filter(image)
    assert plain.read == image.read and plain.flush == image.flush
    seen = Seen(plain)
    assert seen.read == image.read  # through two filters, still the image's own method
    assert seen.write != image.write
    with pytest.raises(ValueError):
        Stack(image).add(Seen(Filter(image)))  # not over the top of the stack
    image.close()


def test_build_stack_follows_the_settings(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    image = Image(str(path))
    assert build_stack(Settings(), image).filters == []
    stack = build_stack(Settings(track_unsynced=True, unsynced_cap=8192, atomic=4096), image)
    assert stack.top is stack.undo and stack.undo.below is image
    assert (stack.undo.log.cap, stack.undo.log.atomic) == (8192, 4096)
    stack.close()
