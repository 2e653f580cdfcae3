"""A tiny pyfuse3 filesystem for tests/mount/test_pyfuse3_patch.py (run as a script, one per mount).

    python pyfuse3_patch_fs.py MOUNTPOINT LOG [--plain] [--locked]

One file, `file` (1 MiB of zeros, direct_io). Every read, write, fsync, fallocate and lseek is
logged to LOG as one JSON line with the arguments the handler got. Behaviours a test can ask
for: a read at offset 4096 blocks until interrupted (`sleep_forever`); a read at offset 8192
waits until a write at 8192 opens the gate (then answers what it wrote); lseek answers
offset + 1000 for SEEK_DATA and 777 for SEEK_HOLE. `--plain`: an Operations subclass that opts
in to nothing and defines no fallocate or lseek (the upstream behaviour). `--locked`:
pyfuse3's locked request loop (`main(handoff=False)`) instead of the patch's hand-off.
`--nowait`: also `enable_nowait_io` (patch 0003): read_nowait/write_nowait answer requests at
NOWAIT_OFFSET and beyond themselves (logged as read-nowait/write-nowait), fail one at
NOWAIT_ERRNO_OFFSET with EXDEV, raise RuntimeError at NOWAIT_CRASH_OFFSET, and pass every
other request on to read/write (logged as read-passed/write-passed, then as usual).
`--later`: as `--nowait`, and the nowait handlers answer later (patch 0004,
`pyfuse3.reply_later()`) from LATER_OFFSET on: requests are held until a read at
LATER_GO_OFFSET (a read: FUSE serialises the writes to a file), then answered in the reverse order of their arrival, from a trio task (logged
as read-answered/write-answered); at LATER_ERRNO_OFFSET the answer is EXDEV at once, at
LATER_DROP_OFFSET the PendingReply is dropped unanswered, and at LATER_WITHDRAWN_OFFSET
the handler takes one and then returns None. What the PendingReply says to a second answer,
an answer of the wrong kind or one after withdrawal is logged (op "refused").
"""

import errno
import json
import os
import stat
import sys

import pyfuse3
import trio

FILE = pyfuse3.ROOT_INODE + 1
SIZE = 1 << 20
BLOCKING_OFFSET = 4096
GATE_OFFSET = 8192
NOWAIT_OFFSET = 65536
NOWAIT_ERRNO_OFFSET = 2 * NOWAIT_OFFSET
NOWAIT_CRASH_OFFSET = 3 * NOWAIT_OFFSET
LATER_OFFSET = 4 * NOWAIT_OFFSET
LATER_ERRNO_OFFSET = 5 * NOWAIT_OFFSET
LATER_DROP_OFFSET = 6 * NOWAIT_OFFSET
LATER_WITHDRAWN_OFFSET = 7 * NOWAIT_OFFSET
LATER_GO_OFFSET = 8 * NOWAIT_OFFSET


class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **record) -> None:
        self.f.write(json.dumps(record) + "\n")


def _ctx(ctx) -> dict:
    return {"pid": ctx.pid, "uid": ctx.uid, "gid": ctx.gid}


class Plain(pyfuse3.Operations):
    def __init__(self, log: Log):
        super().__init__()
        self.log = log
        self.data = bytearray(SIZE)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
        else:
            a.st_mode = stat.S_IFREG | 0o666
            a.st_size = len(self.data)
        a.st_nlink = 1
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if name != b"file":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"file", self._attr(FILE), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        self.log(op="read", off=off, size=size)
        return bytes(self.data[off : off + size])

    async def write(self, fh, off, buf):
        self.log(op="write", off=off, size=len(buf))
        self.data[off : off + len(buf)] = buf
        return len(buf)

    async def fsync(self, fh, datasync):
        self.log(op="fsync", datasync=datasync)

    async def release(self, fh):
        pass


class Patched(Plain):
    enable_io_context = True
    enable_interrupts = True

    def __init__(self, log: Log):
        super().__init__(log)
        self.gate = trio.Event()

    async def read(self, fh, off, size, ctx):
        self.log(op="read", off=off, size=size, ctx=_ctx(ctx))
        if off == BLOCKING_OFFSET:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.log(op="read-cancelled", off=off)
                raise
        if off == GATE_OFFSET:
            await self.gate.wait()
        return bytes(self.data[off : off + size])

    async def write(self, fh, off, buf, flags, ctx):
        self.log(
            op="write", off=off, size=len(buf), flags=flags, ctx=_ctx(ctx), buf=type(buf).__name__
        )
        self.data[off : off + len(buf)] = buf
        if off == GATE_OFFSET:
            self.gate.set()
        return len(buf)

    async def fsync(self, fh, datasync, ctx):
        self.log(op="fsync", datasync=datasync, ctx=_ctx(ctx))

    async def fallocate(self, fh, mode, offset, length, ctx):
        self.log(op="fallocate", mode=mode, offset=offset, length=length, ctx=_ctx(ctx))
        if mode == 0x10:  # FALLOC_FL_ZERO_RANGE: refused, to see an errno
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    async def lseek(self, fh, offset, whence, ctx):
        self.log(op="lseek", offset=offset, whence=whence, ctx=_ctx(ctx))
        return offset + 1000 if whence == os.SEEK_DATA else 777


def _released(view) -> bool:
    try:
        len(view)
    except ValueError:  # "operation forbidden on released memoryview object"
        return True
    return False


class Nowait(Patched):
    enable_nowait_io = True
    lent = None  # the buffer the last write_nowait got: lent for that call only (0005)

    def _nowait(self, op: str, off: int, size: int, flags: int | None = None, **more) -> bool:
        """Whether the nowait handler answers (raising for the two special offsets)."""
        if off == NOWAIT_ERRNO_OFFSET:
            raise pyfuse3.FUSEError(errno.EXDEV)
        if off == NOWAIT_CRASH_OFFSET:
            raise RuntimeError("the nowait handler failed")
        answers = off >= NOWAIT_OFFSET
        record = {"op": f"{op}-nowait" if answers else f"{op}-passed", "off": off, "size": size}
        if flags is not None:
            record["flags"] = flags
        self.log(**record, **more)
        return answers

    def read_nowait(self, fh, off, size):
        if not self._nowait("read", off, size):
            return None
        return bytes(self.data[off : off + size])

    def write_nowait(self, fh, off, buf, flags):
        earlier, self.lent = self.lent, buf
        lent = {"buf": type(buf).__name__, "readonly": memoryview(buf).readonly}
        if earlier is not None:
            lent["earlier_released"] = _released(earlier)
        if not self._nowait("write", off, len(buf), flags, **lent):
            return None
        self.data[off : off + len(buf)] = buf
        return len(buf)


class Later(Nowait):
    def __init__(self, log: Log):
        super().__init__(log)
        self.held: list[tuple[str, pyfuse3.PendingReply, int, bytes | None]] = []
        self.nursery: trio.Nursery | None = None

    def _refused(self, attempt: str, call) -> None:
        try:
            call()
        except (RuntimeError, TypeError) as e:
            self.log(op="refused", attempt=attempt, error=f"{type(e).__name__}: {e}")
        else:
            self.log(op="not-refused", attempt=attempt)

    def _later(self, op: str, off: int, data: bytes | None):
        """The nowait handlers' answer from LATER_OFFSET on; None below it (as Nowait), and
        False where the request is to be passed on after all."""
        if off < LATER_OFFSET:
            return None
        if off == LATER_GO_OFFSET:
            self.log(op="go", held=len(self.held))
            self.nursery.start_soon(self._answer, self.held[::-1])
            self.held = []
            return None if op == "write" else bytes(self.data[off : off + 512])
        reply = pyfuse3.reply_later()
        assert pyfuse3.reply_later() is reply  # the same one, asked twice
        self.log(op=f"{op}-later", off=off)
        if off == LATER_DROP_OFFSET:
            return reply  # dropped unanswered: the kernel gets EIO
        if off == LATER_WITHDRAWN_OFFSET:
            self.withdrawn = reply
            return False
        if off == LATER_ERRNO_OFFSET:
            self.nursery.start_soon(self._answer, [(op, reply, off, data)])
        else:
            self.held.append((op, reply, off, data))
        return reply

    def read_nowait(self, fh, off, size):
        later = self._later("read", off, None)
        if later is False:
            self.log(op="read-passed", off=off, size=size)
            return None
        return later if later is not None else super().read_nowait(fh, off, size)

    def write_nowait(self, fh, off, buf, flags):
        later = self._later("write", off, bytes(buf))  # buf is lent for this call only
        if later is False:
            self.log(op="write-passed", off=off, size=len(buf), flags=flags)
            return None
        return later if later is not None else super().write_nowait(fh, off, buf, flags)

    async def read(self, fh, off, size, ctx):
        if off == LATER_WITHDRAWN_OFFSET:
            self._refused("withdrawn", lambda: self.withdrawn.data(b"w"))
            self._refused("outside", pyfuse3.reply_later)
        return await super().read(fh, off, size, ctx)

    async def _answer(self, answers) -> None:
        """Answer from a task of its own, as a completion would (never inside a handler)."""
        await trio.lowlevel.checkpoint()
        for op, reply, off, data in answers:
            self.log(op=f"{op}-answered", off=off)
            if off == LATER_ERRNO_OFFSET:
                reply.error(errno.EXDEV)
            elif op == "read":
                self._refused("wrong-kind", lambda reply=reply: reply.written(1))
                reply.data(bytes(self.data[off : off + 512]))
            else:
                self.data[off : off + len(data)] = data
                reply.written(len(data))
            self._refused("twice", lambda reply=reply: reply.error(errno.EIO))


def main() -> None:
    mountpoint, log_path = sys.argv[1], sys.argv[2]
    flags = sys.argv[3:]
    if "--plain" in flags:
        kind = Plain
    elif "--later" in flags:
        kind = Later
    elif "--nowait" in flags:
        kind = Nowait
    else:
        kind = Patched
    ops = kind(Log(log_path))
    options = set(pyfuse3.default_options) | {"fsname=pyfuse3test"}
    pyfuse3.init(ops, mountpoint, options)
    print("ready", flush=True)
    handoff = "--locked" not in sys.argv[3:]

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            if isinstance(ops, Later):
                ops.nursery = nursery
            await pyfuse3.main(handoff=handoff)
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
