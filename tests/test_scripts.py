"""The README's first command, run as a user would: scripts/demo must show what it promises."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_shows_the_injected_error_and_the_breakpoint():
    run = subprocess.run([str(REPO / "scripts" / "demo")], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "Input/output error" in out                  # dd hit the config rule
    assert "No space left on device" in out             # the runtime rule
    assert "suspended at" in out and "resumed" in out   # the breakpoint, then resume
    mounts = Path("/proc/mounts").read_text()
    assert "blkfuse-demo" not in mounts                 # nothing left mounted
