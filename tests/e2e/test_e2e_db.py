"""Real software under faults: scripts/e2e-db runs SQLite on ext4 on a loop device over a
blkfuse mount (ENOSPC, a held COMMIT, EIO on the journal); see the script's docstring."""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "e2e-db")
STEPS = ("a ENOSPC", "b breakpoint on flush_to_disk", "c EIO on a journal write")


def test_sqlite_on_ext4_on_a_loop_device_under_faults(tmp_path):
    # Only where loop devices truly cannot exist: the script needs root and /dev/loop-control.
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup and mount")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices here (/dev/loop-control is missing)")
    for tool in ("losetup", "mkfs.ext4"):
        assert shutil.which(tool), f"{tool} missing (scripts/setup installs it)"
    out = tmp_path / "e2e-db.json"
    r = subprocess.run(
        [sys.executable, SCRIPT, "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    result = json.loads(out.read_text())
    assert result["ok"] and result["cleanup"] == [], log
    steps = result["steps"]
    assert [s["name"][: len(want)] for s, want in zip(steps, STEPS, strict=True)] == list(STEPS)
    assert all(s["pass"] for s in steps), log
    enospc, held, eio = (s["facts"] for s in steps)
    assert "database or disk is full" in enospc["sqlite_error"]
    assert enospc["integrity_check"] == [["ok"]] and enospc["rows_after_insert"] == 51
    assert held["held"] == ["flush"] and held["row_after_resume"] == [["held"]]
    # ext4's own state says it (read where a container cannot read the kernel log)
    assert eio["read_only"]
    assert eio["errors_count_after"] > eio["errors_count_before"]
    assert eio["failed_writes"] > 0
    assert eio["kernel_remount"] or eio["kernel_log_unreadable"], eio
    # its own work directory is left with nothing mounted (others may run beside it)
    work = result["work"]
    assert "/blkfuse-e2e-db-" in work and result["stack"]["fs"].startswith(work + "/"), result
    with open("/proc/mounts") as f:
        assert work + "/" not in f.read()
