"""Who holds a file: processes with it open or mapped, and loop devices backed by it.

`umount` asks this before taking a disk away from its users, and `mount` asks it to name
whoever holds the lock on an image. Everything comes from /proc and /sys, never from the file
itself: a stat() through a FUSE mount would be a request to the daemon being asked about.

What a process holds is visible only to its owner and to root: as a normal user, other users'
processes are not seen (`unreadable` counts them).

A loop device is named with what uses it in turn (LoopUse): where it is mounted (by device
number, from /proc/self/mountinfo) and the devices stacked on it (/sys/block/loopN/holders), so
a message can say what to undo first: `losetup -d` on a mounted loop device only sets autoclear.
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blkfuse.client import mounttab


@dataclass(frozen=True)
class LoopUse:
    """One loop device and what uses it."""

    device: str  # /dev/loopN
    mountpoints: tuple[str, ...] = ()  # where it or one of its partitions is mounted
    stacked: tuple[str, ...] = ()  # /dev/dm-0...: devices built on it (device mapper)
    autoclear: bool = False  # `losetup -d` was given: it detaches once its last user goes

    def describe(self) -> str:
        """'loop device /dev/loop0 (mounted at /mnt/db)'."""
        uses = [f"mounted at {', '.join(self.mountpoints)}"] if self.mountpoints else []
        uses += [f"under {', '.join(self.stacked)}"] if self.stacked else []
        return f"loop device {self.device}" + (f" ({'; '.join(uses)})" if uses else "")

    def fix(self) -> str:
        """What to do to let go of it, in order."""
        steps = []
        if self.mountpoints:
            where = " ".join(self.mountpoints)
            steps.append(
                f"{self.device} is mounted at {where}: unmount that first (umount {where})"
            )
        if self.stacked:
            steps.append(f"remove {' '.join(self.stacked)} (dmsetup remove)")
        if self.autoclear and steps:
            steps.append(f"{self.device} detaches itself (losetup -d was given)")
        elif not self.autoclear:
            steps.append(f"losetup -d {self.device}")
        else:  # autoclear, nothing mounted on it: something still has it open
            steps.append(f"{self.device} detaches once nothing has it open (losetup -d was given)")
        return ", then ".join(steps)


def loop_use(device: str) -> LoopUse:
    """What uses loop device `device` (/dev/loopN) now."""
    name = os.path.basename(device)
    sys_dir = f"/sys/block/{name}"
    numbers = set()
    for part in [sys_dir] + [
        f"{sys_dir}/{p}" for p in _listdir(sys_dir) if p.startswith(name + "p")
    ]:
        number = _read(f"{part}/dev")
        if number:
            numbers.add(number)
    return LoopUse(
        device=device,
        mountpoints=tuple(mounttab.mountpoints_of(numbers)),
        stacked=tuple(f"/dev/{h}" for h in sorted(_listdir(f"{sys_dir}/holders"))),
        autoclear=_read(f"{sys_dir}/loop/autoclear") == "1",
    )


def settle(devices: list[str], timeout: float = 10.0) -> list[str]:
    """`devices` (loop devices) without those that go within `timeout` s. A loop device given
    `losetup -d` while something had it open (a file system just unmounted, udev's probe)
    detaches once the last opener closes it: a teardown in the right order must not be
    refused for that moment. Only such devices (autoclear set, nothing mounted or stacked on
    them) are waited for; `timeout` is a hang guard for one that something keeps open."""
    backing = {dev: _backing(dev) for dev in devices}

    def still(dev: str) -> bool:  # still on the same file (a freed device may be reused)
        return _backing(dev) == backing[dev] != ""

    deadline = time.monotonic() + timeout
    while True:
        going = [
            dev
            for dev in devices
            if still(dev)
            and (use := loop_use(dev)).autoclear
            and not (use.mountpoints or use.stacked)
        ]
        if not going or time.monotonic() > deadline:
            return [dev for dev in devices if still(dev)]
        time.sleep(0.01)


def _backing(device: str) -> str:
    """The backing file of loop device `device`, "" when it is not attached."""
    return _read(f"/sys/block/{os.path.basename(device)}/loop/backing_file")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError:
        return ""


@dataclass
class Holders:
    """What holds one file."""

    processes: list[tuple[int, str]] = field(default_factory=list)  # (pid, comm), by pid
    loops: list[str] = field(default_factory=list)  # /dev/loopN, sorted
    unreadable: int = 0  # processes whose fds or maps we could not read

    def __bool__(self) -> bool:
        return bool(self.processes or self.loops)

    def loop_uses(self) -> list[LoopUse]:
        return [loop_use(dev) for dev in self.loops]

    def describe(self) -> str:
        """'loop device /dev/loop0 (mounted at /mnt/db), pid 12 (dd)'."""
        parts = [use.describe() for use in self.loop_uses()]
        parts += [f"pid {pid} ({comm})" for pid, comm in self.processes]
        return ", ".join(parts)


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _opens(pid: int, path: str) -> bool:
    """Does process `pid` have `path` open? Raises PermissionError if we may not look."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") == path:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _maps(pid: int, dev: int, ino: int) -> bool:
    """Does process `pid` map the file (dev, ino)? Raises PermissionError if we may not look."""
    want_dev = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    want_ino = str(ino)
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) >= 5 and fields[4] == want_ino and fields[3] == want_dev:
                return True
    return False


def _attached_loops() -> list[tuple[str, str]]:
    """(/dev/loopN, its backing file as /sys/block/loopN/loop/backing_file names it: the path
    the file had when it was attached) for every attached loop device, in device order."""
    found = []
    for name in _listdir("/sys/block"):
        if name.startswith("loop"):
            backing = _backing(name)
            if backing:  # else not attached
                found.append((f"/dev/{name}", backing))
    return sorted(found, key=lambda item: (len(item[0]), item[0]))


def loop_devices(path: str) -> list[str]:
    """The loop devices whose backing file is `path`."""
    return [dev for dev, backing in _attached_loops() if backing == path]


def loop_devices_under(directory: str) -> list[str]:
    """The loop devices whose backing file lies under `directory` (a mountpoint, spelt as the
    kernel shows it): found without touching the files, so it works on a dead mount."""
    prefix = directory.rstrip("/") + "/"
    return [dev for dev, backing in _attached_loops() if backing.startswith(prefix)]


def find(path: str, dev: int, ino: int, *, exclude: tuple[int, ...] = ()) -> Holders:
    """Everything holding the file at absolute `path`, whose stat is (dev, ino).

    `path` must be spelt as the kernel shows it (os.path.realpath of the file's path). This
    process and `exclude` are left out.
    """
    return _scan(
        Holders(loops=loop_devices(path)),
        lambda pid: _opens(pid, path) or _maps(pid, dev, ino),
        exclude,
    )


def _scan(holders: Holders, uses: Callable[[int], bool], exclude: tuple[int, ...]) -> Holders:
    """Add to `holders` every process (but this one and `exclude`) that `uses` says holds
    the file; a process we may not look at is counted as unreadable."""
    skip = {os.getpid(), *exclude}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        try:
            if uses(pid):
                holders.processes.append((pid, comm(pid)))
        except PermissionError:
            holders.unreadable += 1
        except OSError:  # the process ended meanwhile
            continue
    holders.processes.sort()
    return holders


def _uses_under(pid: int, prefix: str) -> bool:
    """Does process `pid` have a file under `prefix` open or mapped? (Paths only: the files
    are never touched.) Raises PermissionError if we may not look."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith(prefix):
                return True
        except OSError:  # closed meanwhile
            continue
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].rstrip("\n").startswith(prefix):
                return True
    return False


def find_under(directory: str, *, exclude: tuple[int, ...] = ()) -> Holders:
    """Everything holding a file under `directory` (a mountpoint, spelt as the kernel shows
    it), found by path alone: for a mount whose daemon is gone, where nothing can be stat'ed.
    This process and `exclude` are left out."""
    prefix = directory.rstrip("/") + "/"
    return _scan(
        Holders(loops=loop_devices_under(directory)), lambda pid: _uses_under(pid, prefix), exclude
    )
