"""Scripts run as a user would: scripts/demo must show what it promises (the README's first
command), and scripts/floor must serve its image."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import force_unmount, is_mounted

REPO = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("locked", [False, True], ids=["handoff", "locked-loop"])
def test_floor_serves_the_image_with_either_request_loop(tmp_path, locked):
    """scripts/floor (the README's floor under blkfuse) is a working passthrough."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 256)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = [
        str(REPO / "scripts" / "floor"),
        *(["--locked"] if locked else []),
        str(image),
        str(mnt),
    ]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60  # a hang guard, not a timing check
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, (
                "scripts/floor did not mount"
            )
            time.sleep(0.05)
        fd = os.open(mnt / "disk.img", os.O_RDWR)
        try:
            assert os.pread(fd, 4096, 4096) == image.read_bytes()[4096:8192]
            os.pwrite(fd, b"x" * 512, 0)
        finally:
            os.close(fd)
        assert image.read_bytes()[:512] == b"x" * 512
    finally:
        force_unmount(mnt)
        proc.wait(60)
    assert proc.returncode == 0
    assert not is_mounted(mnt)
