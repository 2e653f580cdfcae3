"""A request held when the power is cut fails with EIO and changes nothing, whatever holds
it: a delay rule (on each iotype), a breakpoint, or a delay on the padding read of an
unaligned write. Through real mounts; one block-level test for the case a mount cannot
time: a poweron before the held request's task runs again (issue 21, part 1)."""

import errno
import os
import threading
import time

import pytest
import trio
from support.device import build_device

from blkfuse.block.device import Holds
from blkfuse.block.image import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)
from blkfuse.engine.core import Engine
from blkfuse.rules.config import parse_rule_args

from imageio import MiB, pattern

TRACK = ("-o", "track-unsynced=on")


class Op(threading.Thread):
    """One system call on the mounted image in its own thread (it is held)."""

    def __init__(self, m, call):
        super().__init__(daemon=True)
        self.m, self.call = m, call
        self.error: OSError | None = None
        self.result = None

    def run(self) -> None:
        fd = os.open(self.m.file, os.O_RDWR)
        try:
            self.result = self.call(fd)
        except OSError as e:
            self.error = e
        finally:
            os.close(fd)


def _wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + 120  # hang guard only
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def _unsynced_write(fd: int) -> None:
    os.pwrite(fd, b"u" * 4096, 12288)


# (name, rule or breakpoint to hold with, what is done before (not held), the held call)
HOLDS = [
    (
        "read",
        "inject-error event=none iotype=read delay=60s",
        None,
        lambda fd: os.pread(fd, 4096, 0),
    ),
    (
        "write",
        "inject-error event=none iotype=write delay=60s",
        None,
        lambda fd: os.pwrite(fd, b"w" * 4096, 8192),
    ),
    ("flush", "inject-error event=none iotype=flush delay=60s", _unsynced_write, os.fsync),
    (
        "write-zeroes",
        "inject-error event=none iotype=write-zeroes delay=60s",
        None,
        lambda fd: fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 65536, 65536),
    ),
    (
        "discard",
        "inject-error event=none iotype=discard delay=60s",
        None,
        lambda fd: fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 65536),
    ),
    ("breakpoint", "break pwritev W", None, lambda fd: os.pwrite(fd, b"b" * 4096, 8192)),
]


@pytest.mark.parametrize("name,hold,before,call", HOLDS, ids=[h[0] for h in HOLDS])
def test_a_request_held_at_the_cut_fails_with_eio_and_changes_nothing(
    mount, name, hold, before, call
):
    data = pattern(MiB)
    m = mount(*TRACK, data=data)
    if before is not None:
        fd = os.open(m.file, os.O_RDWR)
        try:
            before(fd)
        finally:
            os.close(fd)
    m.ctl(hold)
    op = Op(m, call)
    op.start()
    if name == "breakpoint":
        m.ctl("wait_break W 60")
    else:
        _wait_until(lambda: m.status()["held_by_delay"] == 1, "the request is held")
    m.ctl("powercut")
    op.join(60)
    assert not op.is_alive()
    assert op.error is not None and op.error.errno == errno.EIO, (op.result, op.error)
    assert m.image.read_bytes() == data
    m.ctl("poweron")
    status = m.status()
    assert status["held_by_delay"] == 0 and status["suspended"] == []
    assert status["unsynced"]["writes"] == 0
    assert m.image.read_bytes() == data  # nothing landed after the poweron either


def test_a_held_padding_read_of_an_unaligned_write_fails_and_the_write_never_lands(mount):
    data = pattern(MiB)
    m = mount(*TRACK, "-o", "align=4096", data=data)
    m.ctl("inject-error event=none iotype=read delay=60s")
    op = Op(m, lambda fd: os.pwrite(fd, b"p" * 100, 4196))
    op.start()
    _wait_until(lambda: m.status()["held_by_delay"] == 1, "the padding read is held")
    m.ctl("powercut")
    op.join(60)
    assert op.error is not None and op.error.errno == errno.EIO, (op.result, op.error)
    m.ctl("poweron")
    assert m.image.read_bytes() == data


def test_a_held_write_fails_even_when_the_power_is_back_before_its_task_runs(tmp_path):
    """The cut ends the hold; the held task runs only later, after a poweron. It must still
    fail: the image is as the cut left it."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(65536))
    engine = Engine([parse_rule_args("inject-error", ["event=none", "iotype=write", "delay=60s"])])
    block = build_device(path, engine, track_unsynced=True)
    image = block.stack.image
    outcome = {}

    async def fsync_without_a_checkpoint():
        image.fsync_now()

    image.fsync = fsync_without_a_checkpoint

    async def main():
        async def writer():
            try:
                await block.write(4096, b"x" * 4096)
                outcome["result"] = "written"
            except OSError as e:
                outcome["result"] = e.errno

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            while len(block.holds) == 0:
                await trio.sleep(0)
            await block.power_cut("none", 1)
            assert block.power_on()  # before the writer's task has run again
        assert outcome["result"] == errno.EIO
        assert path.read_bytes() == bytes(65536)

    trio.run(main)
    image.close()


def test_aborted_holds_and_suspensions_raise_the_failure_when_the_task_runs():
    """Holds.abort ends every delay's hold now and each raises the failure given;
    Engine.release_suspended(failure) does the same for breakpoints; a hold that ends by
    itself, or a plain release, raises nothing."""
    engine = Engine()
    holds = Holds()
    outcomes = {}

    async def main():
        async def held(name, seconds):
            try:
                await holds.hold(seconds)
                outcomes[name] = "went on"
            except OSError as e:
                outcomes[name] = e.errno

        async def suspended(name, tag):
            suspension = engine.fire("read_aio")
            assert suspension is not None
            try:
                await suspension.wait()
                outcomes[name] = "went on"
            except OSError as e:
                outcomes[name] = e.errno

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held, "short", 0.001)
            while "short" not in outcomes:
                await trio.sleep(0.001)
            nursery.start_soon(held, "long", 600)
            engine.add_breakpoint("read_aio", "B")
            nursery.start_soon(suspended, "broken", "B")
            while len(holds) != 1 or not engine.is_suspended("B"):
                await trio.sleep(0)
            failure = OSError(errno.EIO, "cut")
            assert holds.abort(failure) == 1
            assert engine.release_suspended(failure) == 1
        engine.add_breakpoint("read_aio", "C")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(suspended, "released", "C")
            while not engine.is_suspended("C"):
                await trio.sleep(0)
            engine.release_suspended()

    trio.run(main)
    assert outcomes == {
        "short": "went on",
        "long": errno.EIO,
        "broken": errno.EIO,
        "released": "went on",
    }
