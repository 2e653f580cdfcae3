"""Replay QEMU 7.2's recorded blkdebug scenarios (tests/data/oracle/*.json) against blkfuse.

A case is a blkdebug config plus qemu-io commands and, per command, what QEMU answered
(see tests/data/oracle/README.md). This module turns the commands into blkfuse operations
on one of two targets and returns, per command, an outcome in the case's vocabulary
("ok", "EIO", "ERRNO_200", "MISCOMPARE", "NOT_RUN") plus the image bytes afterwards:

  block  support.device.build_device(path, Engine(rules), settings=...) in trio.run
  mount  a real mount (blkfuse.Mount): the image file opened O_DIRECT (plus O_DSYNC for
         writethrough), os.preadv/os.pwritev/os.fsync, break commands through `control`

qemu-io -> blkfuse translation:
  read [-P B] OFF LEN     read; with -P every byte must be B, else MISCOMPARE
  write [-P B] [-f] OFF LEN   write of B (default 0xcd); -f (FUA) and cache=writethrough/
                          directsync: a writethrough write (mount: RWF_DSYNC / O_DSYNC)
  write -z [-u] OFF LEN   write-zeroes (mount: fallocate ZERO_RANGE; -u only lets the file
                          punch a hole, which no rule can tell apart)
  discard OFF LEN         discard (mount: fallocate PUNCH_HOLE|KEEP_SIZE)
  alloc OFF [LEN], map    block-status queries (mount: lseek SEEK_DATA, as QEMU's FUSE export
                          answers it)
  flush                   flush / fsync
  aio_read, aio_write     the same, started concurrently and left running (see below)
  aio_flush               waits for every started aio request (it does not flush)
  break E T, resume T, remove_break T, wait_break T   engine calls / control-file lines
  cache (-t)              -o cache=MODE; layer "direct" (--image-opts driver=blkdebug) is
                          -o format=none

aio ordering. qemu-io runs an aio request synchronously until it yields: at a breakpoint,
or in the thread pool doing the file I/O, and then completes it at `aio_flush`, so its
`pwritev_done` fires during `aio_flush`. We can faithfully express "started, runs until it
is suspended at a breakpoint or done": after starting an aio request (and after `resume`)
the replay waits until every started request is either finished or suspended. A request
that is not suspended therefore fires `pwritev_done` before the next command instead of
during `aio_flush`. That is only observable when a command between `aio_write` and
`aio_flush` depends on a `pwritev_done` rule; no case does that, and generated scenarios
use no aio commands.
"""

import errno as _errno
import json
import mmap
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import blkfuse

DATA_DIR = Path(__file__).parent / "data" / "oracle"
HANG_GUARD = 30.0  # seconds before a request that never finishes is reported as a hang

DEFAULT_WRITE_PATTERN = 0xCD  # qemu-io's write without -P


# ---- cases ---------------------------------------------------------------------------


# QEMU versions whose answers are recorded: 7.2's are the cases themselves, every other
# version's are beside them in qemu-VERSION/ (scripts/oracle-record re-records them).
QEMU_VERSIONS = ("7.2", "10.0")


def case_names() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def load_case(name: str, qemu: str = "7.2") -> dict:
    """A case with QEMU `qemu`'s recorded answers; replayed under that profile."""
    where = DATA_DIR if qemu == "7.2" else DATA_DIR / f"qemu-{qemu}"
    with open(where / f"{name}.json") as f:
        case = json.load(f)
    case["name"] = name
    case["qemu"] = qemu
    return case


def errname(number: int) -> str:
    """errno number -> the case files' name: "EIO", or "ERRNO_200" when unnamed."""
    return _errno.errorcode.get(number, f"ERRNO_{number}")


def c_int(text: str) -> int:
    """A number as C's strtol(..., 0) reads it (qemu-io patterns): 0x.. hex, 0.. octal."""
    t = text.lower()
    sign = -1 if t.startswith("-") else 1
    t = t.lstrip("+-")
    if t.startswith("0x"):
        return sign * int(t[2:], 16)
    if len(t) > 1 and t.startswith("0"):
        return sign * int(t[1:], 8)
    return sign * int(t)


def image_from_runs(size: int, runs) -> bytes:
    data = bytearray(size)
    for offset, length, byte in runs or ():
        data[offset : offset + length] = bytes([byte]) * length
    return bytes(data)


def runs_of(data: bytes) -> list[list[int]]:
    """Run-length form [[offset, length, byte], ...], as the cases' final_image."""
    runs = []
    start = 0
    for i in range(1, len(data) + 1):
        if i == len(data) or data[i] != data[start]:
            runs.append([start, i - start, data[start]])
            start = i
    return runs


def image_diff(expected: bytes, got: bytes) -> str:
    if len(expected) != len(got):
        return f"size {len(got)}, expected {len(expected)}"
    first = next(i for i in range(len(got)) if got[i] != expected[i])
    last = max(i for i in range(len(got)) if got[i] != expected[i])
    return (
        f"bytes differ in [{first}, {last}]: got runs {runs_of(got[first : last + 1])[:4]} "
        f"expected runs {runs_of(expected[first : last + 1])[:4]} (relative to {first})"
    )


@dataclass
class Op:
    text: str
    cmd: str
    args: list = field(default_factory=list)
    pattern: int | None = None
    zero: bool = False
    unmap: bool = False
    fua: bool = False
    offset: int = 0
    length: int | None = None


IO_COMMANDS = {"read", "write", "aio_read", "aio_write", "readv", "writev", "discard", "alloc"}


def parse_op(text: str) -> Op:
    words = text.split()
    op = Op(text=text, cmd=words[0])
    if op.cmd not in IO_COMMANDS:
        op.args = words[1:]
        return op
    rest = []
    i = 1
    while i < len(words):
        w = words[i]
        if w == "-P":
            op.pattern = c_int(words[i + 1]) & 0xFF
            i += 2
            continue
        if w == "-z":
            op.zero = True
        elif w == "-u":
            op.unmap = True
        elif w == "-f":
            op.fua = True
        elif w.startswith("-"):
            raise ValueError(f"qemu-io flag {w} not supported by the replay: {text!r}")
        else:
            rest.append(w)
        i += 1
    op.offset = int(rest[0])
    op.length = int(rest[1]) if len(rest) > 1 else (512 if op.cmd == "alloc" else None)
    return op


# ---- where blkfuse deliberately differs -------------------------------------------------

# Deliberate differences (docs/design.md, "Deliberate differences"): blkfuse's documented behaviour replaces QEMU's.
# name -> (why, expect override, final image override as runs or "initial")
DELIBERATE = {
    "data_rmw_read_failure_ignored": (
        "QEMU 7.2 ignores a failed read-modify-write read and writes an uninitialised "
        "buffer; blkfuse fails the write with the read's errno and leaves the data as it was",
        ["EIO", "MISCOMPARE", "ok", "ok"],
        "initial",
    ),
    "errno_negative_skips_io": (
        "a negative errno makes QEMU skip the I/O and lose the write; in blkfuse it is a "
        "configuration error (nothing runs, the image is untouched)",
        ["NOT_RUN", "NOT_RUN", "NOT_RUN", "NOT_RUN"],
        "initial",
    ),
}


# Through a mount under qemu=10.0 a file's fallocate(PUNCH_HOLE) is what QEMU 10.0's FUSE
# export makes of it, a write-zeroes that may unmap (docs/design.md, "QEMU profiles"), not
# qemu-io's `discard`: where that changes a case's answers, the export's are asserted.
# (QEMU version, name) -> (why, expect override, final image override as runs or "initial")
MOUNT_EXPORT_DIFFERS = {
    ("10.0", "iotype_discard"): (
        "QEMU 10.0's FUSE export makes PUNCH_HOLE a write-zeroes: a discard rule does not "
        "see it, and the range is zeroed",
        ["ok", "ok", "ok", "ok"],
        "initial",
    )
}


@dataclass
class Expectation:
    ops: list  # Op
    expect: list  # per command
    image: bytes | None  # expected final image, or None: not compared
    note: str = ""


def expectation(case: dict, target: str = "block") -> Expectation:
    """What blkfuse must answer for `case` on `target` ("block" or "mount"): QEMU's answers
    except for the deliberate differences. Through a mount an errno the kernel does not
    define is EIO (blkfuse.daemon.fs.reply_errno; QEMU's own FUSE export answers as its
    libfuse does: 3.14 passes it on, 3.17 makes it ERANGE)."""
    name = case["name"]
    size = case["image_size"]
    initial = image_from_runs(size, case.get("image_init"))
    ops = [parse_op(text) for text in case["ops"]]
    expect = list(case["expect"])
    image = None
    if case.get("check_image", True) and "final_image" in case:
        image = image_from_runs(size, case["final_image"])
    note = ""
    if name in DELIBERATE:
        note, expect, final = DELIBERATE[name]
        expect = list(expect)
        image = initial if final == "initial" else image_from_runs(size, final)
    if target == "mount" and (case.get("qemu", "7.2"), name) in MOUNT_EXPORT_DIFFERS:
        note, expect, final = MOUNT_EXPORT_DIFFERS[(case.get("qemu", "7.2"), name)]
        expect = list(expect)
        image = initial if final == "initial" else image_from_runs(size, final)
    if target == "mount":
        from blkfuse.daemon.fs import KERNEL_LAST_ERRNO

        for i, want in enumerate(expect):
            if isinstance(want, str) and want.startswith("ERRNO_"):
                if int(want[6:]) > KERNEL_LAST_ERRNO:
                    expect[i] = "EIO"
                    note = note or "an errno the kernel does not define is EIO through a mount"
    return Expectation(ops, expect, image, note)


def make_image(path: Path, case: dict) -> None:
    path.write_bytes(image_from_runs(case["image_size"], case.get("image_init")))


def options_for(case: dict, config_path: Path) -> dict[str, str]:
    """Blockdev-style options as blkfuse takes them (`-o`): config, cache, format, align,
    blkdebug_opts."""
    options = {"config": str(config_path)}
    if case.get("cache", "writeback") != "writeback":
        options["cache"] = case["cache"]
    if case.get("layer", "raw") == "direct":
        options["format"] = "none"
    if "align" in case:
        options["align"] = str(case["align"])
    for key, value in case.get("blkdebug_opts", {}).items():
        options[key] = str(value)
    if case.get("qemu"):  # the profile whose answers the case holds (default 7.2)
        options["qemu"] = case["qemu"]
    return options


@dataclass
class Replay:
    outcomes: list  # per command: outcome string, or None (dropped)
    image: bytes
    config_error: str | None = None


def compare(case: dict, exp: Expectation, got: Replay) -> list[str]:
    """Human-readable disagreements (empty: blkfuse matches)."""
    problems = []
    for i, (op, want, have) in enumerate(zip(exp.ops, exp.expect, got.outcomes)):
        if want is None:
            continue
        if want != have:
            problems.append(f"op {i} {op.text!r}: expected {want}, got {have}")
    if exp.image is not None and exp.image != got.image:
        problems.append("final image: " + image_diff(exp.image, got.image))
    return problems


# ---- target: the block layer -----------------------------------------------------------------


def replay_block(case: dict, tmpdir: Path) -> Replay:
    import trio
    from support.device import build_device

    from blkfuse.engine.core import Engine
    from blkfuse.rules.config import ConfigError, load_rules, parse_options
    from blkfuse.rules.profiles import profile

    exp = expectation(case)
    image_path = tmpdir / "img.raw"
    config_path = tmpdir / "blkdebug.conf"
    make_image(image_path, case)
    config_path.write_text(case["config"])
    try:
        _, settings = parse_options(options_for(case, config_path))
        rules = load_rules(settings)
    except ConfigError as e:
        return Replay(["NOT_RUN"] * len(exp.ops), image_path.read_bytes(), str(e))
    engine = Engine(rules, profile=profile(settings.qemu))
    dev = build_device(image_path, engine, settings=settings)
    image = dev.stack.image
    outcomes = [None] * len(exp.ops)
    try:
        trio.run(_block_replay, case, exp.ops, engine, dev, outcomes)
    finally:
        image.close()
    return Replay(outcomes, image_path.read_bytes())


async def block_alloc(dev, offset: int, length: int) -> None:
    """qemu-io's `alloc OFF LEN`: bdrv_is_allocated (block status, want_zero off) until
    LEN is covered or the image ends. Raises OSError."""
    while length > 0:
        _, count = await dev.block_status(offset, length, want_zero=False)
        if not count:
            return
        offset += count
        length -= count


async def block_map(dev) -> None:
    """qemu-io's `map`: the same over the whole image."""
    await block_alloc(dev, 0, dev.size())


async def _block_io(dev, op: Op) -> str:
    try:
        if op.cmd in ("read", "aio_read"):
            data = await dev.read(op.offset, op.length)
            if len(data) != op.length:
                return f"SHORT_{len(data)}"
            if op.pattern is not None and data != bytes([op.pattern]) * op.length:
                return "MISCOMPARE"
        elif op.cmd in ("write", "aio_write") and op.zero:
            await dev.write_zeroes(op.offset, op.length, unmap=op.unmap, writethrough=op.fua)
        elif op.cmd in ("write", "aio_write"):
            pattern = DEFAULT_WRITE_PATTERN if op.pattern is None else op.pattern
            await dev.write(op.offset, bytes([pattern]) * op.length, writethrough=op.fua)
        elif op.cmd == "discard":
            await dev.discard(op.offset, op.length)
        elif op.cmd == "alloc":
            await block_alloc(dev, op.offset, op.length)
        elif op.cmd == "map":
            await block_map(dev)
        elif op.cmd == "flush":
            await dev.flush()
        else:
            raise AssertionError(f"not an I/O command: {op.text}")
    except OSError as e:
        return errname(e.errno)
    return "ok"


async def _block_replay(case, ops, engine, dev, outcomes):
    import trio

    from blkfuse.engine.core import EngineError

    pending: list[trio.Event] = []

    async def settle():
        # Every started aio request is finished or suspended at a breakpoint.
        with trio.fail_after(HANG_GUARD):
            while sum(not d.is_set() for d in pending) != len(engine.suspended()):
                await trio.sleep(0.0005)

    async with trio.open_nursery() as nursery:
        for i, op in enumerate(ops):
            cmd, args = op.cmd, op.args
            try:
                if cmd in ("aio_read", "aio_write"):
                    done = trio.Event()

                    async def run(i=i, op=op, done=done):
                        outcomes[i] = await _block_io(dev, op)
                        done.set()

                    pending.append(done)
                    nursery.start_soon(run)
                    await settle()
                elif cmd == "aio_flush":
                    try:
                        with trio.fail_after(HANG_GUARD):
                            for done in pending:
                                await done.wait()
                        outcomes[i] = "ok"
                    except trio.TooSlowError:
                        outcomes[i] = "HANG"
                        engine.resume_all()
                elif cmd == "break":
                    engine.add_breakpoint(args[0], args[1])
                    outcomes[i] = "ok"
                elif cmd == "resume":
                    engine.resume(args[0])
                    await settle()
                    outcomes[i] = "ok"
                elif cmd == "remove_break":
                    engine.remove_breakpoint(args[0])
                    await settle()
                    outcomes[i] = "ok"
                elif cmd == "wait_break":
                    await engine.wait_break(args[0], timeout=HANG_GUARD)
                    outcomes[i] = "ok"
                else:
                    outcomes[i] = await _block_io(dev, op)
            except EngineError as e:
                outcomes[i] = errname(e.errno)
        engine.resume_all()  # nothing may stay suspended, or the nursery never exits


# ---- target: a real mount ------------------------------------------------------------------


def mount_available() -> str | None:
    """None if real mounts can run here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "not root and no fusermount3"
    try:
        import blkfuse.cli.mount  # noqa: F401
    except ImportError as e:
        return f"blkfuse mount not available: {e}"
    return None


class Mount(blkfuse.Mount):
    """blkfuse.Mount that creates its mountpoint; `file` is the image file in the mount."""

    def __init__(
        self,
        image: Path,
        mountpoint: Path,
        config: Path | None = None,
        options: dict[str, str] | None = None,
    ):
        Path(mountpoint).mkdir(parents=True, exist_ok=True)
        super().__init__(image, mountpoint, config=config, options=options)

    @property
    def file(self) -> Path:
        return self.image_path

    def outcome(self, line: str) -> str:
        """One control-file command; "ok" or the errno name it failed with."""
        try:
            self.ctl(line)
        except blkfuse.ControlError as e:
            return errname(e.errno)
        return "ok"


def aligned_buffer(length: int) -> mmap.mmap:
    """Page-aligned memory, as O_DIRECT wants."""
    return mmap.mmap(-1, max(mmap.PAGESIZE, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE))


def file_read(fd: int, offset: int, length: int) -> bytes | str:
    """bytes, or the errno name."""
    buf = aligned_buffer(length)
    try:
        n = os.preadv(fd, [memoryview(buf)[:length]], offset)
        return bytes(buf[:n])
    except OSError as e:
        return errname(e.errno)
    finally:
        buf.close()


def file_write(fd: int, offset: int, data: bytes) -> str:
    buf = aligned_buffer(len(data))
    buf[: len(data)] = data
    try:
        n = os.pwritev(fd, [memoryview(buf)[: len(data)]], offset)
    except OSError as e:
        return errname(e.errno)
    finally:
        buf.close()
    return "ok" if n == len(data) else f"SHORT_{n}"


def file_write_fua(fd: int, offset: int, data: bytes) -> str:
    """pwritev2(RWF_DSYNC): one FUA write, whatever the fd's flags."""
    buf = aligned_buffer(len(data))
    buf[: len(data)] = data
    try:
        n = os.pwritev(fd, [memoryview(buf)[: len(data)]], offset, os.RWF_DSYNC)
    except OSError as e:
        return errname(e.errno)
    finally:
        buf.close()
    return "ok" if n == len(data) else f"SHORT_{n}"


def file_fallocate(fd: int, mode: int, offset: int, length: int) -> str:
    from blkfuse.block.image import fallocate

    try:
        fallocate(fd, mode, offset, length)
    except OSError as e:
        return errname(e.errno)
    return "ok"


def file_zero(fd: int, offset: int, length: int) -> str:
    """write -z: fallocate(ZERO_RANGE), what QEMU's FUSE export makes a write-zeroes of."""
    from blkfuse.block.image import FALLOC_FL_ZERO_RANGE

    return file_fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)


def file_discard(fd: int, offset: int, length: int) -> str:
    from blkfuse.block.image import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

    return file_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def file_seek_data(fd: int, offset: int) -> str:
    """A block-status query through the mount: lseek(SEEK_DATA); reaching the end is fine."""
    try:
        os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno != _errno.ENXIO:
            return errname(e.errno)
    return "ok"


def file_flush(fd: int) -> str:
    try:
        os.fsync(fd)
    except OSError as e:
        return errname(e.errno)
    return "ok"


def open_flags(writethrough: bool) -> int:
    return os.O_RDWR | os.O_DIRECT | (os.O_DSYNC if writethrough else 0)


def _file_io(fd: int, op: Op) -> str:
    if op.cmd in ("read", "aio_read"):
        data = file_read(fd, op.offset, op.length)
        if isinstance(data, str):
            return data
        if len(data) != op.length:
            return f"SHORT_{len(data)}"
        if op.pattern is not None and data != bytes([op.pattern]) * op.length:
            return "MISCOMPARE"
        return "ok"
    if op.cmd in ("write", "aio_write") and op.zero:
        return file_zero(fd, op.offset, op.length)
    if op.cmd in ("write", "aio_write"):
        pattern = DEFAULT_WRITE_PATTERN if op.pattern is None else op.pattern
        if op.fua:
            return file_write_fua(fd, op.offset, bytes([pattern]) * op.length)
        return file_write(fd, op.offset, bytes([pattern]) * op.length)
    if op.cmd == "discard":
        return file_discard(fd, op.offset, op.length)
    if op.cmd == "alloc":
        return file_seek_data(fd, op.offset)
    if op.cmd == "map":
        return file_seek_data(fd, 0)
    if op.cmd == "flush":
        return file_flush(fd)
    raise AssertionError(f"not an I/O command: {op.text}")


def replay_mount(case: dict, tmpdir: Path) -> Replay:
    exp = expectation(case)
    image_path = tmpdir / "img.raw"
    config_path = tmpdir / "blkdebug.conf"
    make_image(image_path, case)
    config_path.write_text(case["config"])
    options = options_for(case, config_path)
    config = Path(options.pop("config"))
    outcomes = [None] * len(exp.ops)
    try:
        with Mount(image_path, tmpdir / "mnt", config=config, options=options) as m:
            _mount_replay(case, exp.ops, m, outcomes)
    except blkfuse.MountError as e:
        return Replay(["NOT_RUN"] * len(exp.ops), image_path.read_bytes(), str(e))
    return Replay(outcomes, image_path.read_bytes())


def _mount_replay(case, ops, m: Mount, outcomes):
    writethrough = case.get("cache") == "writethrough"
    fd = os.open(m.file, open_flags(writethrough))
    threads: list[threading.Thread] = []
    breakpoints_used = False
    try:
        for i, op in enumerate(ops):
            if op.cmd in ("aio_read", "aio_write"):

                def run(i=i, op=op):
                    outcomes[i] = _file_io(fd, op)

                t = threading.Thread(target=run, daemon=True)
                t.start()
                threads.append(t)
                # Without a breakpoint the request must finish: wait, so the next command
                # is ordered after it (as in the block replay). With breakpoints in play it
                # may be suspended; the cases follow with wait_break or aio_flush.
                if not breakpoints_used:
                    t.join(HANG_GUARD)
            elif op.cmd == "aio_flush":
                deadline = time.monotonic() + HANG_GUARD
                for t in threads:
                    t.join(max(0.0, deadline - time.monotonic()))
                outcomes[i] = "HANG" if any(t.is_alive() for t in threads) else "ok"
            elif op.cmd in ("break", "resume", "remove_break", "wait_break"):
                breakpoints_used = True
                line = " ".join([op.cmd] + op.args)
                if op.cmd == "wait_break":
                    line += f" {HANG_GUARD:g}"
                outcomes[i] = m.outcome(line)
            else:
                outcomes[i] = _file_io(fd, op)
    finally:
        if any(t.is_alive() for t in threads):
            for tag in {o.args[-1] for o in ops if o.cmd == "break"}:
                m.outcome(f"remove_break {tag}")
            for t in threads:
                t.join(HANG_GUARD)
        os.close(fd)
