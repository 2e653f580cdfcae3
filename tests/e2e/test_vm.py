"""Proof under a real VM: scripts/e2e-vm boots a Linux guest on a blkfuse mount.

The guest (TCG, Debian cloud kernel, busybox initramfs) reads and writes its virtio disk with
dd while the script drives MNT/control; see the script's docstring for the three steps.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "e2e-vm")
STEPS = (
    "1 inject-error on one sector",
    "2 runtime ENOSPC after the first flush",
    "3 breakpoint on write_aio",
    "4 discard rule fails the guest's blkdiscard",
)

pytestmark = pytest.mark.vm


def test_guest_sees_injected_faults_and_breakpoints(tmp_path):
    for tool in ("qemu-system-x86_64", "busybox", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/setup installs it)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    out = tmp_path / "e2e-vm.json"
    r = subprocess.run(
        [sys.executable, SCRIPT, "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    result = json.loads(out.read_text())
    assert result["ok"] and result["guest_finished"] and result["failures"] == [], log
    steps = result["steps"]
    assert [s["name"] for s in steps] == list(STEPS), log
    assert all(s["pass"] for s in steps), log
    one, two, three, four = (s["evidence"] for s in steps)
    # what the guest kernel said about the failed requests
    assert any(re.search(r"I/O error, dev vda, sector 2048\b", ln) for ln in one["guest_kernel"])
    assert any(re.search(r"I/O error, dev vda, sector 8200\b", ln) for ln in two["guest_kernel"])
    assert one["eio_injected"] >= 1 and two["enospc_injected"] >= 1
    assert two["state"] == [1, 2] and two["first_write"] == "ok"
    assert three["held"]["op"] == "write" and three["guest_while_held"] == "running"
    assert four["discard_under_rule"] != "ok" and four["discard_without_rule"] == "ok"
    # its own work directory is left with nothing mounted (others may run beside it)
    work = result["work"]
    assert "/blkfuse-e2e-" in work, result
    with open("/proc/mounts") as f:
        assert work + "/" not in f.read(), "scripts/e2e-vm left a mount behind"
