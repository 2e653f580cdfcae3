"""The backing disk image: positioned reads and writes, fsync, truncate, hole punching,
zeroing and extent queries. Nothing else.

With `direct` (cache=none / directsync) the file is opened O_DIRECT, which wants buffers,
offsets and lengths aligned to the device's block. QEMU's file node pads unaligned requests
below blkdebug, where no rule sees it (oracle case data_cache_none_unaligned_no_rmw_in_blkdebug);
so does this class: an unaligned write reads the blocks it only partly covers, merges, writes
whole blocks and cuts the file back to its size when the last block ran past the end.

`pread`/`pwrite` do the I/O on the calling thread. `read`/`write` are what the block layer
awaits, and they keep the one trio thread from waiting on a disk:

    memory file system (tmpfs, ramfs)   plain pread/pwrite inline: they never wait on a
                                        disk, and a hop to a worker thread costs far more
    O_DIRECT backing (cache=none, ...)  every read and write in the worker pool: each one
                                        waits on the device
    anything else                       reads: preadv2(RWF_NOWAIT) inline, which succeeds
                                        from the page cache and fails with EAGAIN instead
                                        of reading the disk; only those leave the loop:
                                        to io_uring where it can be used (uring.py: no
                                        thread, no GIL hand-off), else to the pool.
                                        While misses are frequent, cachestat(2) asks first
                                        instead: a NOWAIT miss still starts the disk read
                                        in the calling thread, and on a busy (virtual)
                                        disk that submission alone took ~0.4 ms (profiled).
                                        Writes: pwritev2(RWF_NOWAIT) the same way where the
                                        file system supports it; where it does not (ext4,
                                        buffered), inline, since a buffered write only
                                        copies into the page cache
    a file system that refuses          (overlayfs: the root of a Docker container) "blind":
    RWF_NOWAIT                          it cannot say which reads the page cache answers,
                                        so every read leaves the loop as a miss would (to
                                        io_uring, else the pool), except at queue depth 1,
                                        where it is done inline. Writes inline.

io_uring (`uring=False` or BLKFUSE_URING=0 at mount: off, for A/B runs) beat the pool on a
cold disk at queue depth 32 by 1.6x on the test VM (2026-12-06, idle: the pool 6.8k IOPS,
the plain ring 16.7k, the ring with a submission thread about 21k; uring.py): a worker thread needs the GIL back after every syscall, and with a busy
trio thread those hand-offs cost more than the reads.
The pool is `io_threads` worker threads at most (0: no pool, all I/O inline), so a burst of cold reads is a bounded queue
at the disk, not a thread per request. It is a plain job queue, not trio.to_thread, which
cost twice the CPU per hop (measured: 240 against 130 us on the loaded test machine). With
no other request waiting (queue depth 1) a read that would go to the pool is done inline:
the hop costs more than it saves there. fsync runs in a trio worker thread as before.
"""

import ctypes
import ctypes.util
import errno as _errno
import fcntl
import mmap
import os
import queue
import stat
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from blkfuse.block.uring import Ring

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# O_DIRECT alignment: 4096 satisfies every logical block size up to a 4K-native disk.
DIRECT_ALIGN = 4096
# What pwrite takes: any contiguous bytes (collections.abc.Buffer once Python 3.12 is the floor).
Bytes = bytes | bytearray | memoryview
_T = TypeVar("_T")
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


DEFAULT_IO_THREADS = 4
MAX_IO_THREADS = 256

# statfs f_type of file systems that live in memory (linux/magic.h).
_TMPFS_MAGIC = 0x01021994
_MEMORY_FILE_SYSTEMS = {_TMPFS_MAGIC, 0x858458F6}  # and RAMFS_MAGIC

INLINE, NOWAIT, POOL, BLIND = "inline", "nowait", "pool", "blind"

# A lean read at least this long whose data the page cache holds is answered from a mapping of
# the file, not a pread: the reply's copy into /dev/fuse then reads the page cache itself, one
# copy of the data instead of two. Below this, mapping and unmapping cost more than the copy
# saved (measured: docs/benchmarks.md, "Large requests without a copy").
MAPPED_READ_MIN = 256 * 1024

# Python 3.13's mmap can skip its dup() of the descriptor (and the close() when unmapped)
_MMAP_NO_DUP: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}

# Reads go through cachestat(2) first while more than this share of recent ones missed
# the page cache (an average over the last ~16 reads).
_COLD_SHARE = 0.1


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError on failure (Python's os module has no mode argument)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class Image:
    """One open backing file (the module's doc says where its I/O runs). fsync can take a
    disk's latency, so it runs in a worker thread and never stalls other requests."""

    def __init__(
        self,
        path: str,
        read_only: bool = False,
        direct: bool = False,
        *,
        io_threads: int = DEFAULT_IO_THREADS,
        uring: bool = True,
    ):
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
        # The file's size, kept as QEMU's block layer keeps a regular file's (bs->total_sectors):
        # asked once, then updated by every change made here, so a request costs no lseek.
        # A block device's is asked every time (QEMU's host_device has_variable_length). A
        # change from outside shows at the next forget_size() (the mount's stat asks for it).
        # None: ask the file at the next size(). (Public for BlockDevice.read_now, which
        # saves a call per request with it.)
        self.known_size: int | None = None
        self._size_cached = not _is_block_device(self.fd)
        # tmpfs answers SEEK_HOLE by walking its pages up to the next hole: 29 ms for a full
        # 1 GiB file (Linux 6.1). Who asks per write (the undo log) must know (crash/undo.py).
        self.seek_hole_scans = _file_system_type(self.fd) == _TMPFS_MAGIC
        # The request alignment QEMU's O_DIRECT file node would pick (write_zeroes uses it)
        self.zero_align = _probe_alignment(self.fd) if direct else 1
        self.io_threads = io_threads
        self._pool: WorkerPool | None = None  # made at the first I/O that needs it
        # Set by the daemon (fuseloop.Loop.idle): True when no other request waits. A read
        # that would go to the pool is then done inline: at queue depth 1 the hop to a
        # thread and back costs more than it saves (measured: docs/benchmarks.md).
        self.loop_idle: Callable[[], bool] | None = None
        # io_threads=0: no pool, every read and write inline (as before it existed; A/B runs)
        self._read_mode = self._write_mode = _io_mode(self.fd) if io_threads else INLINE
        if self._write_mode == BLIND:  # buffered writes only copy into the page cache
            self._write_mode = INLINE
        # Every read / write is a plain pread / pwrite in the calling thread, never awaited
        # (BlockDevice's lean path does those itself). Reads never become inline later;
        # writes do where the file system refuses NOWAIT for them.
        self.reads_inline = self._read_mode == INLINE
        self.reads_nowait = self._read_mode == NOWAIT  # at the start (read_cached says now)
        self.writes_inline = self._write_mode == INLINE
        # Page cache misses go to io_uring where it can be used, else to the pool (uring.py).
        self._ring = Ring.open(self.fd) if uring and self._read_mode in (NOWAIT, BLIND) else None
        self._miss_share = 0.0  # recent reads that missed the page cache (average)
        self._cachestat = PageCacheQuery.open(self.fd) if self._read_mode == NOWAIT else None
        # How the reads went, for `status` and the tests: served inline (page cache or a
        # memory file system) or in a worker thread.
        self.inline_reads = 0
        self.pool_reads = 0
        self.uring_reads = 0
        self.blocking_inline = 0  # of those, done inline anyway: nothing else waited
        self.mapped_reads = 0  # large reads answered from a mapping (read_mapped)

    @property
    def io_mode(self) -> str:
        """inline / nowait / pool / blind: how reads are done (the module doc says what each means)."""
        return self._read_mode

    def read_counts(self) -> dict[str, int]:
        """How the backing reads went so far (`status json`'s backing_reads)."""
        return {
            "inline": self.inline_reads,
            "io_uring": self.uring_reads,
            "pool": self.pool_reads,
            "waited_inline": self.blocking_inline,
            "mapped": self.mapped_reads,
        }

    @property
    def uses_uring(self) -> bool:
        """Page cache misses are read through io_uring (else in the worker pool)."""
        return self._ring is not None

    def size(self) -> int:
        size = self.known_size
        if size is None:
            size = os.lseek(self.fd, 0, os.SEEK_END)
            if self._size_cached:
                self.known_size = size
        return size

    def forget_size(self) -> None:
        """Ask the file for its size at the next size() (it may have changed from outside)."""
        self.known_size = None

    def _may_grow(self, end: int) -> None:
        """Before a change that ends at `end`: past the known size, ask the file again after."""
        size = self.known_size
        if size is not None and end > size:
            self.known_size = None

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

    def pwrite(self, offset: int, data: Bytes, *, fua: bool = False) -> int:
        """Write all of `data` on the calling thread. `fua` (node.py) changes nothing here:
        the block device fsyncs the file after a FUA write that reaches it (QEMU 10.0), or
        flushes the stack after one it emulates (7.2, as QEMU's file node wants there)."""
        length = len(data)
        size = self.known_size
        if size is not None and offset + length > size:
            self.known_size = None  # _may_grow, inline: every write passes here
        if self.direct:
            return self._direct_pwrite(offset, data)
        done = os.pwrite(self.fd, data, offset)
        if done < length:  # a short write (a signal, a full file system): the rest
            view = memoryview(data)
            while done < length:
                done += os.pwrite(self.fd, view[done:], offset + done)
        return done

    # ---- awaited by the block layer: never waits on a disk in the trio thread ----

    def read_cached(self, offset: int, length: int) -> bytearray | None:
        """For BlockDevice's lean path on a disk-backed file: all of [offset, offset+length)
        if the page cache holds it (preadv2 RWF_NOWAIT, in the calling thread), else None,
        with nothing counted (read() then does it all: a miss costs one more NOWAIT try).
        Only while recent reads mostly hit; the caller counts a hit it uses (cached_hit)."""
        if self._read_mode != NOWAIT or self._miss_share > _COLD_SHARE:
            return None
        buffer = bytearray(length)
        try:
            got = os.preadv(self.fd, (buffer,), offset, os.RWF_NOWAIT)
        except OSError:
            return None
        return buffer if got == length else None

    def _read_if_cached(self, offset: int, length: int) -> bytes | None:
        """While reads mostly miss (cachestat(2) is cheaper than a NOWAIT read that misses):
        the data if the page cache holds all of it, else None; a hit or a miss, counted."""
        assert self._cachestat is not None
        if self._cachestat.all_cached(offset, length):
            self._miss_share *= 15 / 16
            self.inline_reads += 1
            return self.pread(offset, length)
        self._miss_share = self._miss_share * 15 / 16 + 1 / 16
        return None

    def can_read_later(self) -> bool:
        """read_later() would do the read: the file's misses go to io_uring, which has room."""
        ring = self._ring
        return ring is not None and ring.busy < ring.capacity

    def read_later(
        self, offset: int, length: int, done: Callable[[Any], None]
    ) -> bytes | bytearray | bool:
        """For BlockDevice's lean path, after read_cached() could not answer, and only if
        can_read_later(): the data at [offset, offset+length) if it can be had now (the page
        cache holds it after all, or nothing else waits: queue depth 1), else True: the read
        is started, and done(data) or done(OSError) is called when it ends, from the ring's
        reaper task (data short only at the end of the file). Counted as read() counts it."""
        ring = self._ring
        assert ring is not None  # can_read_later() said so
        if self._miss_share > _COLD_SHARE and self._cachestat is not None:
            # read_cached() asked nothing while reads mostly miss: ask now
            data = self._read_if_cached(offset, length)
            if data is not None:
                return data
        else:
            self._miss_share = self._miss_share * 15 / 16 + 1 / 16  # read_cached()'s miss
        if self._alone(ring.busy):
            return self.read_alone(offset, length)
        self.uring_reads += 1

        def finish(data: Any) -> None:
            if type(data) is bytearray:
                try:
                    data = self._complete(data, offset, length)
                except OSError as e:
                    data = e
            done(data)

        ring.start(offset, length, finish)
        return True

    def can_map(self, offset: int, length: int) -> bool:
        """For BlockDevice's lean path: read_mapped() may answer [offset, offset+length) without
        blocking the loop: the file lives in memory (or every read is inline anyway), or, while
        reads mostly hit, cachestat(2) finds it all in the page cache."""
        if self.direct:
            return False  # O_DIRECT: the page cache is not the file's truth
        if self.reads_inline:
            return True
        cachestat = self._cachestat
        return (
            cachestat is not None
            and self._miss_share <= _COLD_SHARE
            and cachestat.all_cached(offset, length)
        )

    def read_mapped(self, offset: int, length: int) -> memoryview | bytes:
        """[offset, offset+length), inside the file (can_map() allowed it), as a read-only view
        of a mapping of the file made for this read and unmapped when the view is released:
        sending it to /dev/fuse copies straight from the page cache. Counted as read() counts
        a hit. (One mapping kept for the whole file measured slower: dropping the pages it
        touched, so that they do not pile up in the daemon's RSS, cost more than mapping.)"""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._miss_share *= 15 / 16
        try:
            mapping = mmap.mmap(
                self.fd,
                offset + length - start,
                mmap.MAP_SHARED,
                mmap.PROT_READ,
                offset=start,
                **_MMAP_NO_DUP,
            )
        except (ValueError, OSError):
            # The file shrank behind the known size (ValueError: past its end), or its file
            # system cannot map it: pread answers as a read always did (short at the end)
            self.inline_reads += 1
            return self.pread(offset, length)
        self.mapped_reads += 1
        return memoryview(mapping)[offset - start :]

    def misses_alone(self) -> bool:
        """For BlockDevice's lean path, after read_cached() could not answer: reads mostly
        miss and nothing else waits (queue depth 1), so the read is best done in the loop now
        (read_alone): a miss would be read there anyway, after a cachestat and a
        PendingReply that cost about a fifth of the request (measured: docs/benchmarks.md),
        and a hit costs what read_cached's would."""
        if self._miss_share <= _COLD_SHARE:
            return False
        # Reads in flight count as waiting: at queue depth 32 /dev/fuse is often empty
        # while all the requests are in the ring (or the pool) meanwhile
        waiting = self._ring if self._ring is not None else self._pool
        return self._alone(waiting.busy if waiting is not None else 0)

    def read_alone(self, offset: int, length: int) -> bytes:
        """A miss read in the loop because nothing else waits (misses_alone, read_later,
        _cold_read): at queue depth 1 the hop to the ring or a thread costs more than it
        saves. Counted as waited_inline."""
        self.blocking_inline += 1
        return self.pread(offset, length)

    def cached_hit(self) -> None:
        """A read_cached() answer served a request: counted as read() counts a hit."""
        self._miss_share *= 15 / 16
        self.inline_reads += 1

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Data at [offset, offset+length), short only at the end of the file (a bytes-like
        object: bytes or bytearray)."""
        mode = self._read_mode
        if mode == INLINE:
            self.inline_reads += 1
            return self.pread(offset, length)
        if mode == NOWAIT:
            if self._miss_share > _COLD_SHARE and self._cachestat is not None:
                data = self._read_if_cached(offset, length)
                if data is not None:
                    return data
                return await self._cold_read(offset, length)
            buffer = bytearray(length)
            try:
                got = os.preadv(self.fd, (buffer,), offset, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as e:
                if e.errno not in (_errno.EOPNOTSUPP, _errno.EINVAL):
                    raise
                self._read_mode = BLIND  # the file system cannot say; ask no more
                got = 0
            if got == length:
                self._miss_share *= 15 / 16
                self.inline_reads += 1
                return buffer
            self._miss_share = self._miss_share * 15 / 16 + 1 / 16
            # Part of it, or none, is in the page cache: the disk has the rest (or the
            # file ends there, which the cold read finds out).
            rest = await self._cold_read(offset + got, length - got)
            if not got:
                return rest
            del buffer[got:]
            buffer += rest
            return buffer
        if mode == BLIND:
            return await self._cold_read(offset, length)
        self.pool_reads += 1
        return await self._in_pool(self.pread, offset, length)

    async def write(self, offset: int, data: Bytes, *, fua: bool = False) -> int:
        """Write all of `data` at `offset`; returns its length. `fua`: as pwrite."""
        mode = self._write_mode
        if mode == INLINE:
            return self.pwrite(offset, data)
        if mode == NOWAIT:
            view = memoryview(data)
            self._may_grow(offset + len(view))
            try:
                done = os.pwritev(self.fd, (view,), offset, os.RWF_NOWAIT)
            except BlockingIOError:
                done = 0
            except OSError as e:
                if e.errno not in (_errno.EOPNOTSUPP, _errno.EINVAL):
                    raise
                # ext4 and others refuse NOWAIT for buffered writes: those only copy into
                # the page cache, so they stay inline from now on.
                self._write_mode = INLINE
                self.writes_inline = True
                return self.pwrite(offset, data)
            if done == len(view):
                return done
            await self._in_pool(self.pwrite, offset + done, view[done:])
            self._may_grow(offset + len(view))  # a size() asked meanwhile saw the old end
            return len(view)
        await self._in_pool(self.pwrite, offset, data)
        self._may_grow(offset + len(data))
        return len(data)

    def _alone(self, busy: int) -> bool:
        """No read of this kind in flight (`busy`) and no request waiting on /dev/fuse: a
        read done in the loop now holds nobody up (queue depth 1)."""
        return not busy and self.loop_idle is not None and self.loop_idle()

    def _complete(self, data: bytearray, offset: int, length: int) -> bytearray:
        """A ring read's data, short only at the end of the file: the ring's read came back
        short (the end of the file, or an interrupted read), so pread finds out which."""
        if len(data) < length:
            data += self.pread(offset + len(data), length - len(data))
        return data

    async def _cold_read(self, offset: int, length: int) -> bytes | bytearray:
        """A read the page cache cannot answer: through io_uring, else the worker pool."""
        ring = self._ring
        if ring is not None and ring.busy < ring.capacity:
            if self._alone(ring.busy):
                return self.read_alone(offset, length)
            self.uring_reads += 1
            return self._complete(await ring.read(offset, length), offset, length)
        self.pool_reads += 1
        return await self._in_pool(self.pread, offset, length)

    async def _in_pool(self, function: Callable[..., _T], *args: Any) -> _T:
        pool = self._pool
        if pool is None:
            pool = self._pool = WorkerPool(self.io_threads)
        if self._alone(pool.busy):
            self.blocking_inline += 1
            return function(*args)
        return await pool.run(function, *args)

    # ---- O_DIRECT: aligned bounce buffers ----

    def _read_aligned(self, buf: mmap.mmap, start: int, length: int, at: int = 0) -> int:
        """Read [start, start+length) (aligned) into buf[at:]; bytes read (short at EOF)."""
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(self.fd, [view[at + got : at + length]], start + got)
            if n <= 0:
                break
            got += n
            if got % DIRECT_ALIGN:
                break  # a partial block is the end of the file
        return got

    def _direct_pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = mmap.mmap(-1, end - start)
        try:
            got = self._read_aligned(buf, start, end - start)
            return buf[offset - start : max(offset - start, min(got, offset - start + length))]
        finally:
            buf.close()

    def _direct_pwrite(self, offset: int, data: Bytes) -> int:
        length = len(data)
        if length == 0:
            return 0
        size = self.size()
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = mmap.mmap(-1, end - start)  # page-aligned and zero-filled
        try:
            if start != offset:
                self._read_aligned(buf, start, DIRECT_ALIGN)
            tail_block = end - DIRECT_ALIGN
            if end != offset + length and not (start != offset and tail_block == start):
                self._read_aligned(buf, tail_block, DIRECT_ALIGN, at=tail_block - start)
            buf[offset - start : offset - start + length] = bytes(data)
            view = memoryview(buf)
            done = 0
            while done < end - start:
                done += os.pwritev(self.fd, [view[done:]], start + done)
            del view
        finally:
            buf.close()
        new_size = max(size, offset + length)
        if end > new_size:
            os.ftruncate(self.fd, new_size)  # the last block ran past the end of the file
        self.known_size = None
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

    def discard(self, offset: int, length: int) -> None:
        self.punch_hole(offset, length)

    def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, *, fua: bool = False
    ) -> None:
        """Zero [offset, offset+length), growing the file if it ends past it. As file-posix:
        with `unmap` punch a hole first; else (or if that is refused) ZERO_RANGE; where
        the file system supports neither, write zeroes."""
        if length <= 0:
            return
        try:
            self._zero(offset, length, unmap)
        finally:
            # after, not before: the size asked for on the way (unmap's check) is the old one
            self._may_grow(offset + length)

    def _zero(self, offset: int, length: int, unmap: bool) -> None:
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
                if error.errno not in (
                    _errno.EOPNOTSUPP,
                    _errno.EINVAL,
                    _errno.EBUSY,
                    _errno.ENOSYS,
                ):
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
                return False, length  # a hole up to the end of the file
            return True, length  # no information: all data, as QEMU
        if data > offset:
            return False, min(length, data - offset)
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return True, min(length, max(1, hole - offset))

    async def fsync(self) -> None:
        # Shielded: an fsync that started finishes and decides the reply, even if the
        # request is interrupted meanwhile (it cannot be taken back anyway).
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(os.fsync, self.fd)

    async def flush(self) -> None:
        """The node protocol's name for fsync (node.py)."""
        await self.fsync()

    def fsync_now(self) -> None:
        os.fsync(self.fd)

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.fd)

    def truncate(self, size: int) -> None:
        self.known_size = None
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
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


class WorkerPool:
    """Up to `size` threads that run blocking calls for trio tasks, started as needed.

    A task puts (call, itself, the trio token) on a queue and sleeps; a worker runs the call
    and hands the outcome back with the token's run_sync_soon, which reschedules the task.
    The call is not cancellable once queued (as trio.to_thread's default): a read or write
    in flight must finish before its request can answer.
    """

    def __init__(self, size: int):
        self.size = size
        self._jobs: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.Task, trio.lowlevel.TrioToken]
        ] = queue.SimpleQueue()
        self._threads = 0
        self.busy = 0  # jobs queued or running; touched by the trio thread only

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        self.busy += 1
        if self.busy > self._threads and self._threads < self.size:
            self._threads += 1
            threading.Thread(
                target=self._work, name=f"blkfuse-io-{self._threads}", daemon=True
            ).start()
        self._jobs.put((function, args, task, token))
        try:
            result = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        finally:
            self.busy -= 1
        return result.unwrap()

    def _work(self) -> None:
        reschedule = trio.lowlevel.reschedule
        while True:
            function, args, task, token = self._jobs.get()
            result = outcome.capture(function, *args)
            try:
                # The task gets the outcome wrapped once more: wait_task_rescheduled unwraps
                # the outer one, run() the call's own (so an OSError reaches the block layer).
                token.run_sync_soon(reschedule, task, outcome.Value(result))
            except trio.RunFinishedError:
                pass  # the loop is gone: nobody waits for this any more
            del function, args, task, token, result


class PageCacheQuery:
    """cachestat(2) (Linux 6.5): how much of a range is in the page cache, without reading."""

    _SYSCALL = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine)

    def __init__(self, fd: int, syscall: Callable[..., int]):
        self.fd = fd
        self._syscall = syscall
        self._range = (ctypes.c_uint64 * 2)()  # struct cachestat_range {off, len}
        self._stat = (ctypes.c_uint64 * 5)()  # struct cachestat, nr_cache first
        self._range_ref = ctypes.byref(self._range)
        self._stat_ref = ctypes.byref(self._stat)
        self._page = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def open(cls, fd: int) -> "PageCacheQuery | None":
        """A query for fd, or None where the kernel has no cachestat."""
        if cls._SYSCALL is None:
            return None
        try:
            query = cls(fd, _libc.syscall)
            query.all_cached(0, 1)
        except (OSError, AttributeError):
            return None
        return query

    def all_cached(self, offset: int, length: int) -> bool:
        self._range[0] = offset
        self._range[1] = length
        if self._syscall(self._SYSCALL, self.fd, self._range_ref, self._stat_ref, 0) != 0:
            raise OSError(ctypes.get_errno(), "cachestat failed")
        page = self._page
        pages = (offset + length - 1) // page - offset // page + 1
        return self._stat[0] >= pages


def _io_mode(fd: int) -> str:
    """Where this file's I/O runs: INLINE, NOWAIT or POOL (see the module's doc)."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
        return POOL
    if _file_system_type(fd) in _MEMORY_FILE_SYSTEMS:
        return INLINE
    if not hasattr(os, "RWF_NOWAIT"):
        return POOL
    # Asked at the end of the file: the flag is refused before any read, and a read at offset
    # 0 would start readahead, caching pages QEMU never reads (an unwritten extent with
    # cached pages is data to SEEK_DATA: the qsd differential saw it after a ZERO_RANGE).
    try:
        os.preadv(fd, (bytearray(1),), os.lseek(fd, 0, os.SEEK_END), os.RWF_NOWAIT)
    except BlockingIOError:
        pass
    except OSError as e:
        if e.errno in (_errno.EOPNOTSUPP, _errno.EINVAL):
            return BLIND  # overlayfs (Docker's root) has no FMODE_NOWAIT
        raise
    return NOWAIT


def _file_system_type(fd: int) -> int | None:
    """fstatfs(2)'s f_type (os.statvfs has no such field); None if it cannot be asked."""
    try:
        buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
        if _libc.fstatfs(fd, buffer) != 0:
            return None
        return struct.unpack_from("l", buffer)[0]  # f_type: the first field, a long
    except (OSError, AttributeError):
        return None
