"""The loop-device + filesystem stack: a filesystem on a loop device over a file, built and
torn down in the one right order. Used by `Mount.filesystem`, `blkfuse crashtest` and the
scripts, so the plumbing lives in one place:

    with filesystem(mount.image_path, "ext4", mountpoint) as fs:    # losetup, mkfs, mount
        ...                                                          # fs.mountpoint
    # umount, losetup -d, and the loop device is gone

- The loop device runs in direct-io mode (checked in /sys/block/loopN/loop/dio), so every
  write the filesystem sends reaches the file as it happens and every flush (a barrier)
  reaches it as an fsync: without it the writes would sit in the loop device's page cache.
- mkfs makes no background work: ext4 without lazy init (no writes behind the workload's
  back), and no filesystem discards the whole device (a discard over a FUSE file is
  refused, and a recorded discard of the whole disk is noise).
- Barriers stay on (every filesystem's default); mount options can turn them off
  (`barrier=0`) for a negative control.
- Teardown: umount (refused, naming the processes, when something still uses the
  filesystem), `losetup -d`, then wait until the kernel has let the device go, so the file
  below is free (a power cut's `poweron`, the next mount) when the `with` block ends.

Errors are MountError with one line that names the command, the device and what it said.
"""

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from blkfuse.client import mounttab
from blkfuse.errors import MountError

StrPath = str | os.PathLike[str]
MkfsOptions = Mapping[str, object] | Sequence[str]
MountOptions = str | Sequence[str]

FILESYSTEMS = ("ext4", "xfs", "btrfs")

# mkfs flags always given: quiet, overwrite, no discard of the whole device; ext4 initialises
# its inode tables and journal now rather than in a kernel thread after the mount.
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-K"],
}
EXT4_EXTENDED = "nodiscard,lazy_itable_init=0,lazy_journal_init=0"

# The repair run on an unmounted crash image before it is mounted, and the exit statuses that
# mean "consistent now". xfs and btrfs have none: their logs are replayed by the mount itself
# (xfs_repair refuses a dirty log), so an inconsistency shows as a mount failure.
FSCK: dict[str, tuple[list[str], tuple[int, ...]]] = {"ext4": (["e2fsck", "-fy"], (0, 1))}

# Mount options to mount a copy of a filesystem while another copy (same UUID) is mounted:
# xfs refuses a duplicate UUID without nouuid; ext4 does not care; btrfs mounts a single-device
# copy under a temporary fsid (Linux 6.7 and later).
COPY_MOUNT_OPTIONS = {"xfs": "nouuid"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# Hang guards, not speed limits.
COMMAND_SECONDS = 300.0
DETACH_SECONDS = 60.0


def _run(cmd: Sequence[str], what: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise MountError(f"{what}: {cmd[0]} is not installed")
    try:
        r = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=COMMAND_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise MountError(
            f"{what}: {' '.join(cmd)} did not finish in {COMMAND_SECONDS:g} s"
        ) from None
    if r.returncode != 0:
        said = " ".join((r.stderr or r.stdout).split()) or f"exit status {r.returncode}"
        raise MountError(f"{what}: {' '.join(cmd)} failed: {said}")
    return r.stdout


def check_filesystem_type(fstype: str) -> None:
    if fstype not in FILESYSTEMS:
        raise MountError(
            f"unknown filesystem type {fstype!r} (choose one of {', '.join(FILESYSTEMS)})"
        )


def mkfs_args(fstype: str, options: MkfsOptions | None = None) -> list[str]:
    """The mkfs command for `fstype`: the fixed flags above, then `options`.

    A mapping gives one flag per key: a one-letter key is `-k VALUE` ({"b": 4096} -> -b 4096,
    {"O": "^has_journal"}), a longer one `--key VALUE` with "_" as "-" ({"nodesize": "16k"});
    True gives the flag alone, False/None leave it out. A sequence is passed as it is. For
    ext4, an `E` option is appended to the fixed extended options (later ones win).
    """
    check_filesystem_type(fstype)
    cmd = list(MKFS[fstype])
    extended = EXT4_EXTENDED if fstype == "ext4" else ""
    if isinstance(options, Mapping):
        for key, value in options.items():
            if value is None or value is False:
                continue
            if fstype == "ext4" and key == "E":
                extended = f"{extended},{value}"
                continue
            flag = f"-{key}" if len(key) == 1 else "--" + key.replace("_", "-")
            cmd += [flag] if value is True else [flag, str(value)]
    elif options is not None:
        cmd += [str(o) for o in options]
    if extended:
        cmd[1:1] = ["-E", extended]
    return cmd


def mkfs(target: StrPath, fstype: str, options: MkfsOptions | None = None) -> None:
    """Make a filesystem on `target` (a device or a plain file)."""
    cmd = mkfs_args(fstype, options) + [os.fspath(target)]
    _run(cmd, f"mkfs {fstype} on {os.fspath(target)}")


def mount_option_string(options: MountOptions | None) -> str:
    if options is None:
        return ""
    if isinstance(options, str):
        return options
    return ",".join(options)


def syncfs(path: StrPath) -> None:
    """syncfs(2): write back the filesystem holding `path` (its journal committed, and a
    flush sent to its device unless barriers are off), leaving other filesystems alone."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"syncfs {os.fspath(path)}: {os.strerror(e)}")
    finally:
        os.close(fd)


# -- loop devices -------------------------------------------------------------------------------


def _loop_name(device: str) -> str:
    return os.path.basename(device)


def backing_file(device: str) -> str:
    """The file a loop device is bound to ("" when it is free)."""
    try:
        with open(
            f"/sys/block/{_loop_name(device)}/loop/backing_file",
            encoding="utf-8",
            errors="surrogateescape",
        ) as f:
            return f.read().rstrip("\n")
    except OSError:
        return ""


def attachment(device: str) -> str:
    """What tells this attachment of a loop device from any later one ("" when it is free):
    its disk sequence number (/sys/block/loopN/diskseq, Linux 5.15+), which the kernel bumps
    on every attach and detach. Not the backing file's path: that changes under the device
    when the mount holding the file is detached (a dead blkfuse mount taken away with
    --force shows its image as /disk.img), and a teardown comparing paths would then take
    its own device for someone else's and leave it attached. Without diskseq, the path."""
    backing = backing_file(device)
    if not backing:
        return ""
    try:
        with open(f"/sys/block/{_loop_name(device)}/diskseq") as f:
            return "diskseq " + f.read().strip()
    except OSError:
        return backing


# The loop devices this process attached (attach()): device -> attachment. Pruned as they go.
_attached: dict[str, str] = {}


def attached_here() -> dict[str, str]:
    """The loop devices this process attached that are still in that attachment (device ->
    attachment()): those its teardowns have not let go. tests/conftest.py fails a test that
    leaves one: on a shared machine other processes' devices say nothing about this one's."""
    for device, ours in list(_attached.items()):
        if attachment(device) != ours:
            del _attached[device]
    return dict(_attached)


def attach(path: StrPath, direct_io: bool = True) -> str:
    """A new loop device over `path` (/dev/loopN). With direct_io it must really be in
    direct-io mode; a file system that cannot do O_DIRECT is refused with the reason."""
    cmd = ["losetup", "--find", "--show"]
    if direct_io:
        cmd.append("--direct-io=on")
    device = _run([*cmd, os.fspath(path)], f"loop device over {os.fspath(path)}").strip()
    _attached[device] = attachment(device)
    if direct_io:
        try:
            with open(f"/sys/block/{_loop_name(device)}/loop/dio") as f:
                dio = f.read().strip()
        except OSError as e:
            dio = f"unreadable ({e.strerror})"
        if dio != "1":
            detach(device)
            raise MountError(
                f"{device} over {os.fspath(path)} is not in direct-io mode (dio={dio}): the "
                "filesystem's writes would wait in the loop device's page cache and its "
                "flushes would not reach the file in order; the file's filesystem must "
                "support O_DIRECT"
            )
    return device


def detach(device: str, timeout: float = DETACH_SECONDS, attached: str | None = None) -> None:
    """`losetup -d`, then wait until the kernel has let the device go (udev may hold it open
    for a moment, and until then `losetup -d` has only set autoclear). `attached`: what
    attachment(device) said when it was attached; a device no longer in that attachment was
    let go already, and may be someone else's now."""
    current = attachment(device)
    if not current:
        return
    if attached is not None and current != attached:
        return
    entry = next((e for e in mounttab.entries() if e.source == device), None)
    if entry is not None:
        raise MountError(f"{device} is mounted at {entry.mountpoint}: unmount that first")
    was = backing_file(device)
    r = subprocess.run(["losetup", "-d", device], capture_output=True, text=True)
    deadline = time.monotonic() + timeout
    # the same attachment: once freed, the device may be taken at once by anyone else
    while attachment(device) == current:
        if time.monotonic() > deadline:
            said = " ".join(r.stderr.split())
            raise MountError(
                f"{device} is still attached to {was} {timeout:g} s after losetup -d"
                + (f" ({said})" if said else "")
            )
        time.sleep(0.01)


@contextmanager
def loop_device(path: StrPath, direct_io: bool = True) -> Iterator[str]:
    """A loop device over `path` for the `with` block, detached (and gone) after it."""
    device = attach(path, direct_io)
    bound = attachment(device)
    try:
        yield device
    finally:
        detach(device, attached=bound)


# -- mounts --------------------------------------------------------------------------------------


def users(mountpoint: StrPath) -> list[tuple[int, str]]:
    """(pid, comm) of the processes with a file, cwd or root under `mountpoint`."""
    top = os.path.realpath(mountpoint)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        paths = []
        try:
            paths += [os.readlink(f"/proc/{entry}/{link}") for link in ("cwd", "root")]
            fds = f"/proc/{entry}/fd"
            for fd in os.listdir(fds):
                try:
                    paths.append(os.readlink(f"{fds}/{fd}"))
                except OSError:
                    continue
        except OSError:
            continue
        if any(p == top or p.startswith(top + "/") for p in paths):
            try:
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append((int(entry), "this process" if int(entry) == os.getpid() else comm))
    return sorted(found)


def mount(
    device: StrPath, mountpoint: StrPath, fstype: str, options: MountOptions | None = None
) -> None:
    """Mount; MountError with mount's words and, since mount(8) only says "wrong fs type,
    bad option, bad superblock...", what the kernel logged about the device meanwhile
    (where /dev/kmsg is readable: not in a container) and what blkid finds on the device
    (everywhere: no filesystem at all, another type, or the right one the kernel refused)."""
    opts = mount_option_string(options)
    cmd = ["mount", "-t", fstype] + (["-o", opts] if opts else [])
    with KernelLog(os.fspath(device)) as kernel:
        try:
            _run([*cmd, os.fspath(device), os.fspath(mountpoint)], f"mount {fstype}")
        except MountError as e:
            said = kernel.lines()
            why = f"{e} | kernel: {' / '.join(said)}" if said else str(e)
            raise MountError(f"{why} | {on_disk(os.fspath(device), fstype)}") from None


def on_disk(device: str, fstype: str) -> str:
    """What blkid's low-level probe (superblocks, not its cache) finds on `device`, said
    against the `fstype` a mount expected."""
    if shutil.which("blkid") is None:
        return "blkid: not installed"
    r = subprocess.run(
        ["blkid", "-p", "-s", "TYPE", "-o", "value", device],
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        stdin=subprocess.DEVNULL,
    )
    found = r.stdout.strip()
    if r.returncode == 2 or (r.returncode == 0 and not found):
        return f"blkid: no filesystem signature on {device}"
    if r.returncode != 0:
        return f"blkid: {' '.join(r.stderr.split()) or f'exit status {r.returncode}'}"
    if found != fstype:
        return f"blkid: {device} holds {found}, not {fstype}"
    return f"blkid: {device} holds {fstype} (its superblock is there; the kernel refused it)"


class KernelLog:
    """What the kernel logs about one device from now on (/dev/kmsg, read from its end:
    exact under other devices' noise, no dmesg run). Empty where /dev/kmsg is unreadable
    (a container: no /dev/kmsg, or no CAP_SYSLOG); `readable` says which."""

    def __init__(self, device: str) -> None:
        self.name = os.path.basename(device)
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = -1
        self.readable = self.fd >= 0

    def lines(self, most: int = 4) -> list[str]:
        about: list[str] = []
        while self.fd >= 0:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # records overwritten before we read them: go on
                continue
            except OSError:
                break
            text = record.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0]
            # the filesystems' lines ("XFS (loop3): ...", "EXT4-fs (loop3): ...", "BTRFS
            # error (device loop3): ..."), not the block layer's ("loop3: detected capacity
            # change ..."), which a reused device number prints late, for its last user
            if f"({self.name})" in text or f"device {self.name})" in text:
                about.append(text)
        return about[-most:]

    def __enter__(self) -> "KernelLog":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def umount(mountpoint: StrPath) -> None:
    """Unmount; if the filesystem is busy, MountError naming who uses it (nothing is left
    half-done: the filesystem stays mounted)."""
    r = subprocess.run(["umount", os.fspath(mountpoint)], capture_output=True, text=True)
    if r.returncode == 0 or not mounttab.is_mounted(mountpoint):
        return
    who = ", ".join(f"pid {pid} ({comm})" for pid, comm in users(mountpoint))
    said = " ".join(r.stderr.split())
    raise MountError(
        f"umount {os.fspath(mountpoint)}: {said}" + (f"; in use by {who}" if who else "")
    )


@dataclass
class Filesystem:
    """A filesystem mounted on a loop device over `image`."""

    fstype: str
    image: Path
    device: str
    mountpoint: Path


@contextmanager
def filesystem(
    image: StrPath,
    fstype: str = "ext4",
    mountpoint: StrPath | None = None,
    *,
    make: bool = True,
    mkfs_options: MkfsOptions | None = None,
    mount_options: MountOptions | None = None,
    direct_io: bool = True,
) -> Iterator[Filesystem]:
    """`fstype` on a loop device over `image`, mounted at `mountpoint` (a temporary
    directory, removed afterwards, when None) for the `with` block; `make` runs mkfs first.
    Always torn down in order: umount, losetup -d, the device gone."""
    check_filesystem_type(fstype)
    made_dir = mountpoint is None
    if mountpoint is None:
        mountpoint = tempfile.mkdtemp(prefix=f"blkfuse-{fstype}-")
    where = Path(mountpoint)
    device = attach(image, direct_io)
    bound = attachment(device)
    mounted = False
    try:
        if make:
            mkfs(device, fstype, mkfs_options)
        mount(device, where, fstype, mount_options)
        mounted = True
        yield Filesystem(fstype, Path(os.fspath(image)), device, where)
    finally:
        busy = None
        if mounted:
            try:
                umount(where)
            except MountError as e:
                busy = MountError(f"{e}; {device} stays attached until that is unmounted")
        if busy is None:
            detach(device, attached=bound)
        if made_dir and busy is None:
            os.rmdir(where)
        if busy is not None:
            raise busy
