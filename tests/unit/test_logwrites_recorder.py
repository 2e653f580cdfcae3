"""The recorder in the block layer (a BlockDevice built as the daemon builds it, with
log_writes set): random changes at any offset and length (writes, FUA writes, write-zeroes,
discards, resizes, flushes) under several log sector sizes, blkdebug alignments and
track-unsynced; replaying the log up to each mark must give exactly the image at that mark."""

import hashlib
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings, strategies as st
from support.device import build_device

from blkfuse.crash.logwrites import read_log
from blkfuse.crash.replay import Target

SIZE = 64 * 1024

_offset = st.integers(0, SIZE - 1)
_length = st.integers(1, 9000)
_op = st.one_of(
    st.tuples(st.just("write"), _offset, _length, st.integers(1, 255)),
    st.tuples(st.just("fua"), _offset, _length, st.integers(1, 255)),
    st.tuples(st.just("zero"), _offset, _length, st.booleans()),
    st.tuples(st.just("discard"), _offset, _length, st.just(0)),
    # Disk sizes are whole sectors (else a padded write at the end would replay past it).
    st.tuples(
        st.just("resize"), st.integers(8, 32).map(lambda n: n * 4096), st.just(0), st.just(0)
    ),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(_op, min_size=1, max_size=14),
    sectorsize=st.sampled_from([512, 4096, 64]),
    align=st.sampled_from([None, 512, 4096]),
    track_unsynced=st.booleans(),
)
def test_replay_to_each_mark_gives_the_image_then(
    tmp_path: Path, ops: list, sectorsize: int, align: int | None, track_unsynced: bool
) -> None:
    for stale in tmp_path.iterdir():
        stale.unlink()
    image, log = tmp_path / "disk.img", tmp_path / "disk.log"
    initial = bytes(range(256)) * (SIZE // 256)
    image.write_bytes(initial)
    device = build_device(
        image,
        log_writes=str(log),
        log_sector_size=sectorsize,
        align=align,
        growable=True,
        track_unsynced=track_unsynced,
    )
    at_mark: list[str] = []

    async def main() -> None:
        for i, (kind, a, b, c) in enumerate(ops):
            size = device.size()
            if kind in ("write", "fua") and a < size:
                await device.write(a, bytes([c]) * min(b, size - a), writethrough=kind == "fua")
            elif kind == "zero" and a < size:
                await device.write_zeroes(a, min(b, size - a), unmap=c)
            elif kind == "discard" and a < size:
                await device.discard(a, min(b, size - a))
            elif kind == "resize":
                device.truncate(a)
            elif kind == "flush":
                await device.flush()
            device.stack.mark(f"m{i}")
            at_mark.append(_digest(image))

    try:
        trio.run(main)
    finally:
        device.stack.close()
    entries = list(read_log(log)[1])
    target = tmp_path / "replayed.img"
    target.write_bytes(initial)
    replayed = Target(str(target))
    mark = 0
    try:
        for entry in entries:
            replayed.apply(entry, sectorsize)
            if entry.is_mark and entry.mark == f"m{mark}":
                assert _digest(target) == at_mark[mark], (mark, ops[: mark + 1])
                mark += 1
    finally:
        replayed.close()
    assert mark == len(ops)
