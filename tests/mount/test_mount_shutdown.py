"""Mounting and unmounting: a mountpoint with a space, umount with requests suspended or files
open, signals, a killed daemon; no acknowledged write is lost."""

import errno
import os
import signal
import subprocess
import time

import pytest

from conftest import blkfuse, force_unmount, is_mounted
from imageio import Command, KiB, MiB, Writer, open_image, pattern


def test_mountpoint_with_a_space(mount):
    m = mount(mnt_name="my mnt")
    assert m.status()["info"]["mountpoint"].endswith("my mnt")
    m.umount()


def test_umount_releases_a_suspended_write_and_keeps_its_data(mount):
    m = mount(size=MiB)
    m.ctl("break pwritev B")
    w = Writer(m, 8192, b"\x77" * 4096)
    w.start()
    m.ctl("wait_break B 60")
    r = blkfuse("umount", "--lazy", m.mnt)  # the writer has the image open: busy
    assert r.returncode == 0, r.stderr
    w.join(60)
    assert not w.is_alive() and w.error is None and w.result == 4096
    assert not is_mounted(m.mnt)
    assert m.image.read_bytes()[8192:12288] == b"\x77" * 4096


def test_umount_fails_a_pending_wait_break_with_eshutdown(mount):
    m = mount()
    m.ctl("break read_aio Z")
    t = Command(m, "wait_break Z")
    t.start()
    while m.status()["waiting"] != ["Z"]:  # the daemon holds the wait
        assert t.is_alive()
        time.sleep(0.01)
    assert "wait_break pending: Z" in m.status_text()
    m.umount()
    t.join(60)
    assert not t.is_alive() and t.error is not None and t.error.errno == errno.ESHUTDOWN


def test_umount_with_a_file_held_open(mount):
    m = mount(data=pattern(64 * KiB))
    fd = open_image(m)
    try:
        assert os.pwrite(fd, b"h" * 512, 0) == 512
        r = blkfuse("umount", "--lazy", m.mnt)  # the open file delays it (a grace), no more
        assert r.returncode == 0 and not is_mounted(m.mnt), r.stderr
        assert m.image.read_bytes()[:512] == b"h" * 512
        with pytest.raises(OSError):
            os.pread(fd, 512, 0)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_sigkill_keeps_acknowledged_writes(mount):
    m = mount(size=MiB)
    fd = open_image(m)
    for i in range(16):
        assert os.pwrite(fd, pattern(4096, seed=i), i * 4096) == 4096
    os.close(fd)
    pid = m.status()["info"]["pid"]
    os.kill(pid, signal.SIGKILL)
    force_unmount(m.mnt)
    assert not is_mounted(m.mnt)
    data = m.image.read_bytes()
    for i in range(16):
        assert data[i * 4096 : (i + 1) * 4096] == pattern(4096, seed=i)


def test_umount_of_a_dead_daemon_removes_the_mount(mount):
    m = mount()
    pid = m.status()["info"]["pid"]
    os.kill(pid, signal.SIGKILL)
    r = blkfuse("umount", m.mnt)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(m.mnt)


def test_foreground_mount_and_sigterm(fuse_dir):
    img = fuse_dir / "fg.img"
    img.write_bytes(bytes(MiB))
    mnt = fuse_dir / "fg"
    mnt.mkdir()
    from conftest import BLKFUSE

    p = subprocess.Popen(
        BLKFUSE + ["mount", "--foreground", "--log", str(fuse_dir / "log"), str(img), str(mnt)]
    )
    try:
        # the log says when it is mounted; poll the mount table without a time threshold
        while not is_mounted(mnt):
            assert p.poll() is None, "foreground mount exited"
            time.sleep(0.01)
        fd = os.open(mnt / "fg.img", os.O_RDWR)
        os.pwrite(fd, b"z" * 512, 0)
        os.close(fd)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        assert not is_mounted(mnt)
        assert img.read_bytes()[:512] == b"z" * 512
        assert "mounted" in (fuse_dir / "log").read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        force_unmount(mnt)
