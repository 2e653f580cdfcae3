"""Pre-images of holes are holes: the undo log keeps only the data a change overwrote, and a
cut punches the holes back (issue 21, part 1). Block-level, over sparse backing files; the
mkfs.ext4 proof through a mount is in test_power_mkfs.py."""

import os
import random
import shutil
import tempfile

import pytest
import trio
from test_unsynced import Dev, check_cut, noise

from blkfuse.crash.undo import ENTRY_BYTES

KiB = 1024
MiB = 1024 * KiB


def data_map(path) -> list[tuple[int, int]]:
    """The file's data extents, from SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, extents, position = os.fstat(fd).st_size, [], 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            position = end
        return extents
    finally:
        os.close(fd)


def sparse_dev(tmp_path, size: int, data_at=(), **kw) -> Dev:
    d = Dev(tmp_path, b"", **kw)
    os.truncate(d.path, size)
    for offset, data in data_at:
        with open(d.path, "r+b") as f:
            f.seek(offset)
            f.write(data)
    return d


def test_discard_write_zeroes_and_writes_over_holes_hold_no_pre_image_bytes(tmp_path):
    d = sparse_dev(tmp_path, 64 * MiB, [(8 * MiB, b"D" * 65536)])
    before, holes_before = d.data(), data_map(d.path)

    async def main():
        await d.block.discard(0, 64 * MiB)  # over one 64 KiB data extent, the rest holes
        assert d.log.held() == 65536 + ENTRY_BYTES
        await d.block.write_zeroes(16 * MiB, 16 * MiB)
        await d.block.write(40 * MiB, b"w" * MiB)
        assert d.log.held() == 65536 + 3 * ENTRY_BYTES
        report = await d.block.power_cut("none", None)
        assert report.lost == [[0, 64 * MiB]]

    trio.run(main)
    assert d.data() == before
    assert data_map(d.path) == holes_before  # the holes are holes again, not zeros


def test_a_write_over_data_and_holes_keeps_only_the_data(tmp_path):
    d = sparse_dev(tmp_path, 4 * MiB, [(65536, b"a" * 4096), (3 * 65536, b"b" * 8192)])
    before, holes_before = d.data(), data_map(d.path)

    async def main():
        await d.block.write(0, noise(MiB, 1))
        assert d.log.held() == 4096 + 8192 + ENTRY_BYTES
        await d.block.power_cut("none", None)

    trio.run(main)
    assert d.data() == before and data_map(d.path) == holes_before


@pytest.mark.parametrize("history_seed", range(30))
def test_each_mode_matches_the_model_on_sparse_random_histories(tmp_path, history_seed):
    """Writes, discards, write-zeroes, truncates and flushes over a sparse file; then a cut.
    The bytes are what the model says (test_unsynced's), and every byte that the cut changed
    lies in one of its "lost" extents."""
    rng = random.Random(history_seed)
    atomic = rng.choice([512, 4096])
    for keep in ("none", "prefix", "random"):
        d = sparse_dev(
            tmp_path,
            256 * KiB,
            [(rng.randrange(0, 200 * KiB), noise(rng.randrange(1, 20000), history_seed))],
            atomic=atomic,
            name=f"{keep}.img",
        )
        history = random.Random(history_seed * 7 + 1)

        async def main(d: Dev, history: random.Random, keep: str) -> None:
            snapshots = [d.data()]
            for step in range(history.randrange(1, 14)):
                action = history.random()
                offset = history.randrange(0, 300 * KiB)
                length = history.randrange(1, 40 * KiB)
                if action < 0.1:
                    await d.block.flush()
                    snapshots = [d.data()]
                    continue
                if action < 0.2:
                    d.block.truncate(history.randrange(0, 320 * KiB))
                elif action < 0.4:
                    await d.block.discard(offset, min(length, max(0, d.block.size() - offset)))
                elif action < 0.6:
                    await d.block.write_zeroes(offset, length, unmap=history.random() < 0.5)
                else:
                    await d.block.write(offset, noise(length, step))
                if len(d.log) == len(snapshots):  # the change made one entry (or none)
                    snapshots.append(d.data())
                assert len(d.log) == len(snapshots) - 1
            current = snapshots[-1]
            report = await d.block.power_cut(keep, history_seed)
            after = d.data()
            check_cut(after, snapshots, report, keep, atomic)
            width = max(len(after), len(current))
            a, c = after.ljust(width, b"\0"), current.ljust(width, b"\0")
            covered = bytearray(width)
            for offset, length in report.lost:
                covered[offset : offset + length] = b"\1" * len(covered[offset : offset + length])
            changed = [i for i in range(width) if a[i] != c[i] and not covered[i]]
            assert not changed, f"bytes changed outside the lost extents: {changed[:5]}"

        trio.run(main, d, history, keep)
        d.image.close()


def test_holes_are_not_asked_where_asking_costs_a_scan(tmp_path):
    """tmpfs answers SEEK_HOLE by walking its pages up to the next hole (29 ms per write on a
    full 1 GiB file): there a small range keeps its bytes instead; a file allocated whole is
    never asked anywhere. A large range on tmpfs still keeps only its data."""
    from blkfuse.block.image import Image
    from blkfuse.crash.undo import SMALL_RANGE, _data_runs

    shm = tempfile.mkdtemp(dir="/dev/shm")
    try:
        path = os.path.join(shm, "img")
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
            f.seek(MiB)
            f.write(b"d" * 65536)
        image = Image(path)
        try:
            assert image.seek_hole_scans
            assert _data_runs(image, 0, 4096) is None  # small: not asked, kept as bytes
            assert _data_runs(image, 0, 4 * MiB) == (MiB, MiB + 65536)
            assert _data_runs(image, 0, SMALL_RANGE) == ()  # at the limit: asked, all hole
        finally:
            image.close()
        with open(path, "r+b") as f:
            f.write(b"x" * 4 * MiB)  # allocated whole
        image = Image(path)
        try:
            assert _data_runs(image, 0, 4 * MiB) is None
        finally:
            image.close()
    finally:
        shutil.rmtree(shm)
    disk = tmp_path / "img"  # not tmpfs: a small range over a hole is asked
    disk.write_bytes(b"")
    os.truncate(disk, 4 * MiB)
    image = Image(str(disk))
    try:
        assert not image.seek_hole_scans and _data_runs(image, 0, 4096) == ()
    finally:
        image.close()
