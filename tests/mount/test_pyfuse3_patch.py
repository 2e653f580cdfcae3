"""The pyfuse3 patch (scripts/pyfuse3/) on its own: a tiny pyfuse3 filesystem, real syscalls.

fallocate and lseek reach their handlers; `enable_io_context` gives write the flags of each
write (O_DSYNC for pwritev2 RWF_DSYNC) and read/write/fsync the caller; `enable_interrupts`
ends a request whose caller got SIGINT or SIGKILL with EINTR; a filesystem that opts in to
nothing behaves as with upstream pyfuse3.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blkfuse.block.image import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)

from conftest import force_unmount, is_mounted

FS = Path(__file__).resolve().parents[1] / "pyfuse3_patch_fs.py"
# Hang guard, not a timing check: how long a step may take before the test fails.
WEDGED_SECONDS = 120


class TinyFs:
    def __init__(
        self,
        base: Path,
        plain: bool,
        locked: bool = False,
        nowait: bool = False,
        later: bool = False,
    ):
        self.mnt = base / "mnt"
        self.mnt.mkdir()
        self.log_path = base / "log"
        self.log_path.touch()
        args = [sys.executable, str(FS), str(self.mnt), str(self.log_path)]
        self.proc = subprocess.Popen(
            args
            + (["--plain"] if plain else [])
            + (["--locked"] if locked else [])
            + (["--nowait"] if nowait else [])
            + (["--later"] if later else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"
        self.file = self.mnt / "file"

    def log(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def wait_for(self, predicate) -> dict:
        deadline = time.monotonic() + WEDGED_SECONDS
        while time.monotonic() < deadline:
            for record in self.log():
                if predicate(record):
                    return record
            time.sleep(0.01)
        raise AssertionError(f"never logged; log: {self.log()}")

    def close(self) -> None:
        if self.proc.stderr.closed:
            return  # closed already
        force_unmount(self.mnt)
        try:
            self.proc.wait(WEDGED_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()
        assert not is_mounted(self.mnt)


@pytest.fixture
def tinyfs(fuse_dir):
    made = []

    def _make(
        plain: bool = False, locked: bool = False, nowait: bool = False, later: bool = False
    ) -> TinyFs:
        sub = fuse_dir / f"fs{len(made)}"
        sub.mkdir()
        fs = TinyFs(sub, plain, locked, nowait, later)
        made.append(fs)
        return fs

    yield _make
    for fs in made:
        fs.close()


def test_fallocate_reaches_the_handler_with_mode_range_and_caller(tinyfs):
    fs = tinyfs()
    fd = os.open(fs.file, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 512)
        assert e.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    calls = [r for r in fs.log() if r["op"] == "fallocate"]
    me = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    assert calls == [
        {"op": "fallocate", "mode": 3, "offset": 4096, "length": 8192, "ctx": me},
        {"op": "fallocate", "mode": FALLOC_FL_ZERO_RANGE, "offset": 0, "length": 512, "ctx": me},
    ]


def test_lseek_data_and_hole_are_answered_by_the_handler(tinyfs):
    fs = tinyfs()
    fd = os.open(fs.file, os.O_RDONLY)
    try:
        assert os.lseek(fd, 100, os.SEEK_DATA) == 1100
        assert os.lseek(fd, 100, os.SEEK_HOLE) == 777
        assert os.lseek(fd, 5, os.SEEK_SET) == 5  # the kernel's own, as before
    finally:
        os.close(fd)
    assert [(r["offset"], r["whence"]) for r in fs.log() if r["op"] == "lseek"] == [
        (100, os.SEEK_DATA),
        (100, os.SEEK_HOLE),
    ]


def test_write_gets_the_per_write_sync_flags_and_every_io_handler_the_caller(tinyfs):
    fs = tinyfs()
    fd = os.open(fs.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * 512, 0)
        os.pwritev(fd, [b"b" * 512], 512, os.RWF_DSYNC)
        os.pwritev(fd, [b"c" * 512], 1024, os.RWF_SYNC)
        assert os.pread(fd, 512, 512) == b"b" * 512
        os.fsync(fd)
    finally:
        os.close(fd)
    writes = {r["off"]: r for r in fs.log() if r["op"] == "write"}
    assert not writes[0]["flags"] & os.O_DSYNC
    assert writes[512]["flags"] & os.O_DSYNC
    assert writes[512]["flags"] & os.O_SYNC != os.O_SYNC  # RWF_DSYNC is not O_SYNC
    assert writes[1024]["flags"] & os.O_SYNC == os.O_SYNC
    me = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    for op in ("write", "read", "fsync"):
        assert all(r["ctx"] == me for r in fs.log() if r["op"] == op), op
    # a file opened O_DSYNC: every write carries it
    fd = os.open(fs.file, os.O_RDWR | os.O_DSYNC)
    try:
        os.pwrite(fd, b"d" * 512, 2048)
    finally:
        os.close(fd)
    assert [r for r in fs.log() if r["op"] == "write"][-1]["flags"] & os.O_DSYNC


def test_a_filesystem_that_opts_in_to_nothing_behaves_as_before(tinyfs):
    fs = tinyfs(plain=True)
    fd = os.open(fs.file, os.O_RDWR)
    try:
        os.pwritev(fd, [b"x" * 512], 0, os.RWF_DSYNC)  # write(fh, off, buf): 3 arguments
        assert os.pread(fd, 512, 0) == b"x" * 512
        os.fsync(fd)
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert e.value.errno == errno.EOPNOTSUPP  # the kernel's answer to ENOSYS
        assert os.lseek(fd, 100, os.SEEK_DATA) == 100  # the kernel's generic answers
        assert os.lseek(fd, 100, os.SEEK_HOLE) == 1 << 20
    finally:
        os.close(fd)
    assert [r["op"] for r in fs.log()] == ["write", "read", "fsync"]


READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.pread(fd, 512, 4096)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_request_ends_with_eintr_and_the_mount_goes_on(tinyfs, signum):
    fs = tinyfs()
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(fs.file)], stderr=subprocess.DEVNULL
    )
    fs.wait_for(lambda r: r["op"] == "read" and r["off"] == 4096 and r["ctx"]["pid"] == reader.pid)
    reader.send_signal(signum)
    try:
        reader.wait(WEDGED_SECONDS)  # ends: the request was answered
    finally:
        reader.kill()
    assert reader.returncode != 0
    fs.wait_for(lambda r: r["op"] == "read-cancelled")
    fd = os.open(fs.file, os.O_RDONLY)  # the filesystem keeps serving
    try:
        assert os.pread(fd, 512, 0) == bytes(512)
    finally:
        os.close(fd)


GATED_READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
sys.stdout.buffer.write(os.pread(fd, 512, 8192))
"""


@pytest.mark.parametrize("locked", [False, True], ids=["handoff", "locked-loop"])
def test_handlers_that_wait_each_get_a_worker_and_the_others_keep_flowing(tinyfs, locked):
    """The hand-off loop (0002): a handler that waits hands reading to another worker, so
    several waiting at once each get one while requests that do not wait keep being answered;
    opening the gate ends them all. The same holds for pyfuse3's locked loop."""
    fs = tinyfs(locked=locked)
    readers = [
        subprocess.Popen([sys.executable, "-c", GATED_READER, str(fs.file)], stdout=subprocess.PIPE)
        for _ in range(5)
    ]
    try:
        pids = {r.pid for r in readers}
        for pid in pids:
            fs.wait_for(
                lambda r, pid=pid: r["op"] == "read" and r["off"] == 8192 and r["ctx"]["pid"] == pid
            )
        fd = os.open(fs.file, os.O_RDWR)
        try:
            for i in range(200):  # none of these waits: the reader answers them itself
                os.pwrite(fd, i.to_bytes(2, "big") * 256, 0)
                assert os.pread(fd, 512, 0) == i.to_bytes(2, "big") * 256
            assert all(r.poll() is None for r in readers)  # still held at the gate
            os.pwrite(fd, b"open" * 128, 8192)
        finally:
            os.close(fd)
        for r in readers:
            out, _ = r.communicate(timeout=WEDGED_SECONDS)
            assert r.returncode == 0
            assert out == b"open" * 128
    finally:
        for r in readers:
            r.kill()
            r.wait()
            r.stdout.close()  # communicate() did unless the test failed before it


NOWAIT = 65536  # tests/pyfuse3_patch_fs.py's NOWAIT_OFFSET


@pytest.mark.parametrize("locked", [False, True], ids=["handoff", "locked-loop"])
def test_nowait_handlers_answer_requests_or_pass_them_on_unchanged(tinyfs, locked):
    """enable_nowait_io (0003): read_nowait/write_nowait see every read and write first; what
    they answer never reaches read/write, what they pass on (None) reaches them with the
    request context and flags as before; a FUSEError they raise is the request's errno.
    write_nowait's data is libfuse's buffer, lent for the call (0005)."""
    fs = tinyfs(nowait=True, locked=locked)
    fd = os.open(fs.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"n" * 512, NOWAIT)
        os.pwritev(fd, [b"s" * 512], NOWAIT + 512, os.RWF_DSYNC)
        assert os.pread(fd, 1024, NOWAIT) == b"n" * 512 + b"s" * 512
        os.pwrite(fd, b"p" * 512, 0)
        assert os.pread(fd, 512, 0) == b"p" * 512
        for call in (
            lambda: os.pread(fd, 512, 2 * NOWAIT),
            lambda: os.pwrite(fd, b"e", 2 * NOWAIT),
        ):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EXDEV
    finally:
        os.close(fd)
    me = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    ops = [(r["op"], r["off"]) for r in fs.log() if r["op"] != "fsync"]
    assert ops == [
        ("write-nowait", NOWAIT),
        ("write-nowait", NOWAIT + 512),
        ("read-nowait", NOWAIT),
        ("write-passed", 0),
        ("write", 0),
        ("read-passed", 0),
        ("read", 0),
    ]
    nowait_writes = [r for r in fs.log() if r["op"] == "write-nowait"]
    assert not nowait_writes[0]["flags"] & os.O_DSYNC
    assert nowait_writes[1]["flags"] & os.O_DSYNC
    passed_on = [r for r in fs.log() if r["op"] in ("read", "write")]
    assert all(r["ctx"] == me for r in passed_on)
    # 0005: write_nowait borrows libfuse's buffer (read-only, released after the call: a view
    # kept past it fails), and write gets bytes of its own
    writes = [r for r in fs.log() if r["op"] in ("write-nowait", "write-passed")]
    assert all(r["buf"] == "memoryview" and r["readonly"] for r in writes)
    assert all(r["earlier_released"] for r in writes[1:])
    assert [r["buf"] for r in passed_on if r["op"] == "write"] == ["bytes"]


# tests/pyfuse3_patch_fs.py's LATER_*_OFFSET
LATER, LATER_ERRNO, LATER_DROP, LATER_WITHDRAWN, LATER_GO = (n * NOWAIT for n in range(4, 9))


@pytest.mark.parametrize("locked", [False, True], ids=["handoff", "locked-loop"])
def test_nowait_handlers_answer_later_through_a_pending_reply(tinyfs, locked):
    """reply_later (0004): a nowait handler returns the request's PendingReply and answers it
    later from another task. Requests held that way do not hold up the loop (four reads wait
    at once, and the write that releases them is served meanwhile); each gets its own answer
    in whatever order they come; error() is the request's errno; a PendingReply dropped
    unanswered answers EIO; one the handler did not return answers nothing (the request went
    on to read()); a second answer, or one of the wrong kind, is refused."""
    fs = tinyfs(later=True, locked=locked)
    fd = os.open(fs.file, os.O_RDWR)
    # Not `with`: a failure must not wait for calls still held (the unmount ends them).
    pool = ThreadPoolExecutor(4)
    try:
        os.pread(fd, 512, LATER_GO)  # nothing held: a no-op release
        # One write (the kernel lets one write at a time into a file), then four reads.
        for count, op in ((1, "write-later"), (4, "read-later")):
            if op == "write-later":
                calls = [pool.submit(os.pwrite, fd, b"A" * 512 + b"B" * 1536, LATER)]
            else:
                calls = [pool.submit(os.pread, fd, 512, LATER + 512 * i) for i in range(4)]
            deadline = time.monotonic() + WEDGED_SECONDS
            while sum(r["op"] == op for r in fs.log()) < count:
                assert time.monotonic() < deadline, fs.log()
                time.sleep(0.01)
            assert not any(c.done() for c in calls)  # held, all at once
            os.pread(fd, 512, LATER_GO)  # served meanwhile; releases them
            results = [c.result(WEDGED_SECONDS) for c in calls]
            if op == "write-later":
                assert results == [2048]
            else:
                assert results == [b"A" * 512] + [b"B" * 512] * 3
        for call in (
            lambda: os.pread(fd, 512, LATER_ERRNO),
            lambda: os.pwrite(fd, b"e", LATER_ERRNO),
        ):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EXDEV
        with pytest.raises(OSError) as e:
            os.pread(fd, 512, LATER_DROP)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 512, LATER_WITHDRAWN) == bytes(512)
    finally:
        pool.shutdown(wait=False)
        os.close(fd)
    log = fs.log()
    answered = [r["off"] for r in log if r["op"] in ("write-answered", "read-answered")]
    held = {LATER + 512 * i for i in range(4)}
    arrived = [r["off"] for r in log if r["op"] == "read-later" and r["off"] in held]
    assert sorted(arrived) == sorted(held)  # in whatever order the threads' reads came
    assert answered == [LATER] + arrived[::-1] + [LATER_ERRNO, LATER_ERRNO]
    assert [r["held"] for r in log if r["op"] == "go"] == [0, 1, 4]
    refused = [(r["attempt"], r["error"]) for r in log if r["op"] in ("refused", "not-refused")]
    twice = ("twice", "RuntimeError: no request to answer: answered already, or not returned")
    wrong = ("wrong-kind", "TypeError: a read request cannot be answered with written()")
    assert refused == [twice] + [wrong, twice] * 4 + [twice] * 2 + [
        ("withdrawn", twice[1]),
        ("outside", "RuntimeError: reply_later() is only for read_nowait and write_nowait"),
    ]
    assert {"op": "read-passed", "off": LATER_WITHDRAWN, "size": 512} in log


def test_an_exception_in_a_nowait_handler_ends_main_as_a_handlers_would(tinyfs):
    """Anything but FUSEError raised by read_nowait propagates out of pyfuse3.main(), as
    from an async handler: the file system stops, with the exception in its traceback."""
    fs = tinyfs(nowait=True)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; os.pread(os.open(sys.argv[1], os.O_RDONLY), 512, int(sys.argv[2]))",
            str(fs.file),
            str(3 * NOWAIT),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        assert fs.proc.wait(WEDGED_SECONDS) != 0
        reader.wait(WEDGED_SECONDS)  # answered by the kernel once the session is gone
    finally:
        reader.kill()
        reader.wait()
    fs.close()
    assert "RuntimeError: the nowait handler failed" in fs.stderr


def test_blkfuse_refuses_to_mount_with_an_unpatched_pyfuse3(monkeypatch, tmp_path):
    import pyfuse3

    from blkfuse.daemon import lifecycle as daemon

    for name in ("enable_interrupts", "lseek"):
        monkeypatch.delattr(pyfuse3.Operations, name)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    with pytest.raises(daemon.MountError) as e:  # the first check: no settings needed
        daemon.prepare(str(image), str(tmp_path), None)
    message = str(e.value)
    assert "not built with blkfuse's patch" in message
    assert "lseek, enable_interrupts" in message and "scripts/setup" in message
