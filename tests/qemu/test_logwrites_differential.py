"""The write log against QEMU's: generated blkdebug scenarios (tests/differential.py) run
through qemu-io with a blklogwrites node between blkdebug and the file, and through a blkfuse
mount with -o log-writes. The two logs must match entry for entry (sector, length, flags,
data) except the documented differences (README "Record and replay"):

  * blkfuse sets LOG_FUA_FLAG on a FUA write; QEMU's driver never does (FUA is compared off);
  * blkfuse logs a resize as a mark `resize:SIZE`; QEMU's node passes it through unlogged;
  * a discard's partial log sectors: QEMU's node drops them, blkfuse's image loses them and
    its log says so with padded writes. The scenarios' discards are made sector-aligned.
"""

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from blkfuse.crash.logwrites import FUA, LogEntry, Superblock, read_log
from blkfuse.crash.recorder import parse_resize_mark
from blkfuse.crash.replay import Target

import differential as D

pytestmark = pytest.mark.qemu

SEED = int(os.environ.get("BLKFUSE_DIFF_SEED", "2020"))
MAGIC = (0x6A736677736872).to_bytes(8, "little")
COUNT = int(os.environ.get("BLKFUSE_LOGWRITES_SCENARIOS", "40"))


def _sector_aligned(sc: D.Scenario) -> D.Scenario:
    ops = []
    for op in sc.ops:
        if op[0] == "discard":
            start = op[1] - op[1] % 512
            end = min(sc.image_size, -(-(op[1] + op[2]) // 512) * 512)
            op = ("discard", start, end - start)
        ops.append(op)
    return dataclasses.replace(sc, ops=ops)


def _comparable(entries: list[LogEntry]) -> list[tuple[object, ...]]:
    return [
        (e.sector, e.nr_sectors, e.flags & ~FUA, e.data, e.mark)
        for e in entries
        if parse_resize_mark(e.mark) is None
    ]


def _qemu_log(sc: D.Scenario, workdir: Path) -> tuple[list[LogEntry], bytes]:
    config, image, log = workdir / "blkdebug.conf", workdir / "qemu.raw", workdir / "qemu.log"
    config.write_text(sc.config)
    image.write_bytes(sc.image())
    log.write_bytes(b"")
    argv = sc.qemu_argv(config, image, "flush", log_path=log)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=workdir)
    assert "Could not open" not in done.stderr, done.stderr
    raw = log.read_bytes()
    if not raw:
        return [], image.read_bytes()  # nothing reached the node, or nothing was flushed
    if raw[:8] != MAGIC:
        # QEMU writes its superblock only on a flush (or every interval entries): a run
        # whose flushes all failed leaves entries behind a blank first sector.
        log.write_bytes(Superblock(0, 512).pack() + raw[512:])
    return list(read_log(log, trailing=True)[1]), image.read_bytes()


def _replay_all(entries: list[LogEntry], target: Path) -> bytes:
    done = Target(str(target))
    try:
        for entry in entries:
            done.apply(entry, 512)
    finally:
        done.close()
    return target.read_bytes()


def _before_the_deliberate_difference(sc: D.Scenario) -> D.Scenario:
    """Cut at the first write whose read-modify-write read fails (QEMU 7.2 writes garbage
    there, blkfuse fails the write: README, deliberate differences)."""
    deliberate = D.mount_deliberate(sc)
    return dataclasses.replace(sc, ops=sc.ops[: deliberate[0][0]]) if deliberate else sc


def _scenarios() -> list[D.Scenario]:
    return [
        _before_the_deliberate_difference(D.as_file_operations(_sector_aligned(sc)))
        for sc in D.generate_all(SEED, COUNT)
    ]


@pytest.mark.parametrize("sc", _scenarios(), ids=lambda sc: f"{sc.index}-{sc.profile}")
def test_the_log_matches_qemu_blklogwrites(sc: D.Scenario, fuse_dir: Path) -> None:
    qemu_entries, qemu_image = _qemu_log(sc, fuse_dir)
    log = fuse_dir / "blkfuse.log"
    (fuse_dir / "mount").mkdir()
    _, image = D.run_mount(sc, fuse_dir / "mount", {"log-writes": str(log)})
    ours = list(read_log(log, trailing=True)[1])
    assert _comparable(ours) == _comparable(qemu_entries), sc.describe()
    # QEMU's log replays (blkfuse replay's Target) onto the initial image to QEMU's image,
    # and ours to ours (a resize is in our log only: QEMU's cannot replay one).
    replays = [("ours", ours, image)]
    if not any(op[0] == "truncate" for op in sc.ops):
        replays.append(("qemu", qemu_entries, qemu_image))
    for name, entries_of, final in replays:
        target = fuse_dir / f"replay-{name}.raw"
        target.write_bytes(sc.image())
        replayed = _replay_all(entries_of, target)
        assert replayed[: len(final)] == final, f"{name}: replay differs\n{sc.describe()}"
