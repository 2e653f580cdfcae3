"""Generated blkdebug scenarios run through QEMU's qemu-io and through blkfuse.

A scenario is a random blkdebug config ([inject-error] / [set-state] rules over the events
a FUSE file can raise) plus a random sequence of read / write (plain, or FUA: `write -f`) /
write-zeroes (`write -z [-u]`) / discard / block-status (`alloc`, `map`) / flush at
sector-aligned or odd offsets within a small image, under any of qemu-io's cache modes
(-t writeback, writethrough, directsync, none, unsafe), with a raw format node over blkdebug
or blkdebug alone (`--image-opts driver=blkdebug`, blkfuse's format=none), optionally with
blkdebug's align, max-transfer, opt-/max-write-zero and opt-/max-discard options.
Everything derives from (seed, index).

How per-command results are read from qemu-io exactly
------------------------------------------------------
qemu-io runs all `-c` commands of a scenario in one process (the engine state must carry
over), prints reads and writes as "read N/N bytes ..." / "write failed: <strerror>", and
prints NOTHING for a flush, failed or not; its exit status only says whether some command
failed. So:

* Between commands we put `-c "help sleep"`: it prints one known line and never touches the
  block device, so the output splits into exactly one segment per command.
* stdout is made unbuffered (`stdbuf -o0`) and stderr goes to the same pipe, so messages
  from both streams stay in program order.
* A flush is issued as qemu-io's `reopen` command. Reopening first flushes the node
  (bdrv_reopen_multiple -> bdrv_flush, the same call the `flush` command makes, with the same
  flush_to_os / flush_to_disk events and the same "written since" generations) and, when that
  flush fails, reports "Error flushing drive: <strerror>" and abandons the reopen; a
  successful reopen of blkdebug changes nothing (blkdebug_reopen_prepare accepts it as is).
* We do not take that equivalence on trust: every scenario also runs a second time with the
  real `flush` command. Both runs must print the same for every non-flush command and leave
  the same image, and the second run's exit status must be 1 exactly when some command of
  the first run failed. A scenario where that cross-check fails is an oracle error (the
  test fails and says so), never silently compared.
"""

import errno as _errno
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import oracle

QEMU_IO = shutil.which("qemu-io")
STDBUF = shutil.which("stdbuf")
MARKER_CMD = "help sleep"
MARKER_LINE = "sleep -- waits for the given value in milliseconds"

GEN_EVENTS = [
    "read_aio",
    "write_aio",
    "pwritev",
    "pwritev_done",
    "flush_to_os",
    "flush_to_disk",
    "none",
    "pwritev_zero",
]
RMW_EVENTS = [
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
]
GEN_ERRNOS = ["5", "28", "1", "122", "0", "30", "200", "0x1c", "010", "13"]
GEN_IOTYPES = ["read", "write", "flush", "discard", "write-zeroes", "block-status"]

PROFILES = {  # name -> share of the scenarios
    "writeback": 0.25,
    "writethrough": 0.10,
    "align": 0.15,
    "max-transfer": 0.10,
    "zero-discard": 0.15,  # write -z / discard with opt-/max- limits, maybe align
    "cache": 0.15,  # -t unsafe / directsync / none / writethrough, write -f
    "direct": 0.10,  # --image-opts driver=blkdebug (format=none)
}
CACHE_MODES = ["writeback", "writethrough", "directsync", "none", "unsafe"]


def qemu_io_version() -> str | None:
    if not QEMU_IO:
        return None
    out = subprocess.run([QEMU_IO, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else None


def as_file_operations(sc: "Scenario") -> "Scenario":
    """`sc` as a FUSE client can send it to the installed QEMU's FUSE export: where that
    export makes PUNCH_HOLE a write-zeroes (10.0: docs/design.md, "QEMU profiles") no file
    operation is a discard, so the discard ops go (tests/qsd.py checks PUNCH_HOLE itself)."""
    import dataclasses

    from blkfuse.rules.profiles import profile

    if not profile(installed_profile()).punch_hole_is_write_zeroes:
        return sc
    return dataclasses.replace(sc, ops=[op for op in sc.ops if op[0] != "discard"])


def installed_profile() -> str:
    """The QEMU profile (blkfuse/rules/profiles.py) of the installed qemu-io: the live
    differential tests compare blkfuse under that profile (-o qemu=...) with it."""
    from blkfuse.rules.profiles import DEFAULT, for_version

    version = qemu_io_version()
    return for_version(version).name if version else DEFAULT.name


# ---- scenarios ------------------------------------------------------------------------------


def node_mount_options(sc) -> dict[str, str]:
    """The mount options that give a scenario's nodes its settings (the limits, align,
    max-transfer, cache mode, format): a qemu-io Scenario's and a qsd FileScenario's alike."""
    options = {key: str(value) for key, value in sc.limits.items()}
    if sc.align:
        options["align"] = str(sc.align)
    if sc.max_transfer:
        options["max-transfer"] = str(sc.max_transfer)
    if sc.cache != "writeback":
        options["cache"] = sc.cache
    if sc.format != "raw":
        options["format"] = sc.format
    return options


@dataclass
class Scenario:
    seed: int
    index: int
    profile: str
    config: str
    ops: list  # ("read", off, len) | ("write", off, len, byte[, fua]) | ("zero", off, len,
    # unmap) | ("discard", off, len) | ("alloc", off, len) | ("map",) |
    # ("truncate", size) | ("flush",)
    cache: str = "writeback"
    align: int | None = None
    max_transfer: int | None = None
    image_size: int = 16384
    init_byte: int = 0
    format: str = "raw"  # "none": blkdebug without the raw node
    limits: dict = field(default_factory=dict)  # opt-write-zero, max-discard, ...

    @property
    def ident(self) -> str:
        return f"seed={self.seed} index={self.index} ({self.profile})"

    def image(self) -> bytes:
        return bytes([self.init_byte]) * self.image_size

    def qemu_command(self, op, flush_as: str) -> str:
        kind = op[0]
        if kind == "read":
            return f"read -v {op[1]} {op[2]}"
        if kind == "write":
            fua = "-f " if len(op) > 4 and op[4] else ""
            return f"write {fua}-P {op[3]:#x} {op[1]} {op[2]}"
        if kind == "zero":
            return f"write -z {'-u ' if op[3] else ''}{op[1]} {op[2]}"
        if kind in ("discard", "alloc"):
            return f"{kind} {op[1]} {op[2]}"
        if kind == "map":
            return "map"
        if kind == "truncate":
            return f"truncate {op[1]}"
        return flush_as

    def blkdebug_options(self) -> list[str]:
        opts = []
        if self.align is not None:
            opts.append(f"align={self.align}")
        if self.max_transfer is not None:
            opts.append(f"max-transfer={self.max_transfer}")
        opts += [f"{key}={value}" for key, value in self.limits.items()]
        return opts

    def qemu_argv(
        self, config_path: Path, image_path: Path, flush_as: str, log_path: Path | None = None
    ) -> list[str]:
        """With `log_path`: a blklogwrites node logging to it between blkdebug and the file
        (what blkfuse's -o log-writes records, tests/qemu/test_logwrites_differential.py)."""
        argv = [QEMU_IO, "-t", self.cache]
        blkdebug = self.blkdebug_options()
        if log_path is not None:
            image = ["image.driver=blklogwrites", "image.file.driver=file"]
            image += [f"image.file.filename={image_path}", "image.log.driver=file"]
            image += [f"image.log.filename={log_path}"]
            opts = ["driver=blkdebug", f"config={config_path}"] + blkdebug + image
            if self.format != "none":
                opts = ["driver=raw"] + [f"file.{o}" for o in opts]
            argv += ["--image-opts", ",".join(opts)]
        elif self.format == "none":
            opts = ["driver=blkdebug", f"config={config_path}"] + blkdebug
            opts += ["image.driver=file", f"image.filename={image_path}"]
            argv += ["--image-opts", ",".join(opts)]
        elif not blkdebug:
            argv += ["-f", "raw", f"blkdebug:{config_path}:{image_path}"]
        else:
            opts = ["driver=raw", "file.driver=blkdebug", f"file.config={config_path}"]
            opts += [f"file.{o}" for o in blkdebug]
            opts += ["file.image.driver=file", f"file.image.filename={image_path}"]
            argv += ["--image-opts", ",".join(opts)]
        for op in self.ops:
            argv += ["-c", self.qemu_command(op, flush_as), "-c", MARKER_CMD]
        return argv

    def settings(self):
        """blkfuse's Settings for this scenario (what `-o` would give)."""
        from blkfuse.rules.model import Settings

        settings = Settings(
            align=self.align,
            max_transfer=self.max_transfer,
            cache=self.cache,
            format=self.format,
            qemu=installed_profile(),
        )
        for key, value in self.limits.items():
            setattr(settings, key.replace("-", "_"), value)
        return settings

    def mount_options(self) -> dict[str, str]:
        options = node_mount_options(self)
        if any(op[0] == "truncate" for op in self.ops):
            options["growable"] = "on"  # qemu-io may resize; a mount's size is fixed without
        options["qemu"] = installed_profile()
        return options

    def describe(self) -> str:
        parts = [f"scenario {self.ident}: cache={self.cache} format={self.format}"]
        parts += self.blkdebug_options()
        parts.append(f"image {self.image_size} bytes of {self.init_byte:#x}")
        lines = [" ".join(parts), "  config: " + self.config.replace("\n", " | ")]
        lines.append("  ops: " + "; ".join(self.qemu_command(op, "flush") for op in self.ops))
        argv = self.qemu_argv(Path("blkdebug.conf"), Path("img.raw"), "flush")
        lines.append(
            "  reproduce: qemu-io "
            + " ".join(_shell_quote(a) for a in argv[1:]).replace(" -c 'help sleep'", "")
        )
        return "\n".join(lines)


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:=,@+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _rule_text(rng: random.Random, profile: str, sectors: int) -> str:
    events = GEN_EVENTS + (RMW_EVENTS if profile in ("align", "zero-discard", "direct") else [])
    event = rng.choice(events)
    lines = []
    if rng.random() < 0.62:
        lines.append("[inject-error]")
        lines.append(f'event = "{event}"')
        if rng.random() < 0.5:
            lines.append(f'state = "{rng.choice([0, 1, 1, 2, 3])}"')
        if rng.random() < 0.75:
            lines.append(f'errno = "{rng.choice(GEN_ERRNOS)}"')
        if rng.random() < 0.45:
            lines.append(f'sector = "{rng.randrange(sectors)}"')
        if rng.random() < 0.6:
            lines.append(f'once = "{rng.choice(["on", "off"])}"')
        if rng.random() < 0.35:
            lines.append(f'iotype = "{rng.choice(GEN_IOTYPES)}"')
        if rng.random() < 0.1:
            lines.append(f'immediately = "{rng.choice(["on", "off"])}"')
    else:
        lines.append("[set-state]")
        lines.append(f'event = "{event}"')
        lines.append(f'state = "{rng.choice([0, 1, 1, 2, 2, 3])}"')
        if rng.random() < 0.9:
            lines.append(f'new_state = "{rng.choice([0, 1, 2, 2, 3, 3])}"')
    return "\n".join(lines) + "\n"


def _range(rng: random.Random, size: int, big: int) -> tuple[int, int]:
    if rng.random() < 0.6:  # sector-aligned
        length = rng.choice([512, 1024, 2048, 4096, big])
        offset = rng.randrange(0, size // 512) * 512
    else:  # odd offsets and lengths
        length = rng.choice([1, 10, rng.randrange(1, 700), rng.randrange(1, big + 1)])
        offset = rng.randrange(0, size)
    length = max(1, min(length, big, size - offset))
    return offset, length


def _zero_discard_limits(rng: random.Random, sc: Scenario) -> None:
    """opt-/max-write-zero and opt-/max-discard, as blkdebug_open accepts them: multiples
    of align (4096 when the file is O_DIRECT, whose own alignment counts too)."""
    unit = max(sc.align or 512, 4096 if sc.cache in ("none", "directsync") else 512)
    for opt, cap in (("opt-write-zero", "max-write-zero"), ("opt-discard", "max-discard")):
        opt_value = None
        if rng.random() < 0.6:
            opt_value = unit * rng.choice([1, 2, 4])
            sc.limits[opt] = opt_value
        if rng.random() < 0.5:
            sc.limits[cap] = max(unit, opt_value or 0) * rng.choice([1, 2, 3])


def _op(rng: random.Random, sc: Scenario, big: int, weights: dict) -> tuple:
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    size = sc.image_size
    if kind == "read":
        return ("read",) + _range(rng, size, big)
    if kind == "write":
        op = ("write",) + _range(rng, size, big) + (rng.randrange(1, 256),)
        return op + (True,) if rng.random() < 0.25 else op
    if kind == "zero":
        return ("zero",) + _range(rng, size, 2 * big) + (rng.random() < 0.4,)
    if kind == "discard":
        offset, length = _range(rng, size, 2 * big)
        if sc.align:
            # QEMU 7.2 aborts on a discard not aligned to blkdebug's align: an assertion in
            # blkdebug_co_pdiscard, or a division by zero when opt-discard is not set.
            # Nothing to compare there (README, differences).
            offset -= offset % sc.align
            length = max(sc.align, length - length % sc.align)
            length = min(length, size - offset)
        return ("discard", offset, length)
    if kind == "alloc":
        offset = _range(rng, size, big)[0]
        return ("alloc", offset, size - offset)  # to the end: what SEEK_DATA asks
    if kind == "map":
        return ("map",)
    if kind == "truncate":
        return ("truncate", size + rng.choice([512, 4096, 8192]))  # grows: counts as written
    return ("flush",)


BASE_WEIGHTS = {"read": 0.38, "write": 0.40, "flush": 0.22}
ALL_WEIGHTS = {
    "read": 0.22,
    "write": 0.25,
    "flush": 0.16,
    "zero": 0.14,
    "discard": 0.12,
    "alloc": 0.07,
    "map": 0.04,
    "truncate": 0.03,
}


def generate(seed: int, index: int, profile: str) -> Scenario:
    rng = random.Random(f"{seed}:{index}:{profile}")
    sc = Scenario(seed=seed, index=index, profile=profile, config="", ops=[])
    big = 4096
    weights = BASE_WEIGHTS
    if profile == "writethrough":
        sc.cache = "writethrough"
    elif profile == "align":
        sc.align = rng.choice([512, 4096, 4096])
        sc.image_size = 32768
        sc.cache = rng.choice(["writeback", "writeback", "writethrough"])
        if rng.random() < 0.25:
            sc.max_transfer = max(sc.align, rng.choice([4096, 8192]))
            big = 3 * sc.max_transfer
    elif profile == "max-transfer":
        sc.max_transfer = rng.choice([4096, 8192])
        sc.image_size = 32768
        sc.cache = rng.choice(["writeback", "writeback", "writethrough"])
        big = 3 * sc.max_transfer
    elif profile == "zero-discard":
        sc.image_size = 32768
        weights = {"read": 0.25, "write": 0.2, "flush": 0.15, "zero": 0.22, "discard": 0.18}
        sc.cache = rng.choice(["writeback", "writeback", "writethrough", "none"])
        if rng.random() < 0.4:
            sc.align = rng.choice([512, 4096])
        if rng.random() < 0.2:
            sc.max_transfer = max(sc.align or 512, 4096)
        _zero_discard_limits(rng, sc)
        big = 8192
    elif profile == "cache":
        sc.cache = rng.choice(["unsafe", "directsync", "none", "writethrough", "unsafe"])
        weights = ALL_WEIGHTS
    elif profile == "direct":
        sc.format = "none"
        sc.cache = rng.choice(CACHE_MODES)
        weights = ALL_WEIGHTS
        if rng.random() < 0.3:
            sc.align = rng.choice([512, 4096])
            sc.image_size = 32768
        if rng.random() < 0.2:
            sc.max_transfer = max(sc.align or 512, 4096)
        if rng.random() < 0.3:
            _zero_discard_limits(rng, sc)
    if profile in ("writeback", "writethrough") and rng.random() < 0.35:
        weights = ALL_WEIGHTS
    sc.init_byte = rng.choice([0, 0x77])
    sectors = sc.image_size // 512
    rules = []
    for _ in range(rng.randint(1, 4)):
        text = _rule_text(rng, profile, sectors)
        if (
            weights is ALL_WEIGHTS
            and "[inject-error]" in text
            and "iotype" not in text
            and rng.random() < 0.3
        ):
            text += 'iotype = "block-status"\n'  # what alloc and map are checked as
        rules.append(text)
    sc.config = "".join(rules)
    for _ in range(rng.randint(2, 9)):
        sc.ops.append(_op(rng, sc, big, weights))
    return sc


def generate_all(seed: int, n: int) -> list[Scenario]:
    out = []
    names = list(PROFILES)
    counts = {p: int(n * PROFILES[p]) for p in names}
    counts[names[0]] += n - sum(counts.values())
    for profile in names:
        for _ in range(counts[profile]):
            out.append(generate(seed, len(out), profile))
    return out


# ---- results -------------------------------------------------------------------------------

_STRERROR = {}
for _n in range(1, 256):
    _STRERROR.setdefault(os.strerror(_n), _n)


def errno_of(message: str) -> int:
    message = message.strip()
    if message in _STRERROR:
        return _STRERROR[message]
    m = re.fullmatch(r"Unknown error (-?\d+)", message)
    if m:
        return int(m.group(1))
    raise ValueError(f"unknown strerror text {message!r}")


class OracleError(Exception):
    """qemu-io's answer could not be read exactly (not a blkfuse bug)."""


@dataclass(frozen=True)
class Result:
    error: int = 0  # 0 = ok
    data: bytes | None = None  # what a successful read returned

    def __str__(self):
        if self.error:
            return oracle.errname(self.error)
        if self.data is not None:
            return f"ok({oracle.runs_of(self.data)[:3]}{'...' if len(oracle.runs_of(self.data)) > 3 else ''})"
        return "ok"


OK = Result()


def through_fuse(results: list) -> list:
    """What a FUSE client sees for QEMU's answers: blkfuse replies EIO for an errno the
    kernel does not define (blkfuse.daemon.fs.reply_errno: libfuse 3.17 would turn it into
    ERANGE, 3.14 pass it on; a deliberate difference, docs/design.md)."""
    from blkfuse.daemon.fs import reply_errno

    return [Result(reply_errno(r.error), r.data) if r.error else r for r in results]


_HEX = re.compile(r"^[0-9a-f]{8}:  ((?:[0-9a-f]{2} )+)")


# The commands whose qemu-io answer is a failure line or a success line (and, for a read, the
# data): op kind -> (the failure line's prefix, the strerror follows; the success line as a
# regex, n the op's length).
_ANSWERS = {
    "read": ("read failed: ", "read {n}/{n} bytes"),
    "write": ("write failed: ", "wrote {n}/{n} bytes"),
    "zero": ("write failed: ", "wrote {n}/{n} bytes"),
    "discard": ("discard failed: ", "discard {n}/{n} bytes"),
    "alloc": ("is_allocated failed: ", r"\d+/\d+ bytes (not )?allocated at offset"),
}


def _parse_segment(op, lines: list[str], flush_as: str) -> Result:
    kind = op[0]
    text = "\n".join(lines)
    if kind in _ANSWERS:
        failure, success = _ANSWERS[kind]
        for line in lines:
            if line.startswith(failure):
                return Result(errno_of(line[len(failure) :]))
        if not any(re.match(success.format(n=op[2]), line) for line in lines):
            raise ValueError(f"unexpected qemu-io output for {op}: {text!r}")
        if kind != "read":
            return OK
        data = bytearray()
        for line in lines:
            m = _HEX.match(line)
            if m:
                data += bytes.fromhex(m.group(1))
        return Result(0, bytes(data))
    if kind == "truncate":
        if lines:
            raise ValueError(f"unexpected qemu-io output for {op}: {text!r}")
        return OK
    if kind == "map":
        for line in lines:
            m = re.search(r"Failed to get allocation status: (.*)$", line)
            if m:
                return Result(errno_of(m.group(1)))
        if not lines or not all("allocated at offset" in line for line in lines):
            raise ValueError(f"unexpected qemu-io output for {op}: {text!r}")
        return OK
    # flush
    if flush_as == "reopen":
        for line in lines:
            m = re.search(r"Error flushing drive: (.*)$", line)
            if m:
                return Result(errno_of(m.group(1)))
    if lines:
        raise ValueError(f"unexpected qemu-io output for {flush_as}: {text!r}")
    return OK


def _run_qemu_once(sc: Scenario, workdir: Path, flush_as: str):
    config = workdir / "blkdebug.conf"
    image = workdir / f"img-{flush_as}.raw"
    config.write_text(sc.config)
    image.write_bytes(sc.image())
    if not sc.ops:
        # nothing to ask (a scenario of discards only, as a file client under 10.0 sends
        # it: as_file_operations); qemu-io without a -c would read commands from stdin
        return [], 0, image.read_bytes()
    argv = sc.qemu_argv(config, image, flush_as)
    if STDBUF:
        argv = [STDBUF, "-o0", "-e0"] + argv
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, cwd=workdir
    )
    lines = proc.stdout.splitlines()
    segments, current = [], []
    for line in lines:
        if line == MARKER_LINE:
            segments.append(current)
            current = []
        elif line.strip():
            current.append(line)
    if current or len(segments) != len(sc.ops):
        raise ValueError(
            f"qemu-io output does not split into {len(sc.ops)} commands "
            f"(rc={proc.returncode}):\n{proc.stdout}"
        )
    results = [_parse_segment(op, seg, flush_as) for op, seg in zip(sc.ops, segments)]
    return results, proc.returncode, image.read_bytes()


@dataclass
class QemuAnswer:
    results: list | None = None  # from the run with `reopen` for flush
    image: bytes | None = None
    check: list | None = None  # from the run with the real `flush`
    check_rc: int = 0
    check_image: bytes | None = None
    oracle_error: str | None = None

    def inconsistency(self, sc: "Scenario", stop: int) -> str | None:
        """Cross-check of the reopen-for-flush substitution (see the module docstring).

        `stop`: index of the first op where QEMU writes its uninitialised RMW buffer (the
        deliberate difference); from there on data is not deterministic between runs, so
        only errors are compared and the images are not.
        """
        if self.oracle_error:
            return self.oracle_error
        for i, (op, a, b) in enumerate(zip(sc.ops, self.results, self.check)):
            if op[0] == "flush":
                continue
            if a.error != b.error or (i < stop and a != b):
                return f"reopen run and flush run differ at op {i}: {a} vs {b}"
        if stop >= len(sc.ops) and self.image != self.check_image:
            return "reopen run and flush run leave different images"
        if (self.check_rc != 0) != any(r.error for r in self.results):
            return (
                f"flush run exit status {self.check_rc} but reopen run results "
                f"{[str(r) for r in self.results]}"
            )
        return None


def run_qemu(sc: Scenario) -> QemuAnswer:
    with tempfile.TemporaryDirectory(prefix="blkfuse-diff-") as d:
        workdir = Path(d)
        try:
            results, _, image = _run_qemu_once(sc, workdir, "reopen")
            check, rc, check_image = _run_qemu_once(sc, workdir, "flush")
        except (ValueError, subprocess.TimeoutExpired) as e:
            return QemuAnswer(oracle_error=str(e))
    return QemuAnswer(results, image, check, rc, check_image)


def run_block(sc: Scenario) -> tuple[list, bytes, list]:
    """(results, final image, deliberate) through BlockDevice; `deliberate` lists
    (op index, errno) of writes (or write-zeroes) that failed a read-modify-write
    padding read."""
    import trio
    from support.device import build_device
    from support.recorder import Recorder

    from blkfuse.engine.core import Engine
    from blkfuse.rules.config import parse_config_text
    from blkfuse.rules.profiles import profile

    with tempfile.TemporaryDirectory(prefix="blkfuse-diff-") as d:
        path = Path(d) / "img.raw"
        path.write_bytes(sc.image())
        engine = Engine(
            parse_config_text(sc.config, "generated.conf"), profile=profile(installed_profile())
        )
        recorder = Recorder(engine)  # every check, through the engine's tracer hooks
        settings = sc.settings()
        dev = build_device(path, engine, settings=settings)
        image = dev.stack.image
        results, deliberate = [], []

        async def one(op):
            kind = op[0]
            if kind == "read":
                return Result(0, await dev.read(op[1], op[2]))
            if kind == "write":
                fua = len(op) > 4 and op[4]
                await dev.write(op[1], bytes([op[3]]) * op[2], writethrough=fua)
            elif kind == "zero":
                await dev.write_zeroes(op[1], op[2], unmap=op[3])
            elif kind == "discard":
                await dev.discard(op[1], op[2])
            elif kind == "alloc":
                await oracle.block_alloc(dev, op[1], op[2])
            elif kind == "map":
                await oracle.block_map(dev)
            elif kind == "truncate":
                dev.truncate(op[1])
            else:
                await dev.flush()
            return OK

        async def main():
            for i, op in enumerate(sc.ops):
                recorder.clear()
                try:
                    results.append(await one(op))
                except OSError as e:
                    results.append(Result(e.errno))
                if op[0] in ("write", "zero"):
                    failed_reads = [err for kind, err in recorder.checks if kind == "read" and err]
                    if failed_reads:
                        deliberate.append((i, failed_reads[0]))

        try:
            trio.run(main)
        finally:
            image.close()
        return results, path.read_bytes(), deliberate


def compare(
    sc: Scenario, qemu: QemuAnswer, ours: list, our_image: bytes, deliberate: list
) -> tuple[list[str], str | None]:
    """(disagreements, note). Ops after a deliberate difference are not compared."""
    problems = []
    stop = deliberate[0][0] if deliberate else len(sc.ops)
    note = None
    inconsistent = qemu.inconsistency(sc, stop)
    if inconsistent:
        raise OracleError(inconsistent)
    if deliberate:
        i, err = deliberate[0]
        note = f"op {i}: failed RMW read (deliberate difference), compared ops 0..{i - 1}"
        if ours[i].error != err:
            problems.append(
                f"op {i} {sc.qemu_command(sc.ops[i], 'flush')!r}: a failed "
                f"read-modify-write read must fail the write with "
                f"{oracle.errname(err)}, got {ours[i]}"
            )
    for i in range(stop):
        if qemu.results[i] != ours[i]:
            problems.append(
                f"op {i} {sc.qemu_command(sc.ops[i], 'flush')!r}: "
                f"qemu-io {qemu.results[i]}, blkfuse {ours[i]}"
            )
    if not deliberate and qemu.image != our_image:
        problems.append("final image: " + oracle.image_diff(qemu.image, our_image))
    return problems, note


# ---- through a mount ------------------------------------------------------------------------


def run_mount(
    sc: Scenario, tmpdir: Path, extra_options: dict[str, str] | None = None
) -> tuple[list, bytes]:
    image_path = tmpdir / "img.raw"
    config_path = tmpdir / "blkdebug.conf"
    image_path.write_bytes(sc.image())
    config_path.write_text(sc.config)
    results = []
    options = {**sc.mount_options(), **(extra_options or {})}
    with oracle.Mount(image_path, tmpdir / "mnt", config=config_path, options=options) as m:
        fd = os.open(m.file, oracle.open_flags(False))
        try:
            for op in sc.ops:
                kind = op[0]
                if kind == "read":
                    data = oracle.file_read(fd, op[1], op[2])
                    if isinstance(data, str):
                        results.append(Result(_errno_number(data)))
                    else:
                        results.append(Result(0, data))
                    continue
                if kind == "write":
                    write = oracle.file_write_fua if len(op) > 4 and op[4] else oracle.file_write
                    r = write(fd, op[1], bytes([op[3]]) * op[2])
                elif kind == "zero":
                    r = oracle.file_zero(fd, op[1], op[2])
                elif kind == "discard":
                    r = oracle.file_discard(fd, op[1], op[2])
                elif kind == "alloc":
                    r = oracle.file_seek_data(fd, op[1])
                elif kind == "map":
                    r = oracle.file_seek_data(fd, 0)
                elif kind == "truncate":
                    try:
                        os.ftruncate(fd, op[1])
                        r = "ok"
                    except OSError as e:
                        r = oracle.errname(e.errno)
                else:
                    r = oracle.file_flush(fd)
                results.append(OK if r == "ok" else Result(_errno_number(r)))
        finally:
            os.close(fd)
    return results, image_path.read_bytes()


def _errno_number(name: str) -> int:
    if name.startswith("ERRNO_"):
        return int(name[6:])
    if name.startswith("SHORT_"):
        return -1000 - int(name[6:])  # shows up as ERRNO_-10xx: a short transfer
    return getattr(_errno, name)


def mount_deliberate(sc: Scenario) -> list:
    """The block layer's view of where a scenario hits the deliberate RMW difference."""
    return run_block(sc)[2]


# The runner both differential tests share (test_differential_qemu.py, test_differential_qsd.py)

# CI must be repeatable: a red run has to mean the same thing when it is run again. So under
# CI=true the default seed is fixed; at a developer's desk every run explores a fresh seed.
CI_SEED = 20261121


def run_seed() -> int:
    """The seed of this run's scenarios: BLKFUSE_DIFF_SEED, else CI_SEED under CI, else fresh."""
    value = os.environ.get("BLKFUSE_DIFF_SEED")
    if value:
        return int(value, 0)
    if os.environ.get("CI") == "true":
        return CI_SEED
    return random.SystemRandom().randrange(1, 2**31)


def scenario_count(name: str, default: int) -> int:
    """How many scenarios to run: the environment variable `name`, else `default`."""
    return int(os.environ.get(name, default))


def through_mounts(
    tmp_path: Path, run_mount: Callable, stop_of: Callable
) -> Callable[[int, object], tuple]:
    """A differential's run_ours(k, scenario) through real blkfuse mounts: scenario k runs in
    its own directory tmp_path/s<k> by run_mount(scenario, workdir) -> (results, image), and
    stop_of(scenario) says where ours stops at a deliberate difference. Skips the calling test
    where this machine cannot mount (which the suite counts as a failure)."""
    why_not = oracle.mount_available()
    if why_not:
        pytest.skip(why_not)

    def through_the_mount(k: int, sc) -> tuple:
        workdir = tmp_path / f"s{k}"
        workdir.mkdir()
        results, image = run_mount(sc, workdir)
        return results, image, stop_of(sc)

    return through_the_mount
