"""The FUSE layer: a directory with the image file and `control`, each op handed on.

Thin on purpose: reads, writes, fsyncs, fallocates (discard, write-zeroes) and lseeks
(SEEK_DATA/SEEK_HOLE: block status) of the image go to block.BlockDevice, each with its
caller; writes to `control` go to control.Control as one unit each; reading `control` serves a
snapshot of the status (or, on a handle that wrote a command, that command's answer or error).

A `control` answer is read from its beginning by the first read after the write, whatever
the file offset: the write advanced the offset, so a plain `read()` after `write()` would
otherwise start inside the answer (or past its end). That first read anchors the answer at its
offset; later reads continue from there, and a read below the anchor (`pread(fd, n, 0)`, what
blkfuse's own CLI does) starts it again from the beginning.

`control` gets a fresh inode for every lookup (entry_timeout 0), so every open of it is its own
inode: the kernel serializes writes per inode, and a `wait_break` blocked in one write must not
hold back a `resume` or `status json` written by someone else.

pyfuse3 is built with blkfuse's patch (scripts/pyfuse3/README.md): write sees the flags of each
write (O_DSYNC/O_SYNC there make it a FUA write, as on a handle opened O_DSYNC), every I/O
handler sees its caller, and a request whose caller got a signal (FUSE_INTERRUPT) is cancelled:
trio.Cancelled reaches whatever it awaits. In blkfuse only a hold waits (a breakpoint, a
`wait_break`, the flush lock behind a held flush), so an interrupted request held there ends
with EINTR and its tag is released; one already past its hold reaches no checkpoint but the
backing file's fsync, which is shielded, and finishes normally.

Every open gets direct_io. One kernel limit shows with breakpoints: FUSE takes the inode lock
for a direct_io write (and for fsync) unless the server grants FOPEN_PARALLEL_DIRECT_WRITES,
which libfuse 3.14 / pyfuse3 3.5 cannot. So while a *write* is suspended, other writes and
fsyncs of the image wait in the kernel; reads, the control file and everything else flow.
A suspended fsync holds the lock the same way; while a read is suspended, everything flows.

Permissions are the kernel's (the mount uses `default_permissions`): the image file shows the
backing file's owner, group and mode, read at every getattr like its size, so the mount grants
no one more than the backing file does (with `--allow-other` too); a read-only mount shows it
without write bits and fails every write with EROFS. `control` belongs to the mounting user,
mode 0644: anyone the mount lets in may read the status, only that user and root may write
commands (checked here as well, in case the kernel's check is ever off).

The image has a fixed size, like a disk (and like qemu-storage-daemon's FUSE export with
growable off): a write that crosses the end writes what fits (a short write), a write at or
past the end fails with ENOSPC (as a block device answers; qsd 7.2 answers EIO), and truncate to
another size fails with EPERM (qsd 7.2 lets truncate resize: a disk does not). `growable`
allows both, as before.
"""

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
)

from blkfuse.block.device import BlockDevice, fallocate_size
from blkfuse.block.image import Bytes
from blkfuse.daemon.callers import Caller
from blkfuse.daemon.control import Control, ControlError
from blkfuse.daemon.trace import Stream
from blkfuse.layout import CONTROL_NAME, image_name_problem

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
IMAGE = ROOT + 1
CONTROL = ROOT + 2
# Every lookup of `control` answers a new inode number from here on (see Operations.lookup).
FIRST_FRESH_CONTROL = 16

# Names never change, so the kernel may cache lookups; the image's attributes are live.
ENTRY_TIMEOUT = 300
# What blkfuse needs from pyfuse3 beyond upstream 3.5.0: scripts/pyfuse3's patches.
PYFUSE3_FEATURES = (
    "fallocate",
    "lseek",
    "enable_io_context",
    "enable_interrupts",
    "enable_nowait_io",
)


def missing_pyfuse3_features() -> list[str]:
    """The patches' additions this pyfuse3 lacks (empty: it is the patched build)."""
    missing = [name for name in PYFUSE3_FEATURES if not hasattr(pyfuse3.Operations, name)]
    if not hasattr(pyfuse3._pyfuse3, "resume"):  # 0002: the request loop's hand-off
        missing.append("main(handoff=)")
    if not hasattr(pyfuse3, "reply_later"):  # 0004: nowait handlers answer later
        missing.append("reply_later")
    return missing


# The kernel passes O_SYNC as __O_SYNC|O_DSYNC, so testing O_DSYNC catches both.
_WRITETHROUGH_FLAGS = os.O_DSYNC | getattr(os, "O_SYNC", 0)


def _caller(ctx: RequestContext) -> Caller:
    return Caller(ctx.pid, ctx.uid, ctx.gid)


class _Handle:
    __slots__ = ("inode", "writethrough", "answer", "anchor")

    def __init__(self, inode: int, writethrough: bool = False):
        self.inode = inode
        self.writethrough = writethrough
        # control: bytes served by read(); None = status at first read
        self.answer: bytes | Stream | None = None
        self.anchor: int | None = None  # control: the file offset where `answer` starts

    def set_answer(self, answer: bytes | Stream | None) -> None:
        self.answer = answer
        self.anchor = None

    def answer_at(self, offset: int, size: int) -> bytes:
        """`size` bytes of the answer for a read at file `offset` (see the module docstring)."""
        if self.anchor is None or offset < self.anchor:
            self.anchor = offset
        start = offset - self.anchor
        answer = self.answer if isinstance(self.answer, bytes) else b""
        return answer[start : start + size]


_P = ParamSpec("_P")
_R = TypeVar("_R")


# The last errno the kernel defines (EHWPOISON, asm-generic/errno.h). A rule may inject any
# errno up to 511 (a FUSE reply's limit), but libfuses differ on one past this: 3.14 hands
# it to the caller, 3.17 replies ERANGE ("bad error value"). blkfuse answers EIO for those
# itself, so every libfuse answers the same (a deliberate difference: docs/design.md).
KERNEL_LAST_ERRNO = 133


def reply_errno(number: int | None) -> int:
    """The errno a FUSE reply carries for a failure with `number`."""
    if not number or number > KERNEL_LAST_ERRNO:
        return errno.EIO
    return number


def _fuse_error(e: Exception, name: str) -> pyfuse3.FUSEError:
    """What a handler's failure answers: an OSError's errno (reply_errno), else EIO (logged:
    a bug)."""
    if isinstance(e, OSError):
        return pyfuse3.FUSEError(reply_errno(e.errno))
    log.exception("%s failed", name)
    return pyfuse3.FUSEError(errno.EIO)


def _guard(
    fn: Callable[Concatenate["Operations", _P], Awaitable[_R]],
) -> Callable[Concatenate["Operations", _P], Coroutine[Any, Any, _R]]:
    """Turn any failure into a FUSE errno: pyfuse3 ends the whole main loop on an exception.
    Also counts the requests in flight, which shutdown waits for (Operations.wait_settled)."""

    async def wrapper(self: "Operations", /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self.inflight += 1
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise _fuse_error(e, fn.__name__) from None
        finally:
            self._request_done()

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class Operations(pyfuse3.Operations):
    """pyfuse3 operations for one mount.

    block: the image, through its BlockDevice; control: control.Control.
    owner_uid, owner_gid: the mounting user's, who owns the directory and `control` (and, with
    root, is the only one who may write commands).
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    enable_io_context = True  # the patch: write flags, the caller of read/write/fsync
    enable_interrupts = True  # the patch: FUSE_INTERRUPT cancels the handler
    enable_nowait_io = True  # the patch: the lean path answers in read_nowait/write_nowait

    def __init__(
        self,
        block: BlockDevice,
        control: Control,
        *,
        name: str,
        read_only: bool = False,
        owner_uid: int | None = None,
        owner_gid: int | None = None,
        growable: bool = False,
    ):
        super().__init__()
        problem = image_name_problem(name)
        if problem:
            raise ValueError(f"invalid image name {name!r}: {problem}")
        self.block = block
        self.control = control
        self.name = name
        self.name_b = os.fsencode(name)
        self.read_only = read_only
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.owner_gid = os.getgid() if owner_gid is None else owner_gid
        self.growable = growable
        self.refusing = 0  # an errno: a forced shutdown fails every new image request
        self._handles: dict[int, _Handle] = {}
        self.inflight = 0  # requests being served (suspended ones included)
        self._settled: trio.Event | None = None  # set for wait_settled(), if one waits
        self._next_fh = 1
        now = time.time_ns()
        self._mtime = {ROOT: now, IMAGE: now, CONTROL: now}
        self._next_control_inode = FIRST_FRESH_CONTROL

    def _request_done(self) -> None:
        """One request in flight less (_guard, read, write); the last wakes wait_settled."""
        self.inflight -= 1
        if not self.inflight:
            self._wake_settled_waiter()

    def refuse(self, error: int) -> None:
        """From now on, every new request on the image fails with `error` (forced shutdown)."""
        if not self.refusing:
            self.block.lean_off()  # every request now meets the refusal in read/write
        self.refusing = error
        self._wake_settled_waiter()  # open files no longer count

    def settled(self) -> bool:
        """Nothing left to wait for at shutdown: no request in flight and no file open (after
        a forced shutdown, open files do not count)."""
        return not self.inflight and (bool(self.refusing) or not self._handles)

    async def wait_settled(self) -> None:
        """Return once settled(): woken by the last request ending or file closing, no polling.
        One waiter at a time (the daemon's shutdown)."""
        while not self.settled():
            self._settled = trio.Event()
            await self._settled.wait()

    def _wake_settled_waiter(self) -> None:
        # On the request path: one attribute test unless shutdown is waiting.
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    # -- attributes ---------------------------------------------------------------------------

    @staticmethod
    def _is_control(inode: InodeT) -> bool:
        return inode == CONTROL or inode >= FIRST_FRESH_CONTROL

    def _attr(self, inode: InodeT) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.st_uid = self.owner_uid
        a.st_gid = self.owner_gid
        a.st_blksize = 4096
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.attr_timeout = ENTRY_TIMEOUT
        elif inode == IMAGE:
            # The backing file's owner, group, mode and size, live; the kernel checks them.
            backing = self.block.stat()
            mode = stat.S_IMODE(backing.st_mode)
            if self.read_only:
                mode &= ~0o222
            a.st_mode = stat.S_IFREG | mode
            a.st_uid = backing.st_uid
            a.st_gid = backing.st_gid
            a.st_nlink = 1
            # a block device's stat says 0; live: a resize from outside shows here, and from
            # then on to reads and writes too
            a.st_size = self.block.size(live=True)
            a.st_blocks = (a.st_size + 511) // 512
            a.attr_timeout = 0
        elif self._is_control(inode):
            a.st_mode = stat.S_IFREG | 0o644  # the mounting user's: others may only read
            a.st_nlink = 1
            a.st_size = 0  # generated on read; direct_io reads to EOF
            a.attr_timeout = 0
            a.entry_timeout = 0  # look it up again at every open
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        t = self._mtime[CONTROL if self._is_control(inode) else inode]
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        return a

    def _may_write_control(self, ctx: RequestContext) -> bool:
        return ctx.uid == 0 or ctx.uid == self.owner_uid

    @_guard
    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None) -> EntryAttributes:
        return self._attr(inode)

    @_guard
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext | None = None
    ) -> EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(ROOT)
        if name == self.name_b:
            return self._attr(IMAGE)
        if name == CONTROL_NAME.encode():
            inode = self._next_control_inode
            self._next_control_inode += 1
            return self._attr(inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_guard
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        if inode == IMAGE:
            if fields.update_size:
                if self.read_only:
                    raise pyfuse3.FUSEError(errno.EROFS)
                if self.refusing:
                    raise pyfuse3.FUSEError(self.refusing)
                if not self.growable and attr.st_size != self.block.size():
                    raise pyfuse3.FUSEError(errno.EPERM)  # a disk's size is fixed
                self.block.truncate(attr.st_size)
                self._mtime[IMAGE] = time.time_ns()
        elif self._is_control(inode):
            # `echo cmd > control` opens with O_TRUNC: a size change is accepted and ignored.
            if fields.update_size and not self._may_write_control(ctx):
                raise pyfuse3.FUSEError(errno.EACCES)
        # mode, owner and times are the backing file's or fixed; a change is accepted, ignored
        return self._attr(inode)

    # No access(): with default_permissions the kernel answers access(2) from the modes.

    @_guard
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        s = StatvfsData()
        size = self.block.size()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        try:
            v = self.block.statvfs()
            s.f_bfree = v.f_bfree * v.f_frsize // 4096
            s.f_bavail = v.f_bavail * v.f_frsize // 4096
        except OSError:
            pass
        s.f_files = 3
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directory ----------------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    @_guard
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        entries = ((self.name_b, IMAGE), (CONTROL_NAME.encode(), CONTROL))
        for i, (name, inode) in enumerate(entries, 1):
            if i <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), i):
                break

    async def releasedir(self, fh: FileHandleT) -> None:
        pass

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        pass  # inodes hold no state here

    # -- files --------------------------------------------------------------------------------

    @_guard
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        if inode == IMAGE:
            if writing and self.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            if self.refusing:
                raise pyfuse3.FUSEError(self.refusing)
            handle = _Handle(IMAGE, writethrough=bool(flags & _WRITETHROUGH_FLAGS))
        elif self._is_control(inode):
            if writing and not self._may_write_control(ctx):
                raise pyfuse3.FUSEError(errno.EACCES)
            handle = _Handle(CONTROL)
        elif inode == ROOT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        # direct_io: every read and write reaches us (no page cache), O_DIRECT opens work,
        # and the control file is generated fresh.
        return FileInfo(fh=fh, direct_io=True)

    def _handle(self, fh: FileHandleT) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    # The lean path (docs/benchmarks.md): an image request that nothing can see (no rule,
    # breakpoint, trace, watcher or log: BlockDevice.read_now and write_now ask the engine) is
    # answered in read_nowait/write_nowait, which pyfuse3 calls as it hands the request over
    # (the patch's enable_nowait_io): no coroutine, no RequestContext, no interrupt
    # registration, no caller, and no count in `inflight` (no other task runs meanwhile).
    # None: pyfuse3 passes the request on to read/write, the full path. A refusal (a forced
    # shutdown) and a power cut turn the lean path off (lean_off), so they are met there.

    def read_nowait(
        self, fh: FileHandleT, off: int, size: int
    ) -> bytes | bytearray | memoryview | pyfuse3.PendingReply | None:
        h = self._handles.get(fh)
        if h is None or h.inode != IMAGE or not self.block.lean_reads:
            return None
        try:
            data = self.block.read_now(off, size)
        except Exception as e:
            raise _fuse_error(e, "read") from None
        if data is None:
            return self._read_later(off, size)
        return data

    def _read_later(self, off: int, size: int) -> bytes | bytearray | pyfuse3.PendingReply | None:
        """read_nowait after a page-cache miss: start the read here and answer when it ends,
        with no task (read() would await it in one: pyfuse3's coroutine, a hand-off and a
        wake-up); None if the full path must take it."""
        reply = pyfuse3.reply_later()
        self.inflight += 1
        try:
            started = self.block.read_later(off, size, lambda got: self._answer_read(reply, got))
        except Exception as e:
            self._request_done()
            raise _fuse_error(e, "read") from None
        if started is True:
            return reply
        self._request_done()
        return None if started is False else started  # read() takes it; or the data now

    def _answer_read(self, reply: pyfuse3.PendingReply, got: bytes | bytearray | Exception) -> None:
        """A read_later() ends (from the ring's reaper task: must not raise)."""
        try:
            if isinstance(got, Exception):
                reply.error(_fuse_error(got, "read").errno)
            else:
                reply.data(got)
        except RuntimeError as e:  # the session ended first (a forced unmount): nobody waits
            log.debug("read answered after the session ended: %s", e)
        finally:
            self._request_done()

    def write_nowait(self, fh: FileHandleT, off: int, buf: Bytes, flags: int) -> int | None:
        # buf: libfuse's buffer, lent for this call (patch 0005): written now or not at all
        h = self._handles.get(fh)
        if h is None or h.inode != IMAGE:
            return None
        block = self.block
        if (
            not block.lean_writes
            or h.writethrough
            or flags & _WRITETHROUGH_FLAGS  # FUA: pwritev2(RWF_DSYNC/RWF_SYNC)
            or self.read_only
        ):
            return None
        try:
            n = block.write_now(off, buf, grow=self.growable)
        except Exception as e:
            raise _fuse_error(e, "write") from None
        if n is not None:
            self._mtime[IMAGE] = time.time_ns()
        return n

    # The full path, with _guard's work written out (one coroutine per request, not two).

    async def read(
        self, fh: FileHandleT, off: int, size: int, ctx: RequestContext
    ) -> bytes | bytearray:
        h = self._handles.get(fh)
        if h is None or h.inode != IMAGE:
            return await self._read_control(fh, off, size)
        self.inflight += 1  # _guard, written out
        try:
            if self.refusing:
                raise pyfuse3.FUSEError(self.refusing)
            block = self.block
            if block.lean_reads:  # read_nowait could not answer: the image must wait
                data = await block.read_unseen(off, size)
                if data is not None:
                    return data
            # short at the end of the image
            return await block.read(off, size, caller=_caller(ctx))
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise _fuse_error(e, "read") from None
        finally:
            self._request_done()

    @_guard
    async def _read_control(self, fh: FileHandleT, off: int, size: int) -> bytes | bytearray:
        h = self._handle(fh)
        if h.answer is None:
            h.set_answer(self.control.status_text().encode())
        elif not isinstance(h.answer, bytes):  # after `trace`: a trace.Stream
            return await h.answer.read(size)
        return h.answer_at(off, size)

    async def write(
        self, fh: FileHandleT, off: int, buf: bytes, flags: int, ctx: RequestContext
    ) -> int:
        h = self._handles.get(fh)
        if h is None or h.inode != IMAGE:
            return await self._write_control(fh, buf)
        block = self.block
        # O_DSYNC in this write's flags: pwritev2(RWF_DSYNC/RWF_SYNC), or the handle's.
        fua = h.writethrough or bool(flags & _WRITETHROUGH_FLAGS)
        self.inflight += 1  # _guard, written out
        try:
            if self.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            if self.refusing:
                raise pyfuse3.FUSEError(self.refusing)
            if not self.growable:
                room = block.size() - off
                if room <= 0:
                    raise pyfuse3.FUSEError(errno.ENOSPC)  # a disk's end, as a block device
                if room < len(buf):
                    buf = buf[:room]  # a short write: what fits
            n = await block.write(off, bytes(buf), writethrough=fua, caller=_caller(ctx))
            self._mtime[IMAGE] = time.time_ns()
            return n
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise _fuse_error(e, "write") from None
        finally:
            self._request_done()

    @_guard
    async def _write_control(self, fh: FileHandleT, buf: bytes) -> int:
        h = self._handle(fh)
        # control: each write() is one unit of commands, whatever its offset
        try:
            text = bytes(buf).decode()
        except UnicodeDecodeError:
            h.set_answer(b"error: the command is not UTF-8\n")
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        try:
            answer = await self.control.execute(text)
        except ControlError as e:
            h.set_answer(f"error: {e.message}\n".encode())
            raise pyfuse3.FUSEError(e.errno) from None
        if isinstance(answer, str):
            h.set_answer(answer.encode() if answer else None)
        else:
            h.answer = answer  # trace.Stream
        return len(buf)

    @_guard
    async def fsync(self, fh: FileHandleT, datasync: bool, ctx: RequestContext) -> None:
        h = self._handle(fh)
        if h.inode == IMAGE:
            if self.refusing:
                raise pyfuse3.FUSEError(self.refusing)
            await self.block.flush(caller=_caller(ctx))

    @_guard
    async def fallocate(  # the patched pyfuse3's handler
        self, fh: FileHandleT, mode: int, offset: int, length: int, ctx: RequestContext
    ) -> None:
        """fallocate(2) on the image: BlockDevice.fallocate maps the modes as QEMU 7.2's FUSE
        export does (discard, write-zeroes, growing). Here only what the mount decides: the
        image's size is fixed unless -o growable=on, so a fallocate that would grow it fails
        with ENOSPC, as a write at the end does (QEMU's export grows it regardless); on a
        handle opened O_DSYNC a write-zeroes is FUA."""
        h = self._handle(fh)
        if h.inode != IMAGE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # never ENOSYS: that is for good
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.refusing:
            raise pyfuse3.FUSEError(self.refusing)
        size = self.block.size()
        if not self.growable and fallocate_size(mode, offset, length, size) > size:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # a disk's size is fixed
        await self.block.fallocate(
            mode, offset, length, writethrough=h.writethrough, caller=_caller(ctx)
        )
        self._mtime[IMAGE] = time.time_ns()

    @_guard
    async def lseek(  # the patched pyfuse3's handler
        self, fh: FileHandleT, offset: int, whence: int, ctx: RequestContext
    ) -> int:
        """SEEK_DATA/SEEK_HOLE (the kernel answers the other whences itself): a block-status
        query of the image, as QEMU 7.2's FUSE export (fuse_lseek) asks it."""
        h = self._handle(fh)
        if h.inode != IMAGE:
            raise pyfuse3.FUSEError(errno.ENXIO)  # control's size is 0
        if self.refusing:
            raise pyfuse3.FUSEError(self.refusing)
        return await self.block.seek(offset, whence, caller=_caller(ctx))

    async def flush(self, fh: FileHandleT) -> None:
        # close(): nothing to do; QEMU does not flush on close either
        pass

    async def release(self, fh: FileHandleT) -> None:
        h = self._handles.pop(fh, None)
        if h is not None and h.answer is not None and not isinstance(h.answer, bytes):
            h.answer.close()  # a trace reader went away
        if not self._handles:
            self._wake_settled_waiter()

    # -- everything else: the directory is fixed ------------------------------------------------

    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)
