"""I/O on a mounted image for the mount tests: test data, O_DIRECT buffers, a blocking writer
and a blocking control command."""

import mmap
import os
import threading

KiB = 1024
MiB = 1024 * KiB


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def aligned(data: bytes) -> memoryview:
    """An O_DIRECT-safe buffer holding `data`."""
    buf = mmap.mmap(-1, max(len(data), 4096))
    buf.write(data)
    return memoryview(buf)[: len(data)]


def open_image(m, flags: int = os.O_RDWR) -> int:
    return os.open(m.file, flags)


class Writer(threading.Thread):
    """A pwrite in its own thread (it may block at a breakpoint)."""

    def __init__(self, m, offset: int, data: bytes, flags: int = os.O_RDWR):
        super().__init__(daemon=True)
        self.m, self.offset, self.data, self.flags = m, offset, data, flags
        self.result: int | None = None
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            fd = open_image(self.m, self.flags)
            try:
                self.result = os.pwrite(fd, self.data, self.offset)
            finally:
                os.close(fd)
        except OSError as e:
            self.error = e


class Command(threading.Thread):
    """A control command in its own thread (it may block: wait_break, powercut-wait)."""

    def __init__(self, m, command: str):
        super().__init__(daemon=True)
        self.m, self.command = m, command
        self.answer: str | None = None
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.answer = self.m._ctl(self.command)
        except OSError as e:
            self.error = e


def write_unsynced(m, offset: int, data: bytes) -> None:
    """A plain pwrite through the mount, no fsync: it stays in the undo log until a flush."""
    fd = open_image(m)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read(m, offset: int, length: int) -> bytes:
    fd = open_image(m, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
