"""The edges of a mount's life, through real mounts: what umount refuses and why, --lazy and
--force, a non-empty mountpoint, two mounts (or QEMU) on one image, the image's fixed size."""

import errno
import os
import subprocess
import sys
import threading

import pytest

from conftest import blkfuse, is_mounted

KiB = 1024
MiB = 1024 * KiB


def one_line_failure(r, *words):
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("blkfuse: "), (
        r.stderr
    )
    for word in words:
        assert word in r.stderr, (word, r.stderr)


def holder(path) -> subprocess.Popen:
    """A process (sleep) that has `path` open (read-write, as its stdin) until it is killed."""
    fd = os.open(path, os.O_RDWR)
    try:
        return subprocess.Popen(["sleep", "600"], stdin=fd)
    finally:
        os.close(fd)


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


# ---- umount: busy ---------------------------------------------------------------------------


def test_umount_refuses_while_a_process_has_the_image_open(mount):
    m = mount()
    p = holder(m.file)
    try:
        r = blkfuse("umount", m.mnt)
        one_line_failure(r, "busy", f"pid {p.pid} (sleep)", "--lazy", "--force")
        assert is_mounted(m.mnt)
        assert m.status()["info"]["pid"] == m.pid  # the daemon was not touched
    finally:
        stop(p)
    m.umount()


def test_umount_refuses_while_a_process_maps_the_image(mount):
    m = mount()
    # A private read-only mapping outlives the fd that made it: only /proc/PID/maps shows it.
    # (Python's mmap module keeps a dup of the fd: map with libc's mmap through ctypes.)
    code = (
        "import ctypes, mmap, os, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mmap.restype = ctypes.c_void_p\n"
        "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,\n"
        "                      ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
        f"fd = os.open({str(m.file)!r}, os.O_RDONLY)\n"
        "address = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)\n"
        "assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()\n"
        "os.close(fd)\n"
        "print('mapped', flush=True)\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "mapped\n"
        assert not any(
            os.readlink(f"/proc/{p.pid}/fd/{fd}") == str(m.file)
            for fd in os.listdir(f"/proc/{p.pid}/fd")
        )
        r = blkfuse("umount", m.mnt)
        one_line_failure(r, "busy", f"pid {p.pid} (python")
        assert is_mounted(m.mnt)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    m.umount()


def test_umount_refuses_while_a_loop_device_is_attached(mount):
    m = mount(size=4 * MiB)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(m.file)], capture_output=True, text=True
    )
    assert loop.returncode == 0, loop.stderr
    dev = loop.stdout.strip()
    try:
        w = subprocess.run(
            ["dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=4", "oflag=direct", "status=none"],
            capture_output=True,
            text=True,
        )
        assert w.returncode == 0, w.stderr
        r = blkfuse("umount", m.mnt)
        one_line_failure(r, "busy", f"loop device {dev}", f"losetup -d {dev}")
        assert is_mounted(m.mnt)
        # the loop device still works: the mount was left alone
        rd = subprocess.run(
            ["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=4", "iflag=direct", "status=none"],
            capture_output=True,
            text=True,
        )
        assert rd.returncode == 0, rd.stderr
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    # losetup -d lets go of the file once the device is closed: wait for sysfs to say so
    while os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file"):
        subprocess.run(["udevadm", "settle"], capture_output=True)
    m.umount()


def test_umount_force_resumes_then_detaches_a_used_mount(mount):
    m = mount(data=bytes(range(256)) * 256)
    m.ctl("break read_aio R")
    got = {}
    fd = os.open(m.file, os.O_RDONLY)

    def reader():
        got["data"] = os.pread(fd, 512, 0)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    m.ctl("wait_break R 60")
    r = blkfuse("umount", m.mnt)
    one_line_failure(r, "busy", f"pid {os.getpid()}", "1 suspended request")
    r = blkfuse("umount", "--force", m.mnt)
    assert r.returncode == 0, r.stderr
    t.join(60)
    assert got["data"] == bytes(range(256)) * 2  # the suspended read went on
    assert not is_mounted(m.mnt)
    with pytest.raises(OSError) as e:  # the disk is gone
        os.pread(fd, 512, 0)
    assert e.value.errno in (errno.ENOTCONN, errno.EIO)
    with pytest.raises(OSError):  # close's flush: ENOTCONN, fd freed
        os.close(fd)


def test_umount_force_with_a_loop_device_attached(mount):
    m = mount(size=4 * MiB)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(m.file)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        r = blkfuse("umount", "--force", m.mnt)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m.mnt)
        rd = subprocess.run(
            ["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct", "status=none"],
            capture_output=True,
            text=True,
        )
        assert rd.returncode != 0 and "Input/output error" in rd.stderr
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_umount_lazy_and_force_together_is_an_error(mount):
    m = mount()
    one_line_failure(blkfuse("umount", "--lazy", "--force", m.mnt), "choose one")
    assert is_mounted(m.mnt)


def test_umount_of_an_unused_mount_with_control_held_open(mount):
    """An open `control` (a pending wait_break, a shell) is not a use of the disk."""
    m = mount()
    fd = os.open(m.control, os.O_RDWR)
    try:
        m.umount()
    finally:
        try:
            os.close(fd)
        except OSError:  # close's flush finds no daemon: the fd is freed
            pass


# ---- mount: where and what ------------------------------------------------------------------


def test_mount_refuses_a_non_empty_mountpoint(mount, fuse_dir):
    (fuse_dir / "mnt0").mkdir()
    (fuse_dir / "mnt0" / "notes.txt").write_text("mine")
    m, r = mount(expect_ok=False)
    one_line_failure(r, "not empty", "notes.txt", "-o nonempty")
    assert not is_mounted(m.mnt)
    m = mount("-o", "nonempty", mnt_name="mnt0")
    assert sorted(os.listdir(m.mnt)) == ["control", m.name]  # hidden while mounted
    m.umount()
    assert (fuse_dir / "mnt0" / "notes.txt").read_text() == "mine"


def test_a_second_mount_of_one_image_names_the_first(mount):
    first = mount()
    second, r = mount(image=first.image, expect_ok=False)
    one_line_failure(
        r, "in use", f"the blkfuse mount at {first.mnt} (pid {first.pid})", "locking=off"
    )
    assert not is_mounted(second.mnt)
    _, r = mount("--read-only", image=first.image, expect_ok=False)  # a reader conflicts too
    one_line_failure(r, f"the blkfuse mount at {first.mnt}")
    third = mount("-o", "locking=off", image=first.image)  # asked for
    assert "locking=off" in third.status_text()
    third.umount()
    first.umount()
    again = mount(image=first.image)  # the lock went with the daemon
    again.umount()


def test_two_read_only_mounts_share_an_image(mount):
    a = mount("--read-only")
    b = mount("--read-only", image=a.image)
    b.umount()
    a.umount()


def test_qemu_and_blkfuse_respect_each_others_lock(mount, fuse_dir):
    m = mount()
    r = subprocess.run(
        ["qemu-io", "-f", "raw", str(m.image), "-c", "read 0 512"], capture_output=True, text=True
    )
    assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r.stderr
    m.umount()
    qemu = subprocess.Popen(
        ["qemu-io", "-f", "raw", str(m.image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        qemu.stdin.write("read 0 512\n")  # answered once the image is open
        qemu.stdin.flush()
        assert "read 512/512 bytes" in qemu.stdout.readline()
        _, r = mount(image=m.image, expect_ok=False)
        one_line_failure(r, "in use", f"pid {qemu.pid} (qemu-io)")
    finally:
        qemu.stdin.close()
        qemu.wait()
        qemu.stdout.close()


# ---- the image's size is fixed, like a disk's ---------------------------------------------


def test_truncate_and_writes_past_the_end_fail_on_a_fixed_size_image(mount):
    m = mount(size=64 * KiB)
    with pytest.raises(OSError) as e:
        os.truncate(m.file, 128 * KiB)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.truncate(m.file, 0)
    assert e.value.errno == errno.EPERM
    os.truncate(m.file, 64 * KiB)  # its own size: nothing to do
    fd = os.open(m.file, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"x" * 8 * KiB, 60 * KiB) == 4 * KiB  # what fits: short
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"y" * 512, 64 * KiB)
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"y" * 512, 1 * MiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.path.getsize(m.image) == 64 * KiB
    assert m.image.read_bytes()[60 * KiB :] == b"x" * 4 * KiB
    dd = subprocess.run(
        ["dd", "if=/dev/zero", f"of={m.file}", "bs=4k", "conv=notrunc"],
        capture_output=True,
        text=True,
    )
    assert dd.returncode != 0 and "No space left on device" in dd.stderr
    assert os.path.getsize(m.image) == 64 * KiB
    assert m.status()["errors_injected"] == []  # not an injected error


def test_growable_lets_writes_and_truncate_resize_the_image(mount):
    m = mount("-o", "growable=on", size=64 * KiB)
    fd = os.open(m.file, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"z" * 4 * KiB, 126 * KiB) == 4 * KiB
    finally:
        os.close(fd)
    assert os.path.getsize(m.image) == 130 * KiB
    os.truncate(m.file, 16 * KiB)
    assert os.path.getsize(m.image) == 16 * KiB
    assert "growable" in m.status_text()
