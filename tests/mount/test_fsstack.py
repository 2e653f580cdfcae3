"""The loop-device + filesystem stack (blkfuse.client.fsstack) and Mount.filesystem, through
real blkfuse mounts: direct-io loop devices, mkfs, mount, and the teardown order."""

import os
import re
import subprocess

import pytest

from blkfuse import MountError
from blkfuse.client import fsstack, holders, mounttab


def loops_over(m):
    return holders.loop_devices(os.path.realpath(m.image_path))


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_each_filesystem_mounts_through_the_stack_and_keeps_its_data(blkfuse_mount, fstype):
    m = blkfuse_mount(size="512M")  # mkfs.xfs wants at least 300 MiB
    with m.filesystem(fstype) as fs:
        entry = mounttab.find(fs)
        assert entry is not None and entry.fstype == fstype
        (device,) = loops_over(m)
        assert entry.source == device
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
            assert f.read().strip() == "1"
        (fs / "kept").write_text("across the teardown")
    # umount, losetup -d, and the loop device gone: nothing holds the image any more
    assert not mounttab.is_mounted(fs) and not fs.exists()
    assert loops_over(m) == []
    with m.filesystem(fstype, make=False, mount_options="ro") as fs:
        assert (fs / "kept").read_text() == "across the teardown"
        assert "ro" in mounttab.find(fs).options.split(",")


def test_mkfs_options_and_mount_options_reach_the_tools(blkfuse_mount, tmp_path):
    m = blkfuse_mount(size="64M")
    where = tmp_path / "fs"
    where.mkdir()
    with m.filesystem("ext4", mountpoint=where, b=1024, L="crashy", mount_options="noatime") as fs:
        assert fs == where
        assert "noatime" in mounttab.find(fs).options.split(",")
        device = mounttab.find(fs).source
        label = subprocess.run(["e2label", device], capture_output=True, text=True).stdout
        assert label.strip() == "crashy"
        assert os.statvfs(fs).f_bsize == 1024
    assert where.is_dir()  # a mountpoint the caller gave stays


def test_mkfs_arguments():
    assert fsstack.mkfs_args("ext4", {"b": 4096, "O": "^metadata_csum", "F": True, "q": False}) == [
        "mkfs.ext4",
        "-E",
        fsstack.EXT4_EXTENDED,
        "-q",
        "-F",
        "-b",
        "4096",
        "-O",
        "^metadata_csum",
        "-F",
    ]
    # ext4's extended options add to the fixed ones (later ones win in mke2fs)
    assert fsstack.mkfs_args("ext4", {"E": "lazy_itable_init=1"})[2] == (
        fsstack.EXT4_EXTENDED + ",lazy_itable_init=1"
    )
    assert fsstack.mkfs_args("btrfs", {"nodesize": "16k"})[-2:] == ["--nodesize", "16k"]
    assert fsstack.mkfs_args("xfs", ["-b", "size=4096"])[-2:] == ["-b", "size=4096"]
    with pytest.raises(MountError, match="unknown filesystem type 'ext5' .*ext4, xfs, btrfs"):
        fsstack.mkfs_args("ext5")


def test_a_failing_mkfs_is_named_and_leaves_no_loop_device(blkfuse_mount):
    m = blkfuse_mount(size="64M")
    with pytest.raises(
        MountError,
        match=r"mkfs ext4 on /dev/loop\d+: mkfs.ext4 .* failed: .*Invalid filesystem option set: nosuchfeature",
    ):
        with m.filesystem("ext4", O="nosuchfeature"):
            pass
    assert loops_over(m) == []


def test_mounting_garbage_is_named_and_leaves_no_loop_device(blkfuse_mount):
    m = blkfuse_mount(size="64M")
    with pytest.raises(MountError) as failed:
        with m.filesystem("xfs", make=False):
            pass
    message = str(failed.value)
    # the reason, not only mount(8)'s "wrong fs type, bad option, bad superblock...": what
    # blkid finds, everywhere, and the kernel's words where its log is readable
    assert re.match(r"mount xfs: mount -t xfs (/dev/loop\d+) .* failed: ", message), message
    assert re.search(r" \| blkid: no filesystem signature on /dev/loop\d+$", message), message
    with fsstack.KernelLog("/dev/null") as kernel:
        if kernel.readable:
            assert re.search(r" \| kernel: XFS \(loop\d+\): ", message), message
    assert loops_over(m) == []


def test_a_busy_filesystem_is_not_torn_down_and_its_user_is_named(blkfuse_mount):
    m = blkfuse_mount(size="64M")
    sleeper = None
    with pytest.raises(MountError) as failed:
        with m.filesystem("ext4") as fs:
            sleeper = subprocess.Popen(["sleep", "600"], cwd=fs)
            device = mounttab.find(fs).source
    message = str(failed.value)
    assert f"in use by pid {sleeper.pid} (sleep)" in message
    assert f"{device} stays attached until that is unmounted" in message
    # nothing half-done: the filesystem is still mounted on its loop device
    assert mounttab.find(fs).source == device
    sleeper.kill()
    sleeper.wait()
    fsstack.umount(fs)
    fsstack.detach(device)
    os.rmdir(fs)
    assert loops_over(m) == []


def test_detach_refuses_a_mounted_loop_device(blkfuse_mount, tmp_path):
    m = blkfuse_mount(size="64M")
    with m.filesystem("ext4") as fs:
        device = mounttab.find(fs).source
        with pytest.raises(MountError, match=rf"{device} is mounted at {fs}: unmount that first"):
            fsstack.detach(device)
