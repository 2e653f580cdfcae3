"""File operations through QEMU 7.2's own FUSE export and through blkfuse (tests/qsd.py).

The qemu-io differential (test_differential_qemu.py) covers block requests; this one covers
what a FUSE client sends: lseek SEEK_DATA/SEEK_HOLE (QEMU's fuse_lseek asks block status
once per extent, from the offset to the end of the image), fallocate ZERO_RANGE and
PUNCH_HOLE|KEEP_SIZE (fuse_fallocate), pread, pwrite, fsync, over sparse images, in every
cache mode, with and without the raw node. Environment:

  BLKFUSE_DIFF_SEED     seed (default: a fresh random one; fixed under CI)
  BLKFUSE_QSD_N         scenarios through the block layer (default 40)
  BLKFUSE_QSD_MOUNT_N   scenarios through a real mount (default 20)

Scenarios run in worker processes, not threads: QEMU's export flushes the image on every
close of the file (fuse_flush), and a thread forking a child (to start another daemon) while
another thread has the export open makes the kernel close the child's copy of that fd, a
flush out of nowhere. A disagreement must also reproduce: the export is asked a second time,
and where QEMU answers differently twice the scenario is reported, not compared.
"""

import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import qsd

import differential as D

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(qsd.QSD is None, reason="qemu-storage-daemon is not installed"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


def _qsd_differential(target: str, count: int, run_ours) -> None:
    seed = D.run_seed()
    print(f"BLKFUSE_DIFF_SEED={seed}")
    scenarios = qsd.generate_all(seed, count)
    with ProcessPoolExecutor(3) as pool:
        answers = list(pool.map(qsd.run_qsd, scenarios))
    failures, oracle_errors, noise, cut = [], [], [], 0
    for k, (sc, theirs) in enumerate(zip(scenarios, answers)):
        if isinstance(theirs, str):
            oracle_errors.append((sc, theirs))
            continue
        results, image, stop = run_ours(k, sc)
        cut += stop is not None
        problems = qsd.compare(sc, theirs, (results, image), stop)
        if problems:
            again = qsd.run_qsd(sc)
            if again != theirs:
                noise.append(sc)
                continue
            failures.append((sc, problems))
    print(
        f"\nqsd differential ({target}): seed {seed}, {len(scenarios)} scenarios, "
        f"{len(failures)} disagreements, {cut} cut at the deliberate RMW difference, "
        f"{len(noise)} not reproducible in QEMU, {len(oracle_errors)} oracle errors"
    )
    lines = [
        f"{target}: {len(failures)} of {len(scenarios)} file scenarios disagree with "
        f"qemu-storage-daemon's FUSE export (rerun with BLKFUSE_DIFF_SEED={seed})"
    ]
    for sc, problems in failures[:10]:
        lines += [sc.describe()] + [f"    {p}" for p in problems]
    for sc, err in oracle_errors[:5]:
        lines += [f"ORACLE ERROR {sc.ident}: {err}"]
    for sc in noise[:5]:
        lines += [f"QEMU ANSWERED TWO WAYS {sc.ident}", sc.describe()]
    assert not failures and not oracle_errors and not noise, "\n".join(lines)


def test_block_layer_matches_qemu_fuse_export():
    count = D.scenario_count("BLKFUSE_QSD_N", 40)
    _qsd_differential("block layer", count, lambda k, sc: qsd.run_block(sc))


def test_mount_matches_qemu_fuse_export(tmp_path):
    through_the_mount = D.through_mounts(tmp_path, qsd.run_mount, lambda sc: qsd.run_block(sc)[2])
    _qsd_differential("mount", D.scenario_count("BLKFUSE_QSD_MOUNT_N", 20), through_the_mount)
