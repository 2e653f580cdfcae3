"""Reads that wait on a disk, without threads: a minimal io_uring (Linux 5.6+, x86-64).

A backing read that misses the page cache must not block the one trio thread (image.py).
Handing it to a worker thread costs a GIL hand-off at every step of the hop, and with
several workers and a busy trio thread those hand-offs dominate (measured:
docs/benchmarks.md). Here the trio thread submits the read to the kernel (one io_uring_enter) and parks the request's
task; the kernel reads, posts the completion to a ring in shared memory and signals an
eventfd that trio's epoll watches; a system task reaps the ring and reschedules the tasks.
No Python thread, so no GIL traffic, at any queue depth.

Where the kernel allows it (Linux 5.11+ for an unprivileged process), the ring has a kernel
submission thread (IORING_SETUP_SQPOLL): the trio thread only writes the entry and nudges that
thread, which issues the read itself. A read that misses the page cache is then started by the
submission thread, and finished by the kernel's async buffered-read path (a page-lock
callback), so neither the trio thread nor an io-wq worker waits on it or starts the disk I/O.
On a cold disk at queue depth 32 that was 1.6x the reads per second of the plain ring, whose
every miss went to an io-wq worker (IOSQE_ASYNC), woken per read (docs/benchmarks.md). The
thread polls for `SQ_THREAD_IDLE_MS` after its last entry, then sleeps until nudged: a mount
that reads from the page cache (never through the ring) or sits idle does not keep it
running. Where SQPOLL is refused, the plain ring as before.

Only what image.py needs: IORING_OP_READ on one file descriptor into a fresh buffer.
The ring is written with plain stores through a memoryview, which x86-64's memory model
orders as io_uring requires (a release store of the tail after the entry); other
architectures would need barriers Python cannot express, so there `Ring.open` says no, as
it does where the kernel refuses io_uring (io_uring_disabled, or seccomp: Docker's default
profile blocks it). image.py then uses its worker pool.
"""

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import struct
from collections.abc import Callable
from typing import Any

import outcome
import trio

_SYS_IO_URING_SETUP = 425
_SYS_IO_URING_ENTER = 426
_SYS_IO_URING_REGISTER = 427
_IORING_OFF_SQ_RING = 0
_IORING_OFF_CQ_RING = 0x8000000
_IORING_OFF_SQES = 0x10000000
_IORING_FEAT_SINGLE_MMAP = 1 << 0
_IORING_REGISTER_EVENTFD = 4
_IORING_SETUP_SQPOLL = 1 << 1
_IORING_ENTER_SQ_WAKEUP = 1 << 1
_IORING_OP_READ = 22
# How long the submission thread keeps polling after its last entry (ms): long enough to
# span the gaps of a burst of cold reads, short enough that it is asleep soon after.
SQ_THREAD_IDLE_MS = 10
# Straight to the kernel's io-wq workers: the submission does not try the read itself, so
# starting the disk I/O (a VM exit on a virtual disk, ~0.1 ms measured) is not paid by the
# trio thread. Only reads the page cache cannot answer come here.
_IOSQE_ASYNC = 1 << 4

_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe: user_data, res, flags

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _SqOffsets(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array")
    ] + [("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _CqOffsets(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags")
    ] + [("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


class Ring:
    """One io_uring for reads of one file. Trio thread only. `sqpoll`: with a kernel
    submission thread (the module doc); OSError where the kernel refuses it."""

    def __init__(self, fd: int, entries: int = 256, *, sqpoll: bool = False):
        self.fd = fd
        self.sqpoll = sqpoll
        params = _Params()
        if sqpoll:
            params.flags = _IORING_SETUP_SQPOLL
            params.sq_thread_idle = SQ_THREAD_IDLE_MS
        ring_fd = _syscall(_SYS_IO_URING_SETUP, entries, ctypes.byref(params))
        if ring_fd < 0:
            raise OSError(ctypes.get_errno(), "io_uring_setup failed")
        self.ring_fd = ring_fd
        try:
            if not params.features & _IORING_FEAT_SINGLE_MMAP:
                raise OSError(
                    errno.ENOSYS, "io_uring without IORING_FEAT_SINGLE_MMAP (Linux < 5.4)"
                )
            sq, cq = params.sq_off, params.cq_off
            size = max(sq.array + params.sq_entries * 4, cq.cqes + params.cq_entries * _CQE.size)
            self._rings = mmap.mmap(
                ring_fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, offset=_IORING_OFF_SQ_RING
            )
            self._sqes = mmap.mmap(
                ring_fd,
                params.sq_entries * _SQE.size,
                mmap.MAP_SHARED | mmap.MAP_POPULATE,
                offset=_IORING_OFF_SQES,
            )
            words = memoryview(self._rings).cast("I")
            self._words = words
            self._sq_head, self._sq_tail = sq.head // 4, sq.tail // 4
            self._sq_mask = words[sq.ring_mask // 4]
            self._cq_head, self._cq_tail = cq.head // 4, cq.tail // 4
            self._cq_mask = words[cq.ring_mask // 4]
            self._cqes = cq.cqes
            self.capacity = params.sq_entries
            for i in range(params.sq_entries):  # the SQ array maps slot i to entry i, for good
                words[sq.array // 4 + i] = i
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            registered = ctypes.c_int32(self.eventfd)
            if (
                _syscall(
                    _SYS_IO_URING_REGISTER,
                    ring_fd,
                    _IORING_REGISTER_EVENTFD,
                    ctypes.byref(registered),
                    1,
                )
                < 0
            ):
                raise OSError(ctypes.get_errno(), "io_uring_register(EVENTFD) failed")
        except BaseException:
            self.close()
            raise
        # in flight: user_data -> (what to call with the result, or None if nobody wants it
        # any more; its buffer, alive until the kernel is done with it)
        self._inflight: dict[int, tuple[Callable[[Any], None] | None, Any]] = {}
        self._next_id = 1
        self._reaper_token: trio.lowlevel.TrioToken | None = None
        self.submitted = 0

    @classmethod
    def open(cls, fd: int) -> "Ring | None":
        """A ring for fd, with a submission thread where the kernel allows one, or None where
        io_uring cannot be used here (see the module doc)."""
        if platform.machine() != "x86_64":
            return None
        for sqpoll in (True, False):
            try:
                return cls(fd, sqpoll=sqpoll)
            except OSError:
                continue
        return None

    @property
    def busy(self) -> int:
        return len(self._inflight)

    def start(self, offset: int, length: int, done: Callable[[Any], None]) -> None:
        """Start reading `length` bytes at `offset`: done(data) once they are in (a bytearray,
        short only at the end of the file or on an interrupted read), done(OSError) if the
        read failed, called from the reaper task, never from here. `done` must not raise.
        BlockingIOError (nothing started) if the ring is full, OSError if the kernel refused
        the entry (its completion, if any, then calls nobody)."""
        if len(self._inflight) >= self.capacity:
            raise BlockingIOError(errno.EAGAIN, "io_uring full")  # the caller reads another way
        token = trio.lowlevel.current_trio_token()
        if self._reaper_token is not token:  # first use in this trio run
            self._reaper_token = token
            trio.lowlevel.spawn_system_task(self._reap, name="blkfuse-uring-reaper")
        buffer = bytearray(length)
        address = ctypes.addressof((ctypes.c_char * length).from_buffer(buffer)) if length else 0
        request = self._next_id
        self._next_id += 1
        words = self._words
        tail = words[self._sq_tail]
        _SQE.pack_into(
            self._sqes,
            (tail & self._sq_mask) * _SQE.size,
            _IORING_OP_READ,
            0 if self.sqpoll else _IOSQE_ASYNC,
            0,
            self.fd,
            offset,
            address,
            length,
            0,
            request,
            0,
            0,
            0,
            0,
            0,
        )
        if self.sqpoll:
            self._inflight[request] = (done, buffer)
            words[self._sq_tail] = (tail + 1) & 0xFFFFFFFF  # publishes it (x86-64: ordered)
            # Always nudge the thread rather than read IORING_SQ_NEED_WAKEUP first: that read
            # would need a full barrier after the tail store (x86-64 may do the load first,
            # see the thread awake as it goes to sleep, and leave the entry unread), which
            # Python cannot issue; the syscall is one. Waking an awake thread costs nothing.
            if (
                _syscall(_SYS_IO_URING_ENTER, self.ring_fd, 0, 0, _IORING_ENTER_SQ_WAKEUP, None, 0)
                < 0
            ):
                # The entry is out of our hands (the thread may read it yet): its buffer
                # stays referenced until its completion, which calls nobody then.
                self._inflight[request] = (None, buffer)
                raise OSError(ctypes.get_errno() or errno.EIO, "io_uring_enter failed")
        else:
            words[self._sq_tail] = (tail + 1) & 0xFFFFFFFF  # publishes it (x86-64: ordered)
            if _syscall(_SYS_IO_URING_ENTER, self.ring_fd, 1, 0, 0, None, 0) != 1:
                words[self._sq_tail] = tail  # not consumed: take it back
                raise OSError(ctypes.get_errno() or errno.EIO, "io_uring_enter failed")
            self._inflight[request] = (done, buffer)
        self.submitted += 1

    async def read(self, offset: int, length: int) -> bytearray:
        """`length` bytes at `offset` (short only at the end of the file); OSError on failure.
        Not cancellable: the kernel writes into the buffer until the read completes."""
        task = trio.lowlevel.current_task()
        self.start(offset, length, lambda got: trio.lowlevel.reschedule(task, outcome.Value(got)))
        got = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if isinstance(got, OSError):
            raise got
        return got

    def _reap_completions(self) -> None:
        words = self._words
        head, tail = words[self._cq_head], words[self._cq_tail]
        while head != tail:
            request, result, _ = _CQE.unpack_from(
                self._rings, self._cqes + (head & self._cq_mask) * _CQE.size
            )
            head = (head + 1) & 0xFFFFFFFF
            words[self._cq_head] = head  # the entry is read: before a callback runs
            done, buffer = self._inflight.pop(request, (None, b""))
            if done is None:
                continue
            if result < 0:
                done(OSError(-result, os.strerror(-result)))
            else:
                if result < len(buffer):  # the end of the file, or (rarely) an interrupted read
                    del buffer[result:]
                done(buffer)

    async def _reap(self) -> None:
        while True:
            try:
                os.eventfd_read(self.eventfd)
            except BlockingIOError:
                pass
            self._reap_completions()
            await trio.lowlevel.wait_readable(self.eventfd)

    def close(self) -> None:
        """Release the ring (after every read completed: the image closes when requests are
        done). Safe to call twice."""
        for name in ("_words",):
            view = getattr(self, name, None)
            if view is not None:
                view.release()
                setattr(self, name, None)
        for name in ("_rings", "_sqes"):
            ring = getattr(self, name, None)
            if ring is not None:
                ring.close()
                setattr(self, name, None)
        for name in ("eventfd", "ring_fd"):
            fd = getattr(self, name, None)
            if fd is not None and fd >= 0:
                os.close(fd)
                setattr(self, name, None)
