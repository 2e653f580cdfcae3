"""Power cuts at the block layer: the undo log, powercut/poweron, torn= and drop-unsynced=.

Every test drives blkfuse.block.BlockDevice over a real backing file (no FUSE) and compares
the backing file with what the model in README "Power cuts" says it must hold.
"""

import errno
import os
import random

import pytest
import trio
from support.device import build_device

from blkfuse.crash import undo as unsynced_module
from blkfuse.engine.core import Engine
from blkfuse.errors import BlkfuseError
from blkfuse.rules.model import InjectError

KiB = 1024


class Dev:
    """A BlockDevice over a file in tmp_path, with its undo log."""

    def __init__(self, tmp_path, initial: bytes, rules=(), track=True, name="disk.img", **kw):
        self.path = tmp_path / name
        self.path.write_bytes(initial)
        self.engine = Engine(list(rules))
        cap, atomic = kw.pop("cap", None), kw.pop("atomic", None)
        self.block = build_device(
            self.path, self.engine, track_unsynced=track, unsynced_cap=cap, atomic=atomic, **kw
        )
        self.image = self.block.stack.image
        undo = self.block.stack.undo
        self.log = undo.log if undo is not None else None

    def data(self) -> bytes:
        return self.path.read_bytes()


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def run(fn):
    trio.run(fn)


# ---- the log ------------------------------------------------------------------------------


def test_writes_since_the_last_flush_are_logged_and_a_flush_forgets_them(tmp_path):
    d = Dev(tmp_path, bytes(16 * KiB))

    async def main():
        await d.block.write(0, b"a" * 4096)
        await d.block.write(8192, b"b" * 100)
        assert (len(d.log), d.log.bytes) == (2, 4196)
        await d.block.flush()
        assert (len(d.log), d.log.bytes, d.log.held()) == (0, 0, 0)
        await d.block.write(512, b"c" * 512)
        assert (len(d.log), d.log.bytes) == (1, 512)

    run(main)


def test_keep_none_gives_back_the_flushed_image_size_included(tmp_path):
    initial = noise(10 * KiB, 1)
    d = Dev(tmp_path, initial)

    async def main():
        await d.block.write(1000, noise(3000, 2))
        await d.block.flush()
        synced = d.data()
        await d.block.write(0, noise(700, 3))
        await d.block.write(9 * KiB, noise(4 * KiB, 4))  # grows the file to 13 KiB
        d.block.truncate(5 * KiB)  # shrinks it
        await d.block.write(6 * KiB, noise(100, 5))  # a hole, then data
        report = await d.block.power_cut("none", None)
        assert d.data() == synced
        assert (report.writes, report.writes_lost, report.writes_kept) == (4, 4, 0)
        assert report.size == len(synced)
        assert not d.block.powered

    run(main)


def test_failed_writes_do_not_enter_partial_ones_enter_with_what_they_wrote(tmp_path):
    # max-transfer 4 KiB: a 16 KiB write fails at its third chunk (sector 16 = byte 8192)
    d = Dev(
        tmp_path,
        bytes(32 * KiB),
        rules=[InjectError("none", sector=16, iotypes=frozenset({"write"}))],
        max_transfer=4096,
    )

    async def main():
        with pytest.raises(OSError):
            await d.block.write(8192, b"x" * 4096)  # fails whole: nothing written
        assert len(d.log) == 0
        with pytest.raises(OSError):
            await d.block.write(0, b"y" * 16 * KiB)  # chunks 0, 1 written, 2 fails
        assert len(d.log) == 2 and d.log.bytes == 8 * KiB
        assert d.data()[: 8 * KiB] == b"y" * 8 * KiB
        await d.block.power_cut("none", None)
        assert d.data() == bytes(32 * KiB)

    run(main)


def test_prefix_keeps_a_real_prefix_of_the_writes_in_completion_order(tmp_path):
    seen = set()
    for seed in range(40):
        d = Dev(tmp_path, noise(8 * KiB, 7), name=f"p{seed}.img")

        async def main():
            await d.block.flush()
            snapshots = [d.data()]
            rng = random.Random(99)  # the same history every time
            for i in range(6):
                offset = rng.randrange(0, 12 * KiB)
                await d.block.write(offset, noise(rng.randrange(1, 3000), i))
                snapshots.append(d.data())
            report = await d.block.power_cut("prefix", seed)
            k = report.writes_kept
            assert report.writes_lost == 6 - k
            assert d.data() == snapshots[k], f"seed {seed}: not the image after {k} writes"
            seen.add(k)

        run(main)
        d.image.close()
    assert len(seen) >= 4  # the point really is random


def _random_history(d, rng):
    async def history():
        for i in range(8):
            offset = rng.randrange(0, 20 * KiB)
            await d.block.write(offset, noise(rng.randrange(1, 2500), 100 + i))

    return history


@pytest.mark.parametrize("atomic", [512, 4096])
def test_random_keeps_or_loses_each_unit_whole_and_the_same_seed_gives_the_same_image(
    tmp_path, atomic
):
    results = {}
    for seed, copy in ((5, 0), (5, 1), (6, 0)):
        d = Dev(tmp_path, noise(16 * KiB, 8), atomic=atomic, name=f"r{seed}{copy}.img")

        async def main():
            await d.block.flush()
            synced = d.data()
            await _random_history(d, random.Random(3))()
            current = d.data()
            report = await d.block.power_cut("random", seed)
            after = d.data()
            final = len(after)
            assert final in (len(synced), len(current))
            kept = lost = 0
            for unit in range(0, max(len(synced), len(current)), atomic):
                got = after[unit : unit + atomic]
                now = current[unit : unit + atomic][: len(got)]
                old = synced[unit : unit + atomic].ljust(atomic, b"\0")[: len(got)]
                if now == old:
                    continue  # untouched (or equal)
                assert got in (now, old), f"unit {unit // atomic} is neither kept nor lost"
                kept += got == now
                lost += got == old
            assert kept and lost  # it really tears
            assert report.units >= kept + lost
            results[(seed, copy)] = (after, report.text())

        run(main)
        d.image.close()
    assert results[(5, 0)] == results[(5, 1)]  # same seed, same history
    assert results[(5, 0)][0] != results[(6, 0)][0]


def test_the_cap_refuses_the_write_that_would_pass_it_with_enospc(tmp_path):
    d = Dev(tmp_path, bytes(64 * KiB), cap=8 * KiB)

    async def main():
        await d.block.write(0, b"a" * 4096)
        before = d.data()
        with pytest.raises(OSError) as failure:
            await d.block.write(4096, b"b" * 4096)  # 8 KiB + bookkeeping > cap
        assert failure.value.errno == errno.ENOSPC
        assert d.data() == before  # nothing written
        assert len(d.log) == 1 and d.log.refused == 1
        assert "unsynced-cap=8192" in d.log.last_refusal
        await d.block.flush()  # a flush empties the log
        await d.block.write(4096, b"b" * 4096)
        await d.block.power_cut("none", None)
        assert d.data() == before  # still exactly undoable

    run(main)


def test_pre_images_spill_to_a_scratch_file_and_come_back(tmp_path, monkeypatch):
    monkeypatch.setattr(unsynced_module, "MEMORY_BYTES", 3000)
    d = Dev(tmp_path, noise(64 * KiB, 11))
    d.log.scratch_dir = str(tmp_path)

    async def main():
        await d.block.flush()
        synced = d.data()
        for i in range(20):
            await d.block.write(i * 3000, noise(2000, i))
        assert d.log._spilled > 0
        assert os.listdir(tmp_path) == ["disk.img"]  # the scratch file is unlinked
        await d.block.power_cut("none", None)
        assert d.data() == synced

    run(main)


# ---- power off ----------------------------------------------------------------------------


def test_while_off_every_request_fails_with_eio_and_raises_no_event(tmp_path):
    d = Dev(tmp_path, noise(8 * KiB, 1))

    async def main():
        await d.block.write(0, b"z" * 512)
        await d.block.power_cut("none", None)
        counts = dict(d.engine.event_counts)
        for request in (d.block.read(0, 512), d.block.write(0, b"q"), d.block.flush()):
            with pytest.raises(OSError) as failure:
                await request
            assert failure.value.errno == errno.EIO
        with pytest.raises(OSError):
            d.block.truncate(0)
        assert d.engine.event_counts == counts
        with pytest.raises(BlkfuseError) as again:
            await d.block.power_cut("none", None)
        assert again.value.errno == errno.EINVAL
        assert d.block.power_on()
        assert not d.block.power_on()  # already on
        assert await d.block.read(0, 512) == noise(8 * KiB, 1)[:512]
        assert len(d.log) == 0

    run(main)


def test_powercut_without_the_log_is_einval_naming_the_option(tmp_path):
    d = Dev(tmp_path, bytes(4096), track=False)

    async def main():
        with pytest.raises(BlkfuseError) as failure:
            await d.block.power_cut("none", None)
        assert failure.value.errno == errno.EINVAL
        assert "track-unsynced=on" in str(failure.value)
        assert d.block.powered

    run(main)


def test_a_request_suspended_at_the_cut_is_let_go_and_fails_with_eio(tmp_path):
    d = Dev(tmp_path, bytes(8 * KiB))
    outcome = {}

    async def main():
        async def writer():
            try:
                await d.block.write(0, b"w" * 4096)
                outcome["result"] = "written"
            except OSError as e:
                outcome["result"] = e.errno

        d.engine.add_breakpoint("pwritev_done", "A")  # after the data reached the image
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await d.engine.wait_break("A")
            assert d.data()[:4096] == b"w" * 4096
            report = await d.block.power_cut("none", None)
            assert report.writes_lost == 1
        assert outcome["result"] == errno.EIO
        assert d.data() == bytes(8 * KiB)
        assert d.engine.suspended() == []

    run(main)


def test_a_flush_whose_fsync_spans_a_cut_fails_and_syncs_nothing(tmp_path, monkeypatch):
    d = Dev(tmp_path, bytes(8 * KiB))
    outcome = {}

    async def main():
        gate = trio.Event()
        real_fsync = d.image.fsync

        async def slow_fsync():
            await gate.wait()
            await real_fsync()

        monkeypatch.setattr(d.image, "fsync", slow_fsync)

        async def flusher():
            try:
                await d.block.flush()
                outcome["result"] = "ok"
            except OSError as e:
                outcome["result"] = e.errno

        await d.block.write(0, b"f" * 512)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher)
            await trio.sleep(0)
            cut = trio.Event()

            async def cutter():
                await d.block.power_cut("none", None)
                cut.set()

            nursery.start_soon(cutter)
            await trio.sleep(0)
            gate.set()
            await cut.wait()
        assert outcome["result"] == errno.EIO
        assert d.data() == bytes(8 * KiB)

    run(main)


# ---- rule keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [errno.EIO, 0])
def test_torn_keeps_the_first_sectors_and_loses_the_rest(tmp_path, error):
    rule = InjectError("none", errno=error, torn=3, once=True, iotypes=frozenset({"write"}))
    d = Dev(tmp_path, bytes(16 * KiB), rules=[rule])

    async def main():
        data = noise(8 * 512, 4)
        if error:
            with pytest.raises(OSError) as failure:
                await d.block.write(1024, data)
            assert failure.value.errno == error
        else:
            assert await d.block.write(1024, data) == len(data)  # reports success
        assert d.data()[1024 : 1024 + 1536] == data[:1536]
        assert d.data()[1024 + 1536 :] == bytes(16 * KiB - 1024 - 1536)
        assert len(d.log) == 1 and d.log.bytes == 1536  # what it wrote, undoable
        await d.block.write(1024, data)  # once: spent
        assert d.data()[1024 : 1024 + len(data)] == data

    run(main)


def test_drop_unsynced_flush_fails_the_retry_succeeds_and_the_data_is_gone(tmp_path):
    rule = InjectError(
        "none", errno=errno.EIO, drop_unsynced=True, once=True, iotypes=frozenset({"flush"})
    )
    d = Dev(tmp_path, bytes(8 * KiB), rules=[rule])

    async def main():
        await d.block.write(0, b"d" * 4096)
        with pytest.raises(OSError) as failure:
            await d.block.flush()
        assert failure.value.errno == errno.EIO
        assert d.data() == bytes(8 * KiB)  # dropped at the failure
        await d.block.flush()  # fsyncgate: the retry passes
        assert d.data() == bytes(8 * KiB) and len(d.log) == 0
        assert d.block.powered

    run(main)


def test_unaligned_write_with_align_is_undone_exactly(tmp_path):
    initial = noise(8 * KiB, 21)
    d = Dev(tmp_path, initial, align=4096)

    async def main():
        await d.block.write(100, b"u" * 50)  # read-modify-write of 4 KiB
        assert d.data()[100:150] == b"u" * 50
        await d.block.power_cut("none", None)
        assert d.data() == initial

    run(main)


# ---- the engine side of the keys ----------------------------------------------------------


def test_decide_answers_the_rule_and_once_spends_a_torn_rule_even_with_errno_0():
    plain = InjectError("none", errno=0, once=True, iotypes=frozenset({"read"}))
    torn = InjectError("none", errno=0, torn=1, once=True, iotypes=frozenset({"write"}))
    engine = Engine([plain, torn])
    assert engine.decide("read", 0, 512) == (plain, 0)
    assert engine.decide("read", 0, 512) == (plain, 0)  # errno 0, once: stays (QEMU)
    assert engine.decide("write", 0, 512) == (torn, 0)
    assert engine.decide("write", 0, 512) == (None, 0)  # torn, once: spent
    assert engine.check("read", 0, 512) == 0 and plain.hits == 3
    assert engine.errors_injected == {}


def test_release_suspended_keeps_the_breakpoints_not_yet_hit():
    engine = Engine()

    async def main():
        engine.add_breakpoint("read_aio", "A")
        engine.add_breakpoint("write_aio", "B")
        suspension = engine.fire("read_aio")
        assert suspension is not None and not suspension.done
        assert engine.release_suspended() == 1
        assert suspension.done and engine.suspended() == []
        assert engine.breakpoints() == [("write_aio", "B")]

    run(main)


# ---- write-zeroes and discard change data too --------------------------------------------


def test_write_zeroes_and_discard_enter_the_log_and_are_undone(tmp_path):
    initial = noise(64 * KiB, 31)
    d = Dev(tmp_path, initial)

    async def main():
        await d.block.write_zeroes(4096, 8192)
        await d.block.discard(32768, 16384)
        assert d.data()[4096:12288] == bytes(8192)
        assert d.data()[32768:49152] == bytes(16384)
        assert len(d.log) == 2
        await d.block.power_cut("none", None)
        assert d.data() == initial
        for request in (
            d.block.write_zeroes(0, 4096),
            d.block.discard(0, 4096),
            d.block.seek(0, os.SEEK_DATA),
            d.block.block_status(0, 4096),
        ):
            with pytest.raises(OSError) as failure:
                await request
            assert failure.value.errno == errno.EIO

    run(main)


# ---- every mode against a model, on random histories with resizes -------------------------


@pytest.mark.parametrize("history_seed", range(40))
def test_each_mode_matches_the_model_on_random_histories(tmp_path, history_seed):
    """Random writes, truncates (shrink and grow) and flushes; then a cut in each mode.
    none: the last flushed image; prefix: the image after exactly k changes; random: every
    unit is its current or its flushed bytes (zeros where the file did not reach), and the
    size is one of the two."""
    rng = random.Random(history_seed)
    atomic = rng.choice([512, 1024, 4096])
    for keep in ("none", "prefix", "random"):
        d = Dev(
            tmp_path,
            noise(rng.randrange(1, 24 * KiB), history_seed),
            atomic=atomic,
            name=f"{keep}.img",
        )
        history = random.Random(history_seed * 7 + 1)

        async def main():
            snapshots = [d.data()]
            for step in range(history.randrange(1, 14)):
                action = history.random()
                if action < 0.15:
                    await d.block.flush()
                    snapshots = [d.data()]
                elif action < 0.3:
                    d.block.truncate(history.randrange(0, 40 * KiB))
                    snapshots.append(d.data())
                else:
                    offset = history.randrange(0, 36 * KiB)
                    await d.block.write(offset, noise(history.randrange(1, 6000), step))
                    snapshots.append(d.data())
            report = await d.block.power_cut(keep, history_seed)
            after = d.data()
            check_cut(after, snapshots, report, keep, atomic)

        run(main)
        d.image.close()


def check_cut(after: bytes, snapshots: list, report, keep: str, atomic: int) -> None:
    """The image after a cut is what the model says: snapshots[0] the last flushed image,
    snapshots[i] the image after the i-th unsynced change."""
    synced, current = snapshots[0], snapshots[-1]
    if keep == "none":
        assert after == synced
    elif keep == "prefix":
        assert after == snapshots[report.writes_kept]
    else:
        assert len(after) in (len(synced), len(current))
        for unit in range(0, len(after), atomic):
            got = after[unit : unit + atomic]
            now = current[unit : unit + atomic].ljust(atomic, b"\0")[: len(got)]
            old = synced[unit : unit + atomic].ljust(atomic, b"\0")[: len(got)]
            assert got in (now, old), f"unit {unit // atomic}"
