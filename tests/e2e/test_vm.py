"""Proof under a real VM: scripts/e2e-vm boots a Linux guest on a blkfuse mount.

The guest (TCG, Debian cloud kernel, busybox initramfs) reads and writes its virtio disk with
dd while the script drives MNT/control; see the script's docstring for the three steps.
"""

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
    "guest finished",
)

pytestmark = pytest.mark.vm


def test_guest_sees_injected_faults_and_breakpoints():
    for tool in ("qemu-system-x86_64", "busybox", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/setup installs it)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    before = _e2e_mounts()  # other runs on this machine may have their own
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for step in STEPS:
        assert re.search(rf"^PASS (step )?{re.escape(step)}\b", out, re.M), out
    assert not re.search(r"^FAIL", out, re.M), out
    # what the guest kernel said about the failed requests
    assert re.search(r"I/O error, dev vda, sector 2048\b", out), out
    assert re.search(r"I/O error, dev vda, sector 8200\b", out), out
    assert _e2e_mounts() <= before, "scripts/e2e-vm left a mount behind"


def _e2e_mounts() -> set[str]:
    with open("/proc/mounts") as f:
        return {line for line in f if "blkfuse-e2e-" in line}
