"""Cheaper waits for pyfuse3's request loop.

pyfuse3's worker loop awaits `trio.lowlevel.wait_readable(fuse_fd)` before every request.
Under load /dev/fuse is nearly always readable already, yet each such wait registers the
fd with epoll, parks the task and costs a full scheduler pass. `install()` replaces that
wait with one that first asks poll(2) with a zero timeout and returns at once when data is
there, taking a real checkpoint every few calls so other tasks (resumed requests, the
control file, shutdown) still run and cancellation still arrives.
"""

import select
from typing import Protocol

import trio

# A checkpoint at least every this many fast returns: fairness for other trio tasks.
_CHECKPOINT_EVERY = 8

_original_wait_readable = trio.lowlevel.wait_readable


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def install() -> None:
    if getattr(trio.lowlevel.wait_readable, "_blkfuse_fast", False):
        return
    pollers: dict[int, select.poll] = {}
    fast_returns = 0

    async def wait_readable(fd: "int | _HasFileno") -> None:
        nonlocal fast_returns
        number = fd if isinstance(fd, int) else fd.fileno()
        poller = pollers.get(number)
        if poller is None:
            poller = pollers[number] = select.poll()
            poller.register(number, select.POLLIN)
        if poller.poll(0):
            fast_returns += 1
            if fast_returns % _CHECKPOINT_EVERY:
                return
            await trio.lowlevel.checkpoint()
            return
        await _original_wait_readable(fd)

    wait_readable._blkfuse_fast = True  # type: ignore[attr-defined]  # marks it installed
    trio.lowlevel.wait_readable = wait_readable
