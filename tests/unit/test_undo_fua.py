"""A FUA write that reaches the file (QEMU 10.0) makes that write durable, and only it: the
undo filter (crash/undo.py, `fua_durable`) against a naive model of a disk with a volatile
write cache, on random histories of writes, FUA writes, resizes and flushes (some flushes
with changes arriving while their fsync runs), cut in each mode.

The model keeps the image as of the last flush and the changes since, in order. A cut
may lose any plain change since the flush but no FUA write:
    none     the flushed image with the FUA writes since applied, in order (the baseline)
    prefix   the flushed image with the first k plain changes and every FUA write applied,
             in order, for the k the cut reports
    random   each atomic unit is its current bytes or its baseline bytes, the size one of
             the two sizes
"""

import os
import random
import tempfile

import trio
import trio.testing
from hypothesis import example, given, settings, strategies as st
from support.device import build_device

from blkfuse.block.stack import build_stack, open_image
from blkfuse.rules.model import Settings

KiB = 1024


def _apply(image: bytearray, op: tuple) -> None:
    if op[0] == "truncate":
        size = op[1]
        del image[size:]
        image.extend(bytes(size - len(image)))
        return
    _, offset, data, _fua = op
    if len(image) < offset:
        image.extend(bytes(offset - len(image)))
    image[offset : offset + len(data)] = data


class Model:
    def __init__(self, initial: bytes):
        self.flushed = bytearray(initial)
        self.ops: list[tuple] = []  # the changes since the last flush, in order
        self.current = bytearray(initial)

    def change(self, op: tuple) -> None:
        if op[0] == "truncate" and op[1] == len(self.current):
            return  # no change: no entry either
        self.ops.append(op)
        _apply(self.current, op)

    def flushed_up_to(self, count: int) -> None:
        """A flush covered the first `count` changes since the last one."""
        for op in self.ops[:count]:
            _apply(self.flushed, op)
        del self.ops[:count]

    def state(self, kept: int | None) -> bytes:
        """The flushed image with the FUA writes and the first `kept` plain changes."""
        image = bytearray(self.flushed)
        plain = 0
        for op in self.ops:
            durable = op[0] == "write" and op[3]
            if durable or (kept is not None and plain < kept):
                _apply(image, op)
            plain += not durable
        return bytes(image)


def _in(ranges: list[list[int]], position: int) -> bool:
    return any(start <= position < start + length for start, length in ranges)


def check(after: bytes, model: Model, report, keep: str, atomic: int) -> None:
    baseline, current = model.state(0), bytes(model.current)
    if keep == "none":
        assert after == baseline
    elif keep == "prefix":
        assert after == model.state(report.writes_kept)
    else:
        assert len(after) in (len(baseline), len(current))
        for unit in range(0, len(after), atomic):
            got = after[unit : unit + atomic]
            now = current[unit : unit + atomic].ljust(atomic, b"\0")[: len(got)]
            old = baseline[unit : unit + atomic].ljust(atomic, b"\0")[: len(got)]
            assert got in (now, old), f"unit {unit // atomic}"
    # what the cut reports lost covers every byte it changed (a FUA write's are not lost)
    for position in range(min(len(after), len(current))):
        if after[position] != current[position]:
            assert _in(report.lost, position), f"byte {position} changed, not reported lost"


ops = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["write", "fua"]), st.integers(0, 20 * KiB), st.integers(1, 5000)
        ),
        st.tuples(st.just("truncate"), st.integers(0, 24 * KiB), st.just(0)),
        # a flush, and how many of the next changes arrive while its fsync runs
        st.tuples(st.just("flush"), st.integers(0, 3), st.just(0)),
    ),
    max_size=14,
)


@settings(max_examples=300, deadline=None)
@given(
    initial=st.integers(0, 16 * KiB),
    history=ops,
    keep=st.sampled_from(["none", "prefix", "random"]),
    atomic=st.sampled_from([512, 1024, 4096]),
    seed=st.integers(0, 2**32),
)
# a flush that covers one write while a write and a FUA write over it come in, then a write
# over the FUA write: the note of the FUA write must move with the entries the flush forgets
@example(
    initial=4 * KiB,
    history=[
        ("write", 0, 100),
        ("flush", 2, 0),
        ("write", 1000, 3000),
        ("fua", 2000, 1000),
        ("write", 1500, 2000),
    ],
    keep="none",
    atomic=512,
    seed=1,
)
def test_a_cut_keeps_fua_writes_and_may_lose_every_plain_change_since_the_flush(
    initial, history, keep, atomic, seed
):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "disk.img")
        with open(path, "wb") as f:
            f.write(random.Random(seed).randbytes(initial))
        settings_ = Settings(track_unsynced=True, atomic=atomic)
        stack = build_stack(settings_, open_image(path, settings_))
        undo = stack.undo
        assert undo is not None
        undo.fua_durable = True
        with open(path, "rb") as f:
            model = Model(f.read())

        def change(number: int, kind: str, offset: int, length: int) -> None:
            if kind == "truncate":
                undo.truncate(offset)
                model.change(("truncate", offset))
            else:
                data = random.Random(number).randbytes(length)
                undo.pwrite(offset, data, fua=kind == "fua")
                model.change(("write", offset, data, kind == "fua"))

        async def main():
            i = 0
            while i < len(history):
                kind, a, b = history[i]
                i += 1
                if kind != "flush":
                    change(i, kind, a, b)
                    continue
                covered = len(model.ops)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(undo.flush)
                    await trio.testing.wait_all_tasks_blocked()  # in its fsync
                    for _ in range(a):  # changes that come while the fsync runs
                        if i < len(history) and history[i][0] != "flush":
                            change(i + 1, *history[i])
                            i += 1
                model.flushed_up_to(covered)
            report = await undo.cut(keep, seed)
            assert len(undo.log) == 0 and undo.log.held() == 0
            return report

        report = trio.run(main)
        stack.close()
        with open(path, "rb") as f:
            after = f.read()
        check(after, model, report, keep, atomic)


# ---- through the block device ----------------------------------------------------------------


def _device(tmp_path, qemu: str, **kw):
    path = tmp_path / f"{qemu}-{kw.get('cache', 'writeback')}.img"
    path.write_bytes(bytes(64 * KiB))
    return build_device(path, track_unsynced=True, qemu=qemu, **kw), path


def test_under_10_0_a_fua_write_over_an_unsynced_one_keeps_only_its_own_bytes(tmp_path):
    """A plain write A over [0, 16K), then a FUA write B over [4K, 8K) and one C past the
    end, then a cut that keeps nothing: A's bytes outside B go back, B's and C's stay."""
    block, path = _device(tmp_path, "10.0")

    async def main():
        await block.write(0, b"A" * 16 * KiB)
        await block.write(4 * KiB, b"B" * 4 * KiB, writethrough=True)
        await block.write(80 * KiB, b"C" * 512, writethrough=True)  # grows the image
        assert len(block.stack.undo.log) == 1  # B and C are not unsynced
        report = await block.power_cut("none", None)
        assert report.writes == 1 and report.lost == [[0, 4 * KiB], [8 * KiB, 8 * KiB]]

    trio.run(main)
    block.stack.close()
    expected = bytearray(80 * KiB + 512)
    expected[4 * KiB : 8 * KiB] = b"B" * 4 * KiB
    expected[80 * KiB :] = b"C" * 512
    assert path.read_bytes() == expected


def test_a_fua_write_is_a_flush_of_everything_under_7_2_cache_unsafe_ignores_it(tmp_path):
    """Where FUA is emulated (7.2: a flush after the write) the earlier writes become
    durable with it; cache=unsafe drops the FUA: nothing is durable."""
    for qemu, cache, survives in (("7.2", "writeback", True), ("10.0", "unsafe", False)):
        block, path = _device(tmp_path, qemu, cache=cache)

        async def main(block=block):
            await block.write(0, b"A" * 4096)
            await block.write(8192, b"B" * 4096, writethrough=True)
            await block.power_cut("none", None)

        trio.run(main)
        block.stack.close()
        data = path.read_bytes()
        assert data[:4096] == (b"A" * 4096 if survives else bytes(4096)), (qemu, cache)
        assert data[8192:12288] == (b"B" * 4096 if survives else bytes(4096)), (qemu, cache)


def test_cache_writethrough_under_10_0_makes_every_write_durable_on_its_own(tmp_path):
    """Every write is FUA: none enters the log, none is lost, and no flush was needed."""
    block, path = _device(tmp_path, "10.0", cache="writethrough")

    async def main():
        await block.write(0, b"A" * 4096)
        block.truncate(32 * KiB)  # a resize is no FUA write: unsynced
        await block.write(8192, b"B" * 4096)
        assert len(block.stack.undo.log) == 1
        await block.power_cut("none", None)

    trio.run(main)
    block.stack.close()
    data = path.read_bytes()
    assert len(data) == 64 * KiB  # the resize was lost, the writes were not
    assert data[:4096] == b"A" * 4096 and data[8192:12288] == b"B" * 4096
