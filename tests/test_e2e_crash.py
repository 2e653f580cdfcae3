"""scripts/e2e-crash: SQLite on ext4 on a loop device over a blkfuse mount survives power cuts
with synchronous=FULL, and the negative controls (synchronous=OFF, ext4 barrier=0) bite."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "e2e-crash"


def test_sqlite_survives_power_cuts_and_the_controls_bite():
    if os.geteuid() != 0:
        pytest.skip("scripts/e2e-crash needs root: loop devices and mount")
    for tool in ("losetup", "mkfs.ext4", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (Debian: e2fsprogs, mount)")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices here (/dev/loop-control is missing)")
    iterations = int(os.environ.get("BLKFUSE_CRASH_ITERATIONS", "20"))
    run = subprocess.run(
        [str(SCRIPT), "--iterations", str(iterations), "--control-iterations", "10"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert (
        len(
            re.findall(
                r"^PASS synchronous=FULL seed=\d+: .*integrity ok, all \d+ committed", out, re.M
            )
        )
        == iterations
    ), out
    assert re.search(r"^PASS control synchronous=OFF seed=\d+: bit as expected", out, re.M), out
    assert re.search(r"^PASS control ext4 barrier=0 seed=\d+: bit as expected", out, re.M), out
    # Only this run's mounts: other test runs on the machine may run the script meanwhile.
    base = re.search(r"^e2e-crash: working in (\S+)$", out, re.M).group(1)
    assert base + "/" not in Path("/proc/mounts").read_text()
