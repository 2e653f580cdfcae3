"""Real software under faults: scripts/e2e-db runs SQLite on ext4 on a loop device over a
blkfuse mount (ENOSPC, a held COMMIT, EIO on the journal); see the script's docstring."""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "e2e-db")
STEPS = ("a ENOSPC", "b breakpoint on flush_to_disk", "c EIO on a journal write")


def test_sqlite_on_ext4_on_a_loop_device_under_faults():
    # Only where loop devices truly cannot exist: the script needs root and /dev/loop-control.
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup and mount")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices here (/dev/loop-control is missing)")
    for tool in ("losetup", "mkfs.ext4"):
        assert shutil.which(tool), f"{tool} missing (scripts/setup installs it)"
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for step in STEPS:
        assert re.search(rf"^PASS step {re.escape(step)}", out, re.M), out
    assert "database or disk is full" in out
    # ext4's own state says it (read where a container cannot read the kernel log)
    assert re.search(r"ext4 remounted read-only \(/proc/mounts: ro\), errors_count 0 -> [1-9]", out)
    assert "Remounting filesystem read-only" in out or "kernel log not readable here" in out
    # its own work directory is left with nothing mounted (others may run beside it)
    work = re.search(r"^stack: (\S*/blkfuse-e2e-db-[^/]+)/", out, re.M)
    assert work, out
    with open("/proc/mounts") as f:
        assert work.group(1) + "/" not in f.read()
