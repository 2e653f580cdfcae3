"""QEMU's own FUSE export as the oracle for what a FUSE client's file operations do.

qemu-io has no lseek and no fallocate: `alloc`/`map` ask block status with want_zero off over a
range it chooses, and `write -z`/`discard` are block requests, not the FUSE operations a client
sends. QEMU 7.2's FUSE export (qemu-storage-daemon --export type=fuse) turns those operations
into block requests itself (block/export/fuse.c: fuse_lseek loops bdrv_block_status_above from
the offset to the end of the image, once per extent; fuse_fallocate clamps a KEEP_SIZE range to
the image and grows it for ZERO_RANGE). So a "file scenario" here is a blkdebug config plus
file operations (pread, pwrite, fallocate ZERO_RANGE, fallocate PUNCH_HOLE|KEEP_SIZE,
lseek SEEK_DATA/SEEK_HOLE, fsync), run

  qsd    on a live export of raw over blkdebug over file (or blkdebug alone, format=none), all
         nodes discard=unmap (as qemu-io and `-drive discard=unmap` have it), with the cache
         mode spelt as node options (cache.direct, cache.no-flush) and the export's
         writethrough;
  block  through blkfuse's BlockDevice, with fuse_fallocate's and fuse_lseek's mapping;
  mount  through a blkfuse mount (once the FUSE fallocate/lseek handlers are there).

Results per operation: ok, the errno, the data read, or the offset lseek returned. The images
start with holes (a sparse backing file with data written in places), so SEEK_DATA/SEEK_HOLE
walk several extents.
"""

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from blkfuse.client import mounttab

import differential as D
import oracle

QSD = shutil.which("qemu-storage-daemon")
ZERO_RANGE_KEEP_SIZE = 0x10 | 0x01

# Which cache modes the export reproduces (qemu-io's -t, as node options):
#   cache.direct  O_DIRECT file; cache.no-flush  unsafe; export writethrough  every write FUA
CACHE_NODE_OPTIONS = {
    "writeback": ([], False),
    "writethrough": ([], True),
    "directsync": (["cache.direct=on"], True),
    "none": (["cache.direct=on"], False),
    "unsafe": (["cache.no-flush=on"], False),
}


@dataclass
class FileScenario:
    seed: int
    index: int
    config: str
    ops: list  # ("read", off, len) | ("write", off, len, byte) | ("zero", off, len) |
    # ("zero_keep", off, len) (ZERO_RANGE|KEEP_SIZE) |
    # ("discard", off, len) | ("seek", off, whence) | ("flush",)
    data_runs: list  # [(offset, length, byte)] written into a sparse image before the start
    cache: str = "writeback"
    format: str = "raw"
    align: int | None = None
    max_transfer: int | None = None
    limits: dict = field(default_factory=dict)
    image_size: int = 65536

    @property
    def ident(self) -> str:
        return f"seed={self.seed} index={self.index}"

    def make_image(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(self.image_size)
            for offset, length, byte in self.data_runs:
                f.seek(offset)
                f.write(bytes([byte]) * length)

    def blkdebug_options(self) -> list[str]:
        opts = []
        if self.align:
            opts.append(f"align={self.align}")
        if self.max_transfer:
            opts.append(f"max-transfer={self.max_transfer}")
        return opts + [f"{key}={value}" for key, value in self.limits.items()]

    def qsd_argv(self, image: Path, config: Path, export: Path) -> list[str]:
        node_cache, writethrough = CACHE_NODE_OPTIONS[self.cache]
        common = ["discard=unmap"] + node_cache
        argv = [
            QSD,
            "--blockdev",
            ",".join(["driver=file", "node-name=f", f"filename={image}"] + common),
            "--blockdev",
            ",".join(
                ["driver=blkdebug", "node-name=d", "image=f", f"config={config}"]
                + self.blkdebug_options()
                + common
            ),
        ]
        top = "d"
        if self.format == "raw":
            argv += ["--blockdev", ",".join(["driver=raw", "node-name=r", "file=d"] + common)]
            top = "r"
        argv += [
            "--export",
            f"type=fuse,id=e,node-name={top},mountpoint={export},writable=on,"
            f"writethrough={'on' if writethrough else 'off'}",
        ]
        return argv

    def mount_options(self) -> dict[str, str]:
        options = D.node_mount_options(self)
        options["growable"] = "on"  # QEMU's export lets ZERO_RANGE grow the image
        options["qemu"] = D.installed_profile()  # qsd and qemu-io come from one QEMU
        return options

    def describe(self) -> str:
        opts = " ".join(self.blkdebug_options())
        return (
            f"file scenario {self.ident}: cache={self.cache} format={self.format} {opts}\n"
            f"  image {self.image_size} bytes, data runs {self.data_runs}\n"
            f"  config: {self.config.replace(chr(10), ' | ')}\n"
            f"  ops: {self.ops}"
        )


def generate(seed: int, index: int) -> FileScenario:
    rng = random.Random(f"{seed}:{index}:file")
    size = 65536
    runs = []
    for _ in range(rng.randint(0, 4)):
        offset = rng.randrange(0, size // 4096) * 4096
        runs.append((offset, rng.choice([512, 4096, 8192, 12288]), rng.randrange(1, 256)))
    sc = FileScenario(seed=seed, index=index, config="", ops=[], data_runs=runs, image_size=size)
    sc.cache = rng.choice(
        ["writeback", "writeback", "writethrough", "none", "unsafe", "directsync"]
    )
    sc.format = rng.choice(["raw", "raw", "raw", "none"])
    if rng.random() < 0.3:
        sc.align = rng.choice([512, 4096])
    if rng.random() < 0.2:
        sc.max_transfer = max(sc.align or 512, rng.choice([4096, 8192]))
    if rng.random() < 0.4:
        D._zero_discard_limits(rng, sc)
    sectors = size // 512
    rules = []
    for _ in range(rng.randint(1, 4)):
        text = D._rule_text(rng, "direct", sectors)
        if "[inject-error]" in text and "iotype" not in text and rng.random() < 0.5:
            text += 'iotype = "block-status"\n'  # the io type lseek is checked as
        rules.append(text)
    sc.config = "".join(rules)
    for _ in range(rng.randint(2, 8)):
        kind = rng.choices(
            ["read", "write", "zero", "discard", "seek", "flush"],
            weights=[0.15, 0.15, 0.15, 0.15, 0.25, 0.15],
        )[0]
        if kind == "seek":
            sc.ops.append(
                ("seek", rng.randrange(0, size + 1024), rng.choice([os.SEEK_DATA, os.SEEK_HOLE]))
            )
        elif kind == "flush":
            sc.ops.append(("flush",))
        else:
            offset, length = D._range(rng, size, 12288)
            if kind in ("zero", "discard") and rng.random() < 0.15:
                length = size - offset + rng.choice([512, 4096, 1000])  # past the end
            if kind == "zero" and rng.random() < 0.3:
                kind = "zero_keep"  # ZERO_RANGE|KEEP_SIZE
            if kind == "discard" and sc.align:
                # QEMU 7.2 aborts on a discard not aligned to align (see differential.py)
                offset -= offset % sc.align
                length = max(sc.align, length - length % sc.align)
            op = (kind, offset, length)
            if kind == "write":
                op += (rng.randrange(1, 256),)
            sc.ops.append(op)
    return sc


def generate_all(seed: int, n: int) -> list[FileScenario]:
    return [generate(seed, i) for i in range(n)]


# ---- running a scenario against files ------------------------------------------------------


def run_file_ops(sc: FileScenario, path: Path) -> list:
    """The scenario's operations on the file at `path` (an export or a mount)."""
    results = []
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        for op in sc.ops:
            kind = op[0]
            if kind == "read":
                data = oracle.file_read(fd, op[1], op[2])
                results.append(data if isinstance(data, str) else ("data", data))
            elif kind == "write":
                results.append(oracle.file_write(fd, op[1], bytes([op[3]]) * op[2]))
            elif kind == "zero":
                results.append(oracle.file_zero(fd, op[1], op[2]))
            elif kind == "zero_keep":
                results.append(oracle.file_fallocate(fd, ZERO_RANGE_KEEP_SIZE, op[1], op[2]))
            elif kind == "discard":
                results.append(oracle.file_discard(fd, op[1], op[2]))
            elif kind == "seek":
                try:
                    results.append(("offset", os.lseek(fd, op[1], op[2])))
                except OSError as e:
                    results.append(oracle.errname(e.errno))
            else:
                results.append(oracle.file_flush(fd))
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # QEMU's export flushes on close (fuse_flush); a flush rule may fail it
    return results


def run_qsd(sc: FileScenario) -> tuple[list, bytes] | str:
    """(results, final image), or a string: why the export could not be used."""
    with tempfile.TemporaryDirectory(prefix="blkfuse-qsd-") as d:
        workdir = Path(d)
        image, config, export = workdir / "img.raw", workdir / "r.conf", workdir / "export"
        sc.make_image(image)
        config.write_text(sc.config)
        export.touch()
        proc = subprocess.Popen(
            sc.qsd_argv(image, config, export),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not mounttab.is_mounted(export):
                if proc.poll() is not None:
                    return f"qemu-storage-daemon exited: {proc.stdout.read().strip()}"
                if time.monotonic() > deadline:
                    return "the export did not appear within 30 s"
                time.sleep(0.02)
            results = run_file_ops(sc, export)
        finally:
            if mounttab.is_mounted(export):
                subprocess.run(["fusermount3", "-u", str(export)], capture_output=True)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return results, image.read_bytes()


def run_block(sc: FileScenario) -> tuple[list, bytes, int | None]:
    """The same through blkfuse's BlockDevice, mapping each operation as QEMU's export does;
    the third item is the index of the first write that failed a read-modify-write read
    (the deliberate difference), or None."""
    import trio
    from support.device import build_device
    from support.recorder import Recorder

    from blkfuse.block.image import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
    from blkfuse.engine.core import Engine
    from blkfuse.rules import profiles
    from blkfuse.rules.config import parse_config_text

    with tempfile.TemporaryDirectory(prefix="blkfuse-qsd-") as d:
        path = Path(d) / "img.raw"
        sc.make_image(path)

        engine = Engine(
            parse_config_text(sc.config, "generated.conf"),
            profile=profiles.profile(D.installed_profile()),
        )
        recorder = Recorder(engine)  # every check, through the engine's tracer hooks

        def failed_reads() -> int:
            return sum(1 for iotype, error in recorder.checks if iotype == "read" and error)

        stop = None
        settings = D.Scenario(
            seed=0,
            index=0,
            profile="",
            config="",
            ops=[],
            cache=sc.cache,
            align=sc.align,
            max_transfer=sc.max_transfer,
            format=sc.format,
            limits=sc.limits,
        ).settings()
        dev = build_device(path, engine, settings=settings)
        image = dev.stack.image
        results = []

        async def one(op):
            kind = op[0]
            if kind == "read":
                return ("data", await dev.read(op[1], op[2]))
            if kind == "write":
                await dev.write(op[1], bytes([op[3]]) * op[2])
            elif kind == "zero":
                await dev.fallocate(FALLOC_FL_ZERO_RANGE, op[1], op[2])
            elif kind == "zero_keep":
                await dev.fallocate(ZERO_RANGE_KEEP_SIZE, op[1], op[2])
            elif kind == "discard":
                await dev.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, op[1], op[2])
            elif kind == "seek":
                return ("offset", await dev.seek(op[1], op[2]))
            else:
                await dev.flush()
            return "ok"

        async def main():
            nonlocal stop
            for i, op in enumerate(sc.ops):
                before = failed_reads()
                try:
                    results.append(await one(op))
                except OSError as e:
                    results.append(oracle.errname(e.errno))
                if (
                    op[0] in ("write", "zero", "zero_keep")
                    and failed_reads() > before
                    and stop is None
                ):
                    stop = i

        try:
            trio.run(main)
        finally:
            image.close()
        return results, path.read_bytes(), stop


def run_mount(sc: FileScenario, workdir: Path) -> tuple[list, bytes]:
    image, config = workdir / "img.raw", workdir / "r.conf"
    sc.make_image(image)
    config.write_text(sc.config)
    with oracle.Mount(image, workdir / "mnt", config=config, options=sc.mount_options()) as m:
        results = run_file_ops(sc, m.file)
    return results, image.read_bytes()


def show(result) -> str:
    if isinstance(result, tuple) and result[0] == "data":
        return f"data{oracle.runs_of(result[1])[:3]}"
    return str(result)


def _as_reply(result):
    if isinstance(result, str) and result.startswith("ERRNO_") and int(result[6:]) > 133:
        return "EIO"
    if result == "ERANGE":  # libfuse 3.17's "bad error value" (no rule here injects ERANGE)
        return "EIO"
    return result


def compare(sc: FileScenario, theirs: tuple, ours: tuple, stop: int | None) -> list[str]:
    """Disagreements, up to `stop`: a write that failed a read-modify-write read (the
    deliberate difference: QEMU writes an uninitialised buffer), not compared itself."""
    (their_results, their_image), (our_results, our_image) = theirs, ours
    # An errno the kernel does not define: QEMU's export answers it as its libfuse does
    # (3.14: passed on; 3.17: ERANGE), blkfuse as EIO through a mount, as itself in the block
    # layer (daemon/fs.py reply_errno; a deliberate difference). Compared as a reply carries it.
    their_results = [_as_reply(r) for r in their_results]
    our_results = [_as_reply(r) for r in our_results]
    problems = []
    end = len(sc.ops) if stop is None else stop
    for i, (op, a, b) in enumerate(zip(sc.ops[:end], their_results, our_results)):
        if a != b:
            problems.append(f"op {i} {op}: qemu-storage-daemon {show(a)}, blkfuse {show(b)}")
    if (
        sc.cache in ("none", "directsync")
        and len(their_image) > len(our_image)
        and their_image[len(our_image) :].count(0) == len(their_image) - len(our_image)
    ):
        # Deliberate difference (README): QEMU's O_DIRECT file node writes a whole aligned
        # block past the end of an image whose new end is not aligned, growing the file;
        # blkfuse keeps the size the request asked for.
        their_image = their_image[: len(our_image)]
    if stop is None and not problems and their_image != our_image:
        problems.append("final image: " + oracle.image_diff(their_image, our_image))
    return problems
