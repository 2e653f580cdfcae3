"""The backing disk image: positioned reads and writes, fsync, truncate, hole punching,
zeroing and extent queries. Nothing else.

With `direct` (cache=none / directsync) the file is opened O_DIRECT, which wants buffers,
offsets and lengths aligned to the device's block. QEMU's file node pads unaligned requests
below blkdebug, where no rule sees it (oracle case data_cache_none_unaligned_no_rmw_in_blkdebug);
so does this class: an unaligned write reads the blocks it only partly covers, merges, writes
whole blocks and cuts the file back to its size when the last block ran past the end.
"""

import ctypes
import ctypes.util
import errno as _errno
import mmap
import os
import stat

import trio

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# O_DIRECT alignment: 4096 satisfies every logical block size up to a 4K-native disk.
DIRECT_ALIGN = 4096
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError on failure (Python's os module has no mode argument)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class Image:
    """One open backing file. Reads and writes are plain pread/pwrite on the calling
    thread: on a page-cached or tmpfs file they take microseconds, far less than a hop
    to a worker thread (measured 2-4x slower end to end). fsync can take a disk's
    latency, so it runs in a worker thread and never stalls other requests."""

    def __init__(self, path: str, read_only: bool = False, direct: bool = False):
        self.path = path
        self.read_only = read_only
        self.direct = direct
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if direct:
            flags |= os.O_DIRECT
        self.fd = os.open(path, flags | os.O_CLOEXEC)
        if not os.path.isfile(path) and not _is_block_device(self.fd):
            os.close(self.fd)
            raise OSError(f"{path}: not a regular file or block device")
        # The request alignment QEMU's O_DIRECT file node would pick (write_zeroes uses it)
        self.zero_align = _probe_alignment(self.fd) if direct else 1

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def pread(self, offset: int, length: int) -> bytes:
        if self.direct:
            return self._direct_pread(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # A short read means end of file: read until then, in case of a signal.
            chunks = [data]
            got = len(data)
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    break
                chunks.append(more)
                got += len(more)
            data = b"".join(chunks)
        return data

    def pwrite(self, offset: int, data) -> int:
        if self.direct:
            return self._direct_pwrite(offset, data)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        return done

    # ---- O_DIRECT: aligned bounce buffers ----

    def _read_aligned(self, buf: mmap.mmap, start: int, length: int, at: int = 0) -> int:
        """Read [start, start+length) (aligned) into buf[at:]; bytes read (short at EOF)."""
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(self.fd, [view[at + got:at + length]], start + got)
            if n <= 0:
                break
            got += n
            if got % DIRECT_ALIGN:
                break                     # a partial block is the end of the file
        return got

    def _direct_pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = mmap.mmap(-1, end - start)
        try:
            got = self._read_aligned(buf, start, end - start)
            return buf[offset - start:max(offset - start, min(got, offset - start + length))]
        finally:
            buf.close()

    def _direct_pwrite(self, offset: int, data) -> int:
        length = len(data)
        if length == 0:
            return 0
        size = self.size()
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = mmap.mmap(-1, end - start)       # page-aligned and zero-filled
        try:
            if start != offset:
                self._read_aligned(buf, start, DIRECT_ALIGN)
            tail_block = end - DIRECT_ALIGN
            if end != offset + length and not (start != offset and tail_block == start):
                self._read_aligned(buf, tail_block, DIRECT_ALIGN, at=tail_block - start)
            buf[offset - start:offset - start + length] = bytes(data)
            view = memoryview(buf)
            done = 0
            while done < end - start:
                done += os.pwritev(self.fd, [view[done:]], start + done)
            del view
        finally:
            buf.close()
        new_size = max(size, offset + length)
        if end > new_size:
            os.ftruncate(self.fd, new_size)     # the last block ran past the end of the file
        return length

    # ---- zeroing, holes, extents ----

    def punch_hole(self, offset: int, length: int) -> None:
        """Discard, as QEMU's file-posix: PUNCH_HOLE|KEEP_SIZE; unsupported is no error
        (a discard is advisory)."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as error:
            if error.errno not in (_errno.EOPNOTSUPP, _errno.ENOTSUP, _errno.ENOSYS):
                raise

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero [offset, offset+length), growing the file if it ends past it. As file-posix:
        with `unmap` punch a hole first; else (or if that is refused) ZERO_RANGE; where
        the file system supports neither, write zeroes."""
        if length <= 0:
            return
        if self.zero_align > 1:
            # QEMU's O_DIRECT file node pads to its alignment first: partial blocks at
            # either end are written as data (read-modify-write), which allocates them;
            # only the aligned middle is zeroed by fallocate. SEEK_DATA sees the difference.
            align = self.zero_align
            end = offset + length
            middle_start = -(-offset // align) * align
            middle_end = end - end % align
            if middle_start >= middle_end:
                self.pwrite(offset, bytes(length))
                return
            if offset < middle_start:
                self.pwrite(offset, bytes(middle_start - offset))
            if middle_end < end:
                self.pwrite(middle_end, bytes(end - middle_end))
            offset, length = middle_start, middle_end - middle_start
        if unmap and offset + length <= self.size():
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as error:
                if error.errno not in (_errno.EOPNOTSUPP, _errno.EINVAL, _errno.EBUSY,
                                       _errno.ENOSYS):
                    raise
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
            return
        except OSError as error:
            if error.errno not in (_errno.EOPNOTSUPP, _errno.EINVAL, _errno.ENOSYS):
                raise
        zeros = bytes(min(length, _ZERO_CHUNK))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            self.pwrite(pos, zeros[:n])
            pos += n

    def extent(self, offset: int, length: int) -> tuple[bool, int]:
        """(is data, bytes) of the extent at `offset`, at most `length` long: what QEMU's
        file node answers a block-status query with (SEEK_DATA/SEEK_HOLE on the file)."""
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == _errno.ENXIO:
                return False, length              # a hole up to the end of the file
            return True, length                   # no information: all data, as QEMU
        if data > offset:
            return False, min(length, data - offset)
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return True, min(length, max(1, hole - offset))

    async def fsync(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self.fd)

    def fsync_now(self) -> None:
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _probe_alignment(fd: int) -> int:
    """The request alignment QEMU 7.2's file-posix probes for an O_DIRECT file
    (raw_probe_alignment): the first of 1, 512, 1024, 2048, 4096 bytes that an O_DIRECT read
    at offset 0 accepts, where 1 means "anything goes" and becomes 4096. On ext4 a 1-byte
    read of a hole succeeds, so an image starting with a hole gets 4096 and one starting
    with data 512: it decides which partial blocks a write-zeroes allocates."""
    if _is_block_device(fd):
        return 512
    buf = mmap.mmap(-1, DIRECT_ALIGN)
    try:
        view = memoryview(buf)
        for align in (1, 512, 1024, 2048, 4096):
            try:
                os.preadv(fd, [view[:align]], 0)
            except OSError:
                continue
            return align if align != 1 else DIRECT_ALIGN
        return DIRECT_ALIGN
    finally:
        del view
        buf.close()


def _is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)
