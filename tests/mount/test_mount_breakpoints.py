"""Breakpoints through a real mount: suspended requests, what keeps flowing meanwhile,
wait_break."""

import errno
import os
import threading
import time

import pytest

from imageio import KiB, MiB, Writer, open_image, pattern


def test_breakpoint_suspends_one_write_while_reads_go_on(mount):
    m = mount(data=pattern(MiB))
    with open(m.control, "w") as f:  # as `echo "break write_aio A" > control`
        f.write("break write_aio A\n")
    w = Writer(m, 0, b"\x5a" * 4096)
    w.start()
    m.ctl("wait_break A 60")
    assert w.is_alive() and w.result is None
    [s] = m.status()["suspended"]
    assert (s["tags"], s["event"], s["op"], s["offset"], s["length"]) == (
        ["A"],
        "write_aio",
        "write",
        0,
        4096,
    )
    assert "A at write_aio: write offset=0 length=4096" in m.status_text()
    fd = open_image(m, os.O_RDONLY)  # another request is served meanwhile
    assert os.pread(fd, 4096, 65536) == pattern(MiB)[65536 : 65536 + 4096]
    os.close(fd)
    assert m.image.read_bytes()[:4096] == pattern(MiB)[:4096]  # not written yet
    m.ctl("resume A")
    w.join(60)
    assert not w.is_alive() and w.error is None and w.result == 4096
    assert m.image.read_bytes()[:4096] == b"\x5a" * 4096
    assert m.status()["suspended"] == [] and m.status()["breakpoints"] == []


def test_a_suspended_read_lets_writes_and_fsyncs_through(mount):
    m = mount(data=pattern(MiB))
    m.ctl("break read_aio R")
    got = {}

    def reader():
        fd = open_image(m, os.O_RDONLY)
        got["data"] = os.pread(fd, 4096, 0)
        os.close(fd)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    m.ctl("wait_break R 60")
    fd = open_image(m)
    assert os.pwrite(fd, b"w" * 4096, 0) == 4096  # the write goes first
    os.fsync(fd)
    os.close(fd)
    assert t.is_alive()
    m.ctl("resume R")
    t.join(60)
    assert got["data"] == b"w" * 4096  # the read runs after its breakpoint


def test_many_suspended_requests_do_not_stop_the_others(mount):
    """More suspended requests than pyfuse3's default worker limit (99)."""
    m = mount(data=pattern(MiB))
    n = 120
    results = [None] * n

    def reader(i):
        fd = open_image(m, os.O_RDONLY)
        try:
            results[i] = os.pread(fd, 512, i * 512)
        finally:
            os.close(fd)

    threads = []
    for i in range(n):
        m.ctl(f"break read_aio T{i}")
        t = threading.Thread(target=reader, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        m.ctl(f"wait_break T{i} 60")
    assert len(m.status()["suspended"]) == n
    fd = open_image(m)  # still served: a write and a read
    os.pwrite(fd, b"q" * 512, 900 * KiB)
    assert os.pread(fd, 512, 900 * KiB) == b"q" * 512
    os.close(fd)
    m.ctl("\n".join(f"resume T{i}" for i in range(n)))
    for t in threads:
        t.join(60)
    data = pattern(MiB)
    assert results == [data[i * 512 : (i + 1) * 512] for i in range(n)]


def test_wait_break_times_out_with_etimedout(mount):
    m = mount()
    m.ctl("break read_aio T")
    with pytest.raises(OSError) as e:
        m.ctl("wait_break T 0.05")
    assert e.value.errno == errno.ETIMEDOUT
    assert "T" in m.status()["last_error"]


def test_a_pending_wait_break_does_not_hold_back_other_commands(mount):
    """The kernel serializes writes per inode; each open of control is its own inode."""
    m = mount(data=pattern(64 * KiB))
    m.ctl("break read_aio X")
    box = {}

    def waiter():
        box["answer"] = m._ctl("wait_break X")

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    while m.status()["waiting"] != ["X"]:  # status json is a write: not held back
        time.sleep(0.01)
    m.ctl("inject-error event=write_aio errno=ENOSPC")

    def reader():
        fd = open_image(m, os.O_RDONLY)
        box["read"] = os.pread(fd, 512, 0)
        os.close(fd)

    r = threading.Thread(target=reader, daemon=True)
    r.start()
    t.join(60)
    assert box["answer"] == "suspended at X\n"
    m.ctl("resume X")
    r.join(60)
    assert box["read"] == pattern(512)
