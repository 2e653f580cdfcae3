"""A loop device over the image, with ext4 mounted on it, when the mount is to go: `blkfuse
umount` (live and dead daemon), Mount.close() and the pytest fixture's teardown name the loop
device and where it is mounted, and say to unmount that first (`losetup -d` on a mounted loop
device only sets autoclear). Real ext4 on real loop devices over real mounts."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from blkfuse import Mount, MountError
from blkfuse.client import fsstack, holders

from conftest import BLKFUSE, blkfuse, is_mounted

MiB = 1 << 20
# Hang guard, not a timing check: a loop device detaches once its last user closes it.
DETACH_SECONDS = 60


def run(*cmd: object) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: {r.stderr}"
    return r.stdout.strip()


def backing(dev: str) -> str:
    try:
        return Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text().strip()
    except OSError:
        return ""


def attached(dev: str, to: object) -> bool:
    """`dev` is attached to `to` (other tests on this machine may reuse a freed device)."""
    return backing(dev) == os.path.realpath(to)


def wait_detached(dev: str, was: str) -> None:
    deadline = time.monotonic() + DETACH_SECONDS
    while attached(dev, was):
        assert time.monotonic() < deadline, f"{dev} still attached to {was}"
        time.sleep(0.01)


@contextlib.contextmanager
def ext4_on_loop(image: Path, where: Path):
    """ext4 on a loop device over `image`, mounted at `where` (blkfuse's own stack, torn down
    in order after the block); yields the device."""
    where.mkdir(exist_ok=True)
    with fsstack.filesystem(image, "ext4", where) as fs:
        yield fs.device


def one_line_refusal(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("blkfuse: "), r.stderr
    return r.stderr


def test_umount_names_the_loop_devices_mountpoint_and_says_to_unmount_it_first(mount):
    m = mount(size=16 * MiB)
    fs = m.base / "ext4"
    with ext4_on_loop(m.file, fs) as dev:
        (fs / "f").write_text("kept")
        said = one_line_refusal(blkfuse("umount", m.mnt))
        assert f"loop device {dev} (mounted at {fs})" in said
        assert f"{dev} is mounted at {fs}: unmount that first (umount {fs})" in said
        assert f"then losetup -d {dev}" in said
        assert is_mounted(m.mnt) and is_mounted(fs)
        # losetup -d on a mounted loop device only sets autoclear: not advised again
        run("losetup", "-d", dev)
        assert attached(dev, m.file)
        said = one_line_refusal(blkfuse("umount", m.mnt))
        assert f"{dev} is mounted at {fs}: unmount that first (umount {fs})" in said
        assert f"losetup -d {dev}" not in said and "detaches itself" in said
        assert (fs / "f").read_text() == "kept"  # the stack was left alone
    m.umount()


def test_umount_of_a_dead_daemon_refuses_while_ext4_on_a_loop_device_uses_it(mount):
    m = mount(size=16 * MiB)
    fs = m.base / "ext4"
    with ext4_on_loop(m.file, fs) as dev:
        ours = fsstack.attachment(dev)
        os.kill(m.pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{m.pid}") and "zombie" not in _state(m.pid):
            time.sleep(0.01)
        said = one_line_refusal(blkfuse("umount", m.mnt))
        assert "the daemon is gone" in said
        assert f"loop device {dev} (mounted at {fs})" in said
        assert f"unmount that first (umount {fs})" in said and "--lazy or --force" in said
        assert is_mounted(m.mnt)
        # --force removes the dead mount as before; ext4 is left on a dead disk
        r = blkfuse("umount", "--force", m.mnt)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m.mnt)
        assert backing(dev) == "/" + m.file.name  # named from the detached mount's root now
    # the stack's teardown still knows its device and detaches it
    assert fsstack.attachment(dev) != ours


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


def test_mount_close_fails_loudly_when_a_loop_device_still_uses_it(fuse_dir):
    image = fuse_dir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    mnt, fs = fuse_dir / "mnt", fuse_dir / "ext4"
    mnt.mkdir()
    m = Mount(image, mnt).mount()
    try:
        with ext4_on_loop(m.image_path, fs) as dev:
            ours = fsstack.attachment(dev)
            with pytest.raises(MountError) as e:
                m.close(timeout=60)
            assert f"loop device {dev} (mounted at {fs}) still used the mount" in str(e.value)
            assert f"unmount that first (umount {fs})" in str(e.value)
            assert not m.mounted and not is_mounted(mnt)  # closed all the same
        assert fsstack.attachment(dev) != ours  # and the stack's device went with the stack
    finally:
        m.close()


def test_fixture_teardown_fails_naming_the_loop_device_and_takes_the_stack_down(fuse_dir):
    fs = fuse_dir / "ext4"
    report = fuse_dir / "report"
    test = fuse_dir / "test_leaves_a_loop.py"
    test.write_text(
        textwrap.dedent(
            f"""
            import subprocess

            def test_leaves_ext4_on_a_loop_device(blkfuse_mount):
                m = blkfuse_mount(size="16M")
                dev = subprocess.run(["losetup", "--find", "--show", str(m.image_path)],
                                     capture_output=True, text=True, check=True).stdout.strip()
                with open({str(report)!r}, "w") as f:
                    f.write(f"{{dev}} {{m.mountpoint}}")
                subprocess.run(["mkfs.ext4", "-q", dev], check=True)
                subprocess.run(["mkdir", "-p", {str(fs)!r}], check=True)
                subprocess.run(["mount", dev, {str(fs)!r}], check=True)
            """
        )
    )
    dev = mnt = ""
    try:
        with tempfile.TemporaryDirectory() as rootdir:  # no conftest of ours in the way
            r = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                capture_output=True,
                text=True,
                cwd=rootdir,
                timeout=600,
            )
        dev, mnt = report.read_text().split()
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "1 passed, 1 error" in out, out
        assert f"loop device {dev} (mounted at {fs}) still uses the mount" in out, out
        assert "the teardown did so" in out
        assert not is_mounted(fs) and not is_mounted(mnt)
        assert not attached(dev, Path(mnt) / "blkfuse0.img")
    finally:
        if fs.exists() and os.path.ismount(fs):
            subprocess.run(["umount", fs], capture_output=True)
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        if mnt and is_mounted(mnt):
            blkfuse("umount", "--force", mnt)


def test_umount_right_after_the_stack_is_taken_down_in_order_is_not_refused(mount):
    """umount ext4, losetup -d, blkfuse umount: a loop device still open for a moment (here:
    by this test, as udev's probe may) detaches once closed, and umount waits for that
    instead of refusing."""
    m = mount(size=16 * MiB)
    fs = m.base / "ext4"
    with ext4_on_loop(m.file, fs) as dev:
        run("umount", fs)
        opener = os.open(dev, os.O_RDONLY)
        try:
            run("losetup", "-d", dev)  # autoclear: it goes when `opener` closes
            assert attached(dev, m.file)
            umount = subprocess.Popen(
                [*BLKFUSE, "umount", str(m.mnt)], stderr=subprocess.PIPE, text=True
            )
        finally:
            os.close(opener)
        _, err = umount.communicate(timeout=120)
        assert umount.returncode == 0, err
        assert not attached(dev, m.file) and not is_mounted(m.mnt)


def test_settle_waits_for_a_loop_device_that_is_detaching(mount, monkeypatch):
    """holders.settle on a loop device given `losetup -d` while open: it waits (its first
    pause is where this test closes the device) and then answers that the device is gone."""
    m = mount(size=16 * MiB)
    dev = run("losetup", "--find", "--show", m.file)
    opener = os.open(dev, os.O_RDONLY)
    pauses = []
    sleep = time.sleep

    def pause(seconds):
        pauses.append(seconds)
        if len(pauses) == 1:
            os.close(opener)  # the last user goes while settle waits
        sleep(seconds)

    try:
        run("losetup", "-d", dev)
        assert attached(dev, m.file) and holders.loop_use(dev).autoclear
        monkeypatch.setattr(holders.time, "sleep", pause)
        assert holders.settle([dev]) == []
        assert pauses and not attached(dev, m.file)
    finally:
        if not pauses:
            os.close(opener)
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        wait_detached(dev, os.path.realpath(m.file))
