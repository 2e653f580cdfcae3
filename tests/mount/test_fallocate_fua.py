"""What pyfuse3 could not deliver before blkfuse's patch, through a real mount: fallocate
(discard, write-zeroes), lseek SEEK_DATA/SEEK_HOLE (block status), and per-write FUA flags
(pwritev2 RWF_DSYNC/RWF_SYNC): each reaches its rules.
"""

import errno
import os
import subprocess
import sys

import pytest

from blkfuse.block.image import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)

# Hang guard, not a timing check.
WEDGED_SECONDS = 120


def _open(m, flags=os.O_RDWR) -> int:
    return os.open(m.file, flags)


def test_punch_hole_is_a_discard_and_a_discard_rule_fails_it(mount):
    m = mount(data=b"\xaa" * (256 << 10))
    fd = _open(m)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 64 << 10, 64 << 10)
        assert os.pread(fd, 64 << 10, 64 << 10) == bytes(64 << 10)
        assert os.pread(fd, 4096, 0) == b"\xaa" * 4096
        assert os.fstat(fd).st_size == 256 << 10
        # the discarded range is a hole in the backing file now: block status sees it
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 64 << 10
        assert os.lseek(fd, 64 << 10, os.SEEK_DATA) == 128 << 10
        m.ctl("inject-error event=none iotype=discard errno=5")
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 4096, 0) == b"\xaa" * 4096  # not discarded
        os.pwrite(fd, b"w" * 4096, 0)  # writes are not discards
    finally:
        os.close(fd)
    assert m.status()["errors_injected"] == [{"errno": 5, "name": "EIO", "count": 1}]


def test_zero_range_is_write_zeroes_with_its_events_and_rules(mount):
    m = mount(data=b"\xbb" * (128 << 10))
    fd = _open(m)
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 4096, 8192)
        assert os.pread(fd, 16384, 0) == b"\xbb" * 4096 + bytes(8192) + b"\xbb" * 4096
        assert m.status()["events"].get("pwritev_zero") == 1
        assert "write_aio" not in m.status()["events"]
        m.ctl("inject-error event=none iotype=write-zeroes errno=ENOSPC")
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert e.value.errno == errno.ENOSPC
        assert os.pread(fd, 4096, 0) == b"\xbb" * 4096
    finally:
        os.close(fd)


def test_zero_range_past_the_end_grows_a_growable_image_unless_keep_size(mount):
    fixed = mount(data=b"\xcc" * 8192)
    fd = _open(fixed)
    try:
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 4096, 8192)  # a disk's size is fixed
        assert e.value.errno == errno.ENOSPC
        assert os.pread(fd, 8192, 0) == b"\xcc" * 8192
    finally:
        os.close(fd)
    m = mount("-o", "growable=on", data=b"\xcc" * 8192)
    fd = _open(m)
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
        assert os.fstat(fd).st_size == 8192
        assert os.pread(fd, 8192, 0) == b"\xcc" * 4096 + bytes(4096)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 4096, 16384)
        assert os.fstat(fd).st_size == 20480
        assert os.pread(fd, 20480, 0) == b"\xcc" * 4096 + bytes(16384)
    finally:
        os.close(fd)


def test_plain_fallocate_only_grows_the_image_as_qemus_fuse_export(mount):
    fixed = mount(size=8192)
    fd = _open(fixed)
    try:
        with pytest.raises(OSError) as e:
            fallocate(fd, 0, 8192, 4096)
        assert e.value.errno == errno.ENOSPC  # without growable=on
    finally:
        os.close(fd)
    m = mount("-o", "growable=on", size=8192)
    fd = _open(m)
    try:
        with pytest.raises(OSError) as e:
            fallocate(fd, 0, 0, 4096)  # inside: as a block device
        assert e.value.errno == errno.EOPNOTSUPP
        fallocate(fd, 0, 8192, 4096)  # at the end: grows
        assert os.fstat(fd).st_size == 12288
        with pytest.raises(OSError) as e:
            fallocate(fd, 0x08, 0, 4096)  # COLLAPSE_RANGE: no
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    finally:
        os.close(fd)


def test_seek_data_and_hole_are_block_status_queries(mount, fuse_dir):
    image = fuse_dir / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
        f.seek(256 << 10)
        f.write(b"d" * (64 << 10))
    m = mount(image=image)
    fd = _open(m, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 256 << 10
        assert os.lseek(fd, 256 << 10, os.SEEK_HOLE) == 320 << 10
        assert os.lseek(fd, 400 << 10, os.SEEK_HOLE) == 400 << 10
        with pytest.raises(OSError) as e:
            os.lseek(fd, 400 << 10, os.SEEK_DATA)  # no data after it
        assert e.value.errno == errno.ENXIO
        m.ctl("inject-error event=none iotype=block-status errno=5")
        with pytest.raises(OSError) as e:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 4096, 256 << 10) == b"d" * 4096  # reads are not block status
    finally:
        os.close(fd)


FUA_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwritev(fd, [b"f" * 4096], 4096, os.RWF_DSYNC)
"""


def test_an_rwf_dsync_write_is_flushed_before_its_reply(mount):
    m = mount(size=1 << 20)
    fd = _open(m)
    try:
        os.pwrite(fd, b"p" * 4096, 0)  # a plain write: no flush
        assert "flush_to_os" not in m.status()["events"]
        m.ctl("break flush_to_os F")
        writer = subprocess.Popen([sys.executable, "-c", FUA_WRITER, str(m.file)])
        try:
            m.ctl("wait_break F")
            # the write is in the backing file, its flush held: no reply yet
            assert m.status()["suspended"][0]["op"] == "flush"
            with open(m.image, "rb") as f:
                f.seek(4096)
                assert f.read(4096) == b"f" * 4096
            assert writer.poll() is None
            m.ctl("resume F")
            assert writer.wait(WEDGED_SECONDS) == 0
        finally:
            if writer.poll() is None:
                writer.kill()
        events = m.status()["events"]
        assert (events["flush_to_os"], events["flush_to_disk"]) == (1, 1)
        # a flush rule fails it (after the data reached the image, as QEMU's FUA emulation)
        m.ctl("inject-error event=flush_to_os iotype=flush errno=5")
        for flag in (os.RWF_DSYNC, os.RWF_SYNC):
            with pytest.raises(OSError) as e:
                os.pwritev(fd, [b"s" * 4096], 8192, flag)
            assert e.value.errno == errno.EIO
        os.pwrite(fd, b"q" * 4096, 12288)  # a plain write still succeeds
    finally:
        os.close(fd)
    assert m.status()["errors_injected"] == [{"errno": 5, "name": "EIO", "count": 2}]
