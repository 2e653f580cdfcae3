"""scripts/oracle-record: the recorded answers of the installed QEMU are what its qemu-io
answers today (7.2: the cases themselves; 10.0: tests/data/oracle/qemu-10.0), so the
recorder reads qemu-io right and no stored recording has gone stale."""

import os
import subprocess
import sys

import pytest

import differential as D

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "oracle-record")

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(D.QEMU_IO is None, reason="qemu-io is not installed"),
]


def test_the_installed_qemus_recordings_are_current():
    r = subprocess.run(
        [sys.executable, SCRIPT, "--check"], capture_output=True, text=True, timeout=600
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "51 cases checked against" in out and "0 problem(s)" in out, out
    assert D.installed_profile() in ("7.2", "10.0")
