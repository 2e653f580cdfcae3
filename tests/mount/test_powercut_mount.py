"""Power cuts through real mounts: os.pwrite/os.fsync and dd as clients, `control` commands,
the status, the mount options and rule keys, umount and SIGTERM (README "Power cuts")."""

import errno
import os
import signal
import subprocess
import time

import pytest

from conftest import BLKFUSE, blkfuse, force_unmount, is_mounted
from imageio import KiB, MiB, Writer

TRACK = ("-o", "track-unsynced=on")


def pwrite(m, offset, data, sync=False):
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_powercut_keep_none_reverts_what_no_fsync_covered_then_power_is_off(mount):
    m = mount(*TRACK, data=bytes(MiB))
    pwrite(m, 0, b"S" * 4096, sync=True)  # synced
    pwrite(m, 4096, b"U" * 4096)  # not synced
    pwrite(m, 0, b"V" * 512)  # overwrites synced data, not synced
    status = m.status()
    assert status["unsynced"]["writes"] == 2 and status["unsynced"]["bytes"] == 4608
    assert status["power"] == "on"
    answer = m.ctl("powercut")
    assert "powercut keep=none" in answer and "2 unsynced writes (0 kept, 2 lost)" in answer
    backing = m.image.read_bytes()  # the cut is on the backing file now
    assert backing[:4096] == b"S" * 4096 and backing[4096:8192] == bytes(4096)
    fd = os.open(m.file, os.O_RDWR)
    try:
        for op in (
            lambda: os.pread(fd, 512, 0),
            lambda: os.pwrite(fd, b"x", 0),
            lambda: os.fsync(fd),
        ):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    status = m.status()
    assert status["power"] == "off" and status["unsynced"]["writes"] == 0
    assert status["events"].get("read_aio", 0) == 0  # no event while off
    text = m.status_text()
    assert "power: off" in text and "unsynced: 0 writes, 0 bytes" in text
    assert m.ctl("poweron").startswith("power on")
    fd = os.open(m.file, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == b"S" * 4096
    finally:
        os.close(fd)
    assert m.status()["power"] == "on"


def test_powercut_without_track_unsynced_is_einval_naming_the_option(mount):
    m = mount()
    with pytest.raises(OSError) as e:
        m.ctl("powercut keep=random")
    assert e.value.errno == errno.EINVAL
    status = m.status()
    assert "track-unsynced=on" in status["last_error"]
    assert status["power"] == "on" and status["unsynced"] is None
    assert "unsynced: not tracked" in m.status_text()


def test_powercut_bad_words_change_nothing(mount):
    m = mount(*TRACK)
    for words, why in (
        ("powercut keep=nane", 'did you mean "none"'),
        ("powercut seed=x", "seed must be an integer"),
        ("powercut now", "usage: powercut [keep="),
        ("poweron 1", "usage: poweron"),
    ):
        with pytest.raises(OSError) as e:
            m.ctl(words)
        assert e.value.errno == errno.EINVAL, words
        assert why in m.status()["last_error"], words
    assert m.status()["power"] == "on"


def test_the_same_seed_on_the_same_history_gives_the_same_image_through_dd(mount):
    images = []
    # the same unsynced history each run: deterministic data
    pattern = bytes((i * 31 + 7) & 0xFF for i in range(256 * KiB))
    for _ in range(2):
        m = mount(*TRACK, "-o", "atomic=4096", data=bytes(MiB))
        subprocess.run(
            [
                "dd",
                "if=/dev/urandom",
                f"of={m.file}",
                "bs=64k",
                "count=2",
                "oflag=direct",
                "conv=notrunc,fsync",
                "status=none",
            ],
            check=True,
        )
        (m.base / "pattern").write_bytes(pattern)
        subprocess.run(
            [
                "dd",
                f"if={m.base / 'pattern'}",
                f"of={m.file}",
                "bs=16k",
                "seek=4",
                "oflag=direct",
                "conv=notrunc",
                "status=none",
            ],
            check=True,
        )
        answer = m.ctl("powercut keep=random seed=42")
        assert "seed=42" in answer and "units of 4096 bytes" in answer
        data = m.image.read_bytes()
        images.append((data[128 * KiB :], answer))
        m.ctl("poweron")
        m.umount()
    assert images[0] == images[1]
    kept = images[0][0][: 256 * KiB]
    assert kept != bytes(256 * KiB) and kept != pattern  # torn: some units each way


def test_powercut_while_a_write_is_suspended_lets_it_go_and_it_fails_with_eio(mount):
    m = mount(*TRACK, data=bytes(MiB))
    m.ctl("break pwritev_done P")
    w = Writer(m, 8192, b"\x55" * 4096)
    w.start()
    m.ctl("wait_break P 60")
    assert m.image.read_bytes()[8192:12288] == b"\x55" * 4096  # on the image, unsynced
    assert "1 lost" in m.ctl("powercut")
    w.join(60)
    assert not w.is_alive() and w.error is not None and w.error.errno == errno.EIO
    assert m.image.read_bytes()[8192:12288] == bytes(4096)
    assert m.status()["suspended"] == []
    m.ctl("poweron")
    m.ctl("break write_aio Q")  # breakpoints still work after
    assert m.status()["breakpoints"] == [{"event": "write_aio", "tag": "Q"}]


def test_umount_while_the_power_is_off(mount):
    m = mount(*TRACK)
    pwrite(m, 0, b"k" * 512)
    m.ctl("powercut")
    m.umount()
    assert m.image.read_bytes()[:512] == bytes(512)


def test_sigterm_with_unsynced_writes_syncs_them(fuse_dir):
    """An orderly shutdown fsyncs the backing file: unsynced writes become synced, none lost."""
    img = fuse_dir / "t.img"
    img.write_bytes(bytes(MiB))
    mnt = fuse_dir / "t"
    mnt.mkdir()
    p = subprocess.Popen(
        BLKFUSE + ["mount", "--foreground", "-o", "track-unsynced=on", str(img), str(mnt)]
    )
    try:
        while not is_mounted(mnt):
            assert p.poll() is None, "foreground mount exited"
            time.sleep(0.01)
        fd = os.open(mnt / "t.img", os.O_RDWR)
        os.pwrite(fd, b"t" * 4096, 0)
        os.close(fd)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        assert img.read_bytes()[:4096] == b"t" * 4096
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        force_unmount(mnt)


def test_cap_option_refuses_with_enospc_and_says_so_in_the_status(mount):
    m = mount(*TRACK, "-o", "unsynced-cap=16k", data=bytes(MiB))
    pwrite(m, 0, b"a" * 8192)
    with pytest.raises(OSError) as e:
        pwrite(m, 65536, b"b" * 16384)
    assert e.value.errno == errno.ENOSPC
    status = m.status()
    assert status["unsynced"]["refused"] == 1 and status["unsynced"]["cap"] == 16384
    assert "unsynced-cap=16384" in status["unsynced"]["last_refusal"]
    assert m.image.read_bytes()[65536 : 65536 + 16384] == bytes(16384)
    pwrite(m, 8192, b"c" * 512, sync=True)  # a flush empties the log
    pwrite(m, 65536, b"b" * 8192)
    assert m.status()["unsynced"]["writes"] == 1


def test_drop_unsynced_fsyncgate_through_a_mount(mount):
    m = mount(*TRACK, data=bytes(MiB))
    m.ctl("inject-error event=none iotype=flush errno=EIO once=on drop-unsynced=on")
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"g" * 4096, 0)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        os.fsync(fd)  # the retry succeeds...
        assert os.pread(fd, 4096, 0) == bytes(4096)  # ...and the data is gone
    finally:
        os.close(fd)


def test_drop_unsynced_needs_track_unsynced_everywhere(mount, fuse_dir):
    m = mount()
    with pytest.raises(OSError) as e:
        m.ctl("inject-error event=none iotype=flush drop-unsynced=on")
    assert e.value.errno == errno.EINVAL and "track-unsynced" in m.status()["last_error"]
    assert m.status()["rules"] == []
    _, r = mount("-o", "inject-error.0.event=none,inject-error.0.drop-unsynced=on", expect_ok=False)
    assert r.returncode == 1 and "track-unsynced=on" in r.stderr
    conf = fuse_dir / "drop.conf"
    conf.write_text('[inject-error]\nevent = "flush_to_disk"\ndrop-unsynced = "on"\n')
    r = blkfuse("check", conf)
    assert r.returncode == 1 and "drop.conf:1" in r.stderr and "track-unsynced" in r.stderr
    r = blkfuse("check", conf, "-o", "track-unsynced=on")
    assert r.returncode == 0, r.stderr
    assert "not portable: drop-unsynced" in r.stdout and "track-unsynced=on" in r.stdout


def test_torn_write_through_options_with_errno_0_reports_success(mount):
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.iotype=write,"
        "inject-error.0.errno=0,inject-error.0.torn=2,inject-error.0.once=on",
        data=bytes(MiB),
    )
    pwrite(m, 4096, b"T" * 4096)  # reports success
    assert m.image.read_bytes()[4096:8192] == b"T" * 1024 + bytes(3072)
    pwrite(m, 4096, b"T" * 4096)  # once: spent
    assert m.image.read_bytes()[4096:8192] == b"T" * 4096
    assert all(rule.get("spent") for rule in m.status()["rules"])  # the once rule is spent


def test_bad_power_options_are_refused_at_mount(mount):
    for option, words in (
        ("atomic=1000", "power of two"),
        ("track-unsynced=maybe", "on or off"),
        ("unsynced-cap=1M", "only means something with track-unsynced=on"),
    ):
        _, r = mount(
            "-o",
            option if "cap" in option or "track" in option else f"track-unsynced=on,{option}",
            expect_ok=False,
        )
        assert r.returncode == 1 and words in r.stderr, (option, r.stderr)


def test_fallocate_punch_hole_and_zero_range_are_undone_and_fail_while_off(mount):
    data = bytes((i * 13 + 1) & 0xFF for i in range(MiB))
    m = mount(*TRACK, data=data)
    fd = os.open(m.file, os.O_RDWR)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

        def fallocate(mode, offset, length):
            if libc.fallocate(fd, mode, offset, length) != 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error))

        punch_hole, keep_size, zero_range = 0x02, 0x01, 0x10
        fallocate(punch_hole | keep_size, 65536, 65536)
        fallocate(zero_range | keep_size, 262144, 8192)
        assert os.pread(fd, 4096, 65536) == bytes(4096)
        assert m.status()["unsynced"]["writes"] >= 2
        m.ctl("powercut")
        assert m.image.read_bytes() == data  # both undone
        with pytest.raises(OSError) as e:
            fallocate(punch_hole | keep_size, 2 * MiB, 4096)  # even a no-op range
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
