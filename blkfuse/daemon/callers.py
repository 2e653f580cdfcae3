"""Who sent a request: the pid/uid/gid the FUSE header carries, and what /proc says of it.

`Caller` is the engine's Sender (engine/core.py) as the FUSE layer gives it. Only rules with a
`comm` or `pid` filter ask for more than the header, and only when a request reaches them, so
the plain path never touches /proc. The FUSE header's pid is the sending *thread*'s id; a
`pid` filter matches the thread id or its process (thread group) id.
"""

from typing import NamedTuple


class Caller(NamedTuple):
    """Who sent an image request, from the FUSE request's context (None where unknown)."""

    pid: int
    uid: int
    gid: int

    def process(self) -> int | None:
        return thread_group(self.pid)

    def command(self) -> str | None:
        return command_name(self.pid)


def command_name(pid: int) -> str | None:
    """/proc/PID/comm (the kernel's 15-byte command name), or None once the task is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode(errors="replace")
    except OSError:
        return None


def thread_group(pid: int) -> int | None:
    """The process id (Tgid) of thread `pid`, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
