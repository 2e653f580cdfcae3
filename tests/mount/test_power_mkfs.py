"""mkfs.ext4 on a big sparse track-unsynced mount (issue 21, part 1): its whole-device discard
and its writes over holes cost the undo log no pre-image bytes, so a 64 MiB cap is enough
for a 16 GiB device (before, the discard alone wanted 16 GiB of pre-images and was refused).
The time it takes is measured by scripts/bench-mkfs, not here."""

import os
import subprocess

from imageio import MiB

GiB = 1024 * MiB


def _detach(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True)
    while os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file"):
        subprocess.run(["udevadm", "settle"], capture_output=True)


def test_mkfs_ext4_on_a_16g_sparse_tracked_mount_with_a_64m_cap(mount):
    m = mount("-o", "track-unsynced=on,unsynced-cap=64M", size=16 * GiB)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(m.file)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        r = subprocess.run(["mkfs.ext4", "-q", "-F", dev], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        # what mkfs wrote since its last fsync is still in the log: small, and all data
        unsynced = m.status()["unsynced"]
        assert unsynced["refused"] == 0 and unsynced["held"] < 64 * MiB
        check = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        _detach(dev)
    assert m.status()["power"] == "on"
    # the image stayed sparse: what mkfs wrote, not 16 GiB of zeros
    assert os.stat(m.image).st_blocks * 512 < 1 * GiB


def test_bench_mkfs_prints_the_ratio_line_per_size():
    """scripts/bench-mkfs runs end to end (its numbers are for README, not asserted)."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench-mkfs")
    r = subprocess.run([script, "--sizes", "64M", "--runs", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    size, *numbers = r.stdout.splitlines()[-1].split()
    assert size == "64M" and len(numbers) == 6 and all(float(n) > 0 for n in numbers)
