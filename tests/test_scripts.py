"""The README's first command, run as a user would: scripts/demo must show what it promises."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_shows_the_injected_error_and_the_breakpoint(tmp_path):
    # Its scratch directory inside ours: other mounts on the machine are not this run's.
    run = subprocess.run(
        [str(REPO / "scripts" / "demo")],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "Input/output error" in out  # dd hit the config rule
    assert "No space left on device" in out  # the runtime rule
    assert "suspended at" in out and "resumed" in out  # the breakpoint, then resume
    mounts = Path("/proc/mounts").read_text()
    assert str(tmp_path) not in mounts  # nothing of this run left mounted
