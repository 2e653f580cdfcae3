"""Interrupts: a process whose request blkfuse holds can be killed, and the mount goes on.

SIGINT and SIGKILL of a client held at a breakpoint (python os.pwrite/os.pread, dd), of a
process blocked writing `wait_break` to control, and of `blkfuse ctl MNT wait_break W`: the
kernel sends FUSE_INTERRUPT, the held request ends with EINTR (its tag is released and the
status counts it), and the process ends. Timing is never asserted: the waits are hang guards.
"""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import BLKFUSE

# Hang guard, not a timing check.
WEDGED_SECONDS = 120

PYTHON_CLIENT = """
import os, sys
path, op = sys.argv[1], sys.argv[2]
if op == "wait_break":
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, b"wait_break W\\n")
else:
    fd = os.open(path, os.O_RDWR)
    if op == "pwrite":
        os.pwrite(fd, b"x" * 4096, 0)
    else:
        os.pread(fd, 4096, 0)
"""


def _start(m, client: str) -> subprocess.Popen:
    if client == "dd":
        args = ["dd", "if=/dev/zero", f"of={m.file}", "bs=4k", "count=1", "conv=notrunc"]
    elif client == "ctl":
        args = BLKFUSE + ["ctl", str(m.mnt), "wait_break W 10m"]
    elif client == "wait_break":
        args = [sys.executable, "-c", PYTHON_CLIENT, str(m.control), "wait_break"]
    else:
        args = [sys.executable, "-c", PYTHON_CLIENT, str(m.file), client]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WEDGED_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.02)


def _end(proc: subprocess.Popen, signum: int) -> int:
    proc.send_signal(signum)
    try:
        return proc.wait(WEDGED_SECONDS)  # it ends: its request was answered
    finally:
        if proc.poll() is None:
            proc.kill()


def _still_serves(m) -> None:
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"after" * 100, 8192)
        assert os.pread(fd, 500, 8192) == b"after" * 100
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize(
    "client,event,op",
    [("pwrite", "write_aio", "write"), ("pread", "read_aio", "read"), ("dd", "write_aio", "write")],
)
def test_a_client_held_at_a_breakpoint_can_be_killed(mount, signum, client, event, op):
    m = mount(data=b"\xee" * (1 << 20))
    m.ctl(f"break {event} A")
    proc = _start(m, client)
    m.ctl("wait_break A")
    assert _end(proc, signum) != 0
    status = m.status()
    assert status["suspended"] == []
    assert status["interrupted"]["count"] == 1
    last = status["interrupted"]["last"]
    assert (last["tags"], last["event"], last["op"], last["offset"], last["length"]) == (
        ["A"],
        event,
        op,
        0,
        4096,
    )
    with pytest.raises(OSError) as e:  # the tag is released
        m.ctl("resume A")
    assert e.value.errno == errno.ENOENT
    _still_serves(m)
    if op == "write":  # it never reached the image
        assert m.image.read_bytes()[:4096] == b"\xee" * 4096
    assert "interrupted: 1 (last: A at " + event in m.status_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("client", ["wait_break", "ctl"])
def test_a_pending_wait_break_can_be_killed(mount, signum, client):
    m = mount()
    m.ctl("break write_aio W")
    proc = _start(m, client)
    _wait_until(lambda: m.status()["waiting"] == ["W"], "wait_break W pending")
    assert _end(proc, signum) != 0
    _wait_until(lambda: m.status()["waiting"] == [], "wait_break W gone")
    status = m.status()
    assert status["last_error_errno"] == errno.EINTR
    # the line as the writer wrote it
    written = "wait_break W 10m" if client == "ctl" else "wait_break W"
    assert status["last_error"].startswith(f"line 1: {written}: interrupted"), status["last_error"]
    assert status["breakpoints"] == [{"event": "write_aio", "tag": "W"}]  # still set
    _still_serves_with_breakpoint(m)


def _still_serves_with_breakpoint(m) -> None:
    """The breakpoint W is still there: a new wait_break sees the next write suspend."""
    proc = _start(m, "pwrite")
    try:
        assert m.ctl("wait_break W") == "suspended at W\n"
        m.ctl("resume W")
        assert proc.wait(WEDGED_SECONDS) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    _still_serves(m)


def test_a_request_resumed_before_the_signal_finishes_normally(mount):
    m = mount()
    m.ctl("break write_aio A")
    proc = _start(m, "pwrite")
    m.ctl("wait_break A")
    m.ctl("resume A")
    assert proc.wait(WEDGED_SECONDS) == 0
    assert m.image.read_bytes()[:4096] == b"x" * 4096
    assert m.status()["interrupted"] == {"count": 0, "last": None}
