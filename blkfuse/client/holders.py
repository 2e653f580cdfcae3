"""Who holds a file: processes with it open or mapped, and loop devices backed by it.

`umount` asks this before taking a disk away from its users, and `mount` asks it to name
whoever holds the lock on an image. Everything comes from /proc and /sys, never from the file
itself: a stat() through a FUSE mount would be a request to the daemon being asked about.

What a process holds is visible only to its owner and to root: as a normal user, other users'
processes are not seen (`unreadable` counts them).
"""

import os
from dataclasses import dataclass, field


@dataclass
class Holders:
    """What holds one file."""

    processes: list[tuple[int, str]] = field(default_factory=list)  # (pid, comm), by pid
    loops: list[str] = field(default_factory=list)  # /dev/loopN, sorted
    unreadable: int = 0  # processes whose fds or maps we could not read

    def __bool__(self) -> bool:
        return bool(self.processes or self.loops)

    def describe(self) -> str:
        """'loop device /dev/loop0, pid 12 (dd)'."""
        parts = [f"loop device {dev}" for dev in self.loops]
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


def loop_devices(path: str) -> list[str]:
    """The loop devices whose backing file is `path` (as /sys/block/loop*/loop/backing_file
    names it: the path the file had when it was attached)."""
    found: list[str] = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(
                f"/sys/block/{name}/loop/backing_file", encoding="utf-8", errors="surrogateescape"
            ) as f:
                backing = f.read().rstrip("\n")
        except OSError:  # not attached
            continue
        if backing == path:
            found.append(f"/dev/{name}")
    return sorted(found, key=lambda dev: (len(dev), dev))


def find(path: str, dev: int, ino: int, *, exclude: tuple[int, ...] = ()) -> Holders:
    """Everything holding the file at absolute `path`, whose stat is (dev, ino).

    `path` must be spelt as the kernel shows it (os.path.realpath of the file's path). This
    process and `exclude` are left out.
    """
    holders = Holders(loops=loop_devices(path))
    skip = {os.getpid(), *exclude}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in skip:
            continue
        try:
            if _opens(pid, path) or _maps(pid, dev, ino):
                holders.processes.append((pid, comm(pid)))
        except PermissionError:
            holders.unreadable += 1
        except OSError:  # the process ended meanwhile
            continue
    holders.processes.sort()
    return holders
