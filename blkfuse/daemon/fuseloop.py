"""Cheaper waits for pyfuse3's request loop: skip the epoll round trip, poll before sleeping.

pyfuse3's worker loop awaits `trio.lowlevel.wait_readable(fuse_fd)` when it wants the next
request. With the patched loop's hand-off (scripts/pyfuse3/0002, the default) it reads
/dev/fuse without waiting first and calls the wait only when nothing is queued; pyfuse3's
locked loop (`BLKFUSE_HANDOFF=0`) calls it before every request. `install()` replaces that
wait with one that, in this order:

1. Asks poll(2) with a zero timeout and returns at once when a request is already queued
   (the locked loop under load: /dev/fuse nearly always is). Parking the task in epoll would
   cost a syscall to arm the fd and a whole scheduler pass. A real checkpoint every few fast
   returns keeps other tasks (resumed requests, the control file, shutdown) running and lets
   cancellation in.
2. Busy-polls /dev/fuse for a short window before parking (`-o poll-us=N`, 0 = off). At
   queue depth 1 the next request comes a few microseconds after the reply; sleeping in
   epoll and being woken costs more than that (a C server doubles its QD1 rate with the same
   trick, and QEMU's iothreads do it as `poll-max-ns`). The window adapts as QEMU's does
   (util/aio-posix.c): it grows from 4 us, doubling, while the requests came after a wait
   shorter than the maximum, and drops to 0 after a longer one, so a mount that stops being
   busy stops spinning after one window: idle costs nothing.

The spin never starves other trio tasks: it starts only when trio has no other task ready to
run, and it also polls trio's own epoll fd, so a worker thread finishing an I/O, a signal or
any other fd trio waits on ends it at once. A timer (a delayed request) can fire at most one
window late.
"""

import os
import select
import time
from typing import Any, Protocol

import trio

# A checkpoint at least every this many fast returns: fairness for other trio tasks.
_CHECKPOINT_EVERY = 8

# The longest busy-poll window unless -o poll-us says otherwise (chosen by measurement:
# docs/benchmarks.md).
DEFAULT_POLL_US = 50

# QEMU's adaptive polling constants: the first window, and the factor it grows by.
_INITIAL_WINDOW_NS = 4000
_GROW = 2

_original_wait_readable = trio.lowlevel.wait_readable


class AdaptiveWindow:
    """How long to busy-poll before parking; QEMU's adjust_polling_time() with poll-shrink=0.

    `waited(ns)` is told how long each wait took from its start (spin included) until a
    request came: a wait the window covered changes nothing; one longer than the maximum
    means the mount went quiet, so stop polling; a shorter one means polling a little longer
    would have caught it, so grow.
    """

    __slots__ = ("max_ns", "ns")

    def __init__(self, max_us: int):
        self.max_ns = max_us * 1000
        self.ns = 0

    def waited(self, block_ns: int) -> None:
        if block_ns <= self.ns:
            return
        if block_ns > self.max_ns:
            self.ns = 0
        elif self.ns < self.max_ns:
            self.ns = min(self.max_ns, self.ns * _GROW if self.ns else _INITIAL_WINDOW_NS)


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _trio_internals() -> tuple[Any, int | None]:
    """trio's run queue and its epoll fd. Both are private: on a trio without them the
    spin is off (a fake non-empty queue) and only the zero-timeout check remains."""
    try:
        runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
        return runner.runq, runner.io_manager._epoll.fileno()
    except AttributeError:
        return (None,), None


class Loop:
    """What install() returns: the polling window, and whether the loop has nothing to do."""

    def __init__(self, window: AdaptiveWindow, state: dict):
        self.window = window
        self._state = state

    def idle(self) -> bool:
        """No request queued on /dev/fuse: blocking the loop for one disk read now holds no
        request up (image.py uses it at queue depth 1). trio's run queue is not asked: it
        always holds the pyfuse3 worker that takes over reading /dev/fuse; a resumed request
        or a control write waits at most that one read, as before worker threads."""
        for number, (poller, _, _) in self._state.items():
            if any(fd == number for fd, _ in poller.poll(0)):
                return False
        return bool(self._state)


def _is_fuse_device(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse"
    except OSError:
        return False


def install(poll_us: int = 0, *, handoff: bool = False) -> Loop:
    """Replace trio.lowlevel.wait_readable (pyfuse3 looks it up at every call) with the fast
    wait; `poll_us` is the longest busy-poll window (0: never spin). `handoff`: the request
    loop is the patch's hand-off loop, which waits only after /dev/fuse answered EAGAIN, so
    the zero-timeout poll of step 1 would nearly always find nothing: it is skipped unless it
    is the first turn of a spin."""
    window = AdaptiveWindow(poll_us)
    state: dict[int, Any] = {}  # /dev/fuse fd -> (poll object, run queue, trio's epoll fd)
    others = set()  # fds that are not /dev/fuse
    fast_returns = 0
    monotonic_ns = time.monotonic_ns

    async def wait_readable(fd: int | _HasFileno) -> None:
        nonlocal fast_returns
        number = fd if isinstance(fd, int) else fd.fileno()
        entry = state.get(number)
        if entry is None:
            if number in others or not _is_fuse_device(number):
                # trio's own wake-up socket, the signal pipe...: trio's wait, unchanged
                others.add(number)
                await _original_wait_readable(fd)
                return
            runq, trio_fd = _trio_internals()
            poller = select.poll()
            poller.register(number, select.POLLIN)
            if trio_fd is not None:
                poller.register(trio_fd, select.POLLIN)
            entry = state[number] = (poller, runq, trio_fd)
        poller, runq, trio_fd = entry
        spin = window.ns and not runq
        ready = poller.poll(0) if spin or not handoff else []
        if not ready and spin:
            # Nothing else can become runnable while we spin (one thread): only I/O, which
            # shows on trio's epoll fd, or a timer, at most one window late.
            start = monotonic_ns()
            deadline = start + window.ns
            while not ready and monotonic_ns() < deadline:
                ready = poller.poll(0)
            if not any(ready_fd == number for ready_fd, _ in ready):
                await _original_wait_readable(fd)
                window.waited(monotonic_ns() - start)
                return
        if any(ready_fd == number for ready_fd, _ in ready):
            fast_returns += 1
            if fast_returns % _CHECKPOINT_EVERY:
                return
            await trio.lowlevel.checkpoint()
            return
        if window.max_ns and not runq:
            start = monotonic_ns()
            await _original_wait_readable(fd)
            window.waited(monotonic_ns() - start)
            return
        await _original_wait_readable(fd)

    wait_readable._blkfuse_fast = True  # type: ignore[attr-defined]  # marks it installed
    trio.lowlevel.wait_readable = wait_readable
    return Loop(window, state)


def uninstall() -> None:
    """Back to trio's own wait_readable (tests that install in-process)."""
    trio.lowlevel.wait_readable = _original_wait_readable
