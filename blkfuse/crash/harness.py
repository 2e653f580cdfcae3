"""`blkfuse crashtest`: record a workload's writes once, then check every crash state.

Recording (`record`), in DIR:
    base.img     a sparse image of --size, with the filesystem made on it (mkfs on the file)
    record/      a copy of it mounted with blkfuse -o log-writes=DIR/writes.log, the stack
                 (loop device in direct-io mode, the filesystem, barriers on) over the
                 mount; --setup runs, its writes are flushed, the mark `crashtest:workload`
                 starts the crash points, --workload runs, the stack comes down in order
    writes.log   every write, flush and mark the image received (dm-log-writes format)
    crashtest.json  what rebuilds a state from an ID: seed, atomic, states per point, start

Checking (`check_states`): every state of the plan (blkfuse.crash.states) is built as a
sparse image, fsck'd, mounted on its own loop device, then --recover and --check run on it;
-j states at a time. A workload tells what it acknowledged with marks (`mark ack:17` written
to $BLKFUSE_CONTROL); the check gets the marks before its crash point in $BLKFUSE_MARKS.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blkfuse.client import fsstack
from blkfuse.client.api import Mount
from blkfuse.crash import logwrites
from blkfuse.crash.states import (
    DEFAULT_ATOMIC,
    SECTOR,
    CrashPlan,
    CrashState,
    build_image,
    sparse_copy,
)
from blkfuse.errors import MountError

FILESYSTEMS = (*fsstack.FILESYSTEMS, "none")
DEFAULT_SIZE = 256 << 20
DEFAULT_STATES = 2
HARNESS_MARK = "crashtest:"  # the harness's own marks; never shown to a check
START_MARK = HARNESS_MARK + "workload"
PLAN_FILE = "crashtest.json"
LOG_FILE = "writes.log"
BASE_FILE = "base.img"
COMMAND_SECONDS = 600.0  # hang guard for one command (setup, workload, recover, check)
OUTPUT_BYTES = 16 << 10  # of a failing command's output kept in the report

KINDS = ("check", "recover", "fsck", "unmountable", "error")


class CrashtestError(Exception):
    """The run could not be carried out (bad arguments, a failing workload or setup, a
    missing tool): not a verdict on any crash state."""


@dataclass
class Settings:
    workload: str
    check: str
    size: int = DEFAULT_SIZE
    fs: str = "ext4"
    setup: str | None = None
    recover: str | None = None
    states: int = DEFAULT_STATES
    seed: int = 0
    jobs: int = 1
    keep_going: bool = False
    mkfs_options: list[str] = field(default_factory=list)
    mount_options: str = ""
    atomic: int = DEFAULT_ATOMIC


@dataclass
class Failure:
    id: str
    kind: str  # check, recover, fsck, unmountable, error
    output: str


@dataclass
class Report:
    dir: str
    crash_points: int = 0
    planned: int = 0  # states in the plan
    states: int = 0  # states checked
    passed: int = 0
    failures: list[Failure] = field(default_factory=list)
    record_seconds: float = 0.0
    check_seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def unmountable(self) -> int:
        return sum(f.kind == "unmountable" for f in self.failures)

    @property
    def states_per_minute(self) -> float:
        return 60 * self.states / self.check_seconds if self.check_seconds else 0.0

    def replay_command(self, id: str) -> str:
        return f"blkfuse crashtest --dir {self.dir} --replay {id} --out {id}.img"

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": self.dir,
            "crash_points": self.crash_points,
            "planned": self.planned,
            "states": self.states,
            "passed": self.passed,
            "failed": self.failed,
            "unmountable": self.unmountable,
            "record_seconds": round(self.record_seconds, 3),
            "check_seconds": round(self.check_seconds, 3),
            "states_per_minute": round(self.states_per_minute, 1),
            "failures": [{**asdict(f), "replay": self.replay_command(f.id)} for f in self.failures],
        }


# -- commands -------------------------------------------------------------------------------


def _tail(text: str) -> str:
    return text if len(text) <= OUTPUT_BYTES else "...\n" + text[-OUTPUT_BYTES:]


def run_command(what: str, command: str, env: Mapping[str, str]) -> tuple[int, str]:
    """Run `command` with sh; (exit status, stdout and stderr together). A command still
    running after COMMAND_SECONDS counts as failed (status -1)."""
    try:
        r = subprocess.run(
            ["sh", "-c", command],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=COMMAND_SECONDS,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        return -1, _tail((out or "") + f"\n{what} did not finish in {COMMAND_SECONDS:g} s")
    return r.returncode, _tail(r.stdout)


# -- recording ------------------------------------------------------------------------------


def _plan_params(settings: Settings, start: int) -> dict[str, Any]:
    return {
        "fs": settings.fs,
        "size": settings.size,
        "seed": settings.seed,
        "atomic": settings.atomic,
        "states": settings.states,
        "start": start,
        "mount_options": settings.mount_options,
    }


def record(settings: Settings, workdir: Path) -> None:
    """Make the base image, run setup and workload on a recorded mount, write the plan's
    parameters. CrashtestError if any of it fails."""
    base = workdir / BASE_FILE
    with open(base, "wb") as f:
        f.truncate(settings.size)
    try:
        if settings.fs != "none":
            fsstack.mkfs(base, settings.fs, settings.mkfs_options)
    except MountError as e:
        raise CrashtestError(str(e)) from None
    rec = workdir / "record"
    (rec / "mnt").mkdir(parents=True)
    (rec / "fs").mkdir()
    image = rec / "disk.img"
    sparse_copy(str(base), str(image))
    log = workdir / LOG_FILE
    output = workdir / "workload.out"
    try:
        with Mount(image, rec / "mnt", options={"log-writes": str(log)}) as m:
            if settings.fs == "none":
                _run_workload(settings, m, "", output)
            else:
                with fsstack.filesystem(
                    m.image_path,
                    settings.fs,
                    rec / "fs",
                    make=False,
                    mount_options=settings.mount_options or None,
                ) as fs:
                    _run_workload(settings, m, str(fs.mountpoint), output)
    except MountError as e:
        raise CrashtestError(f"recording: {e}") from None
    image.unlink()
    _, entries = logwrites.read_log(log, data=False)
    # read to the end: the reader closes the log file when it is exhausted
    starts = [e.index for e in entries if e.is_mark and e.mark == START_MARK]
    start = starts[0] if starts else None
    if start is None:
        raise CrashtestError(f"{log}: the mark {START_MARK} is missing")
    (workdir / PLAN_FILE).write_text(json.dumps(_plan_params(settings, start), indent=1) + "\n")


def _run_workload(settings: Settings, m: Mount, fs: str, output: Path) -> None:
    env = {
        "BLKFUSE_FS": fs,
        "BLKFUSE_IMAGE": str(m.image_path),
        "BLKFUSE_CONTROL": str(m.control_path),
    }
    with open(output, "w") as out:
        if settings.setup:
            status, said = run_command("--setup", settings.setup, env)
            out.write(said)
            if status != 0:
                raise CrashtestError(f"--setup failed (exit status {status}):\n{said}")
        # What setup wrote is the starting point of every state: make it durable (through
        # the mount, so it is a flush in the log even when the filesystem sends none).
        if fs:
            fsstack.syncfs(fs)
        fd = os.open(m.image_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        m.ctl(f"mark {START_MARK}")
        status, said = run_command("--workload", settings.workload, env)
        out.write(said)
        if status != 0:
            raise CrashtestError(f"--workload failed (exit status {status}):\n{said}")


# -- the plan -------------------------------------------------------------------------------


def load_plan(workdir: Path) -> tuple[dict[str, Any], CrashPlan]:
    """The recorded run's parameters and its crash plan. CrashtestError if DIR has none."""
    params_file = workdir / PLAN_FILE
    try:
        params = json.loads(params_file.read_text())
    except FileNotFoundError:
        raise CrashtestError(f"{workdir}: no recorded run here ({PLAN_FILE} is missing)") from None
    except (OSError, ValueError) as e:
        raise CrashtestError(f"{params_file}: unreadable: {e}") from None
    try:
        superblock, entries = logwrites.read_log(workdir / LOG_FILE)
        plan = CrashPlan.from_log(
            entries,
            seed=params["seed"],
            atomic=params["atomic"],
            states_per_point=params["states"],
            start=params["start"],
            sector_size=superblock.sectorsize,
        )
    except (OSError, ValueError, KeyError) as e:
        raise CrashtestError(f"{workdir / LOG_FILE}: {e}") from None
    return params, plan


def replay(workdir: Path, id: str, out: Path) -> CrashState:
    """Write crash state `id` of the run recorded in `workdir` to `out`, byte for byte."""
    _, plan = load_plan(workdir)
    try:
        state = plan.state(id)
    except ValueError as e:
        raise CrashtestError(str(e)) from None
    build_image(plan, state, str(workdir / BASE_FILE), str(out))
    return state


# -- checking -------------------------------------------------------------------------------


def check_state(
    plan: CrashPlan, state: CrashState, params: Mapping[str, Any], settings: Settings, workdir: Path
) -> Failure | None:
    """Build, repair, mount and check one state; its Failure, or None if it passed."""
    here = workdir / "states" / state.id
    here.mkdir(parents=True, exist_ok=True)
    image = here / "disk.img"
    marks = here / "marks"
    try:
        build_image(plan, state, str(workdir / BASE_FILE), str(image))
        marks.write_text(
            "".join(f"{m}\n" for m in state.point.marks if not m.startswith(HARNESS_MARK))
        )
        env = {
            "BLKFUSE_IMAGE": str(image),
            "BLKFUSE_MARKS": str(marks),
            "BLKFUSE_CRASH_ID": state.id,
            "BLKFUSE_FS": "",
        }
        fs = params["fs"]
        if fs == "none":
            return _recover_and_check(state, settings, env)
        fsck = fsstack.FSCK.get(fs)
        if fsck is not None:
            cmd, fine = fsck
            r = subprocess.run(
                [*cmd, str(image)],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=COMMAND_SECONDS,
            )
            if r.returncode not in fine:
                return Failure(
                    state.id,
                    "fsck",
                    f"{' '.join(cmd)}: exit status {r.returncode}\n{_tail(r.stdout + r.stderr)}",
                )
        (here / "fs").mkdir(exist_ok=True)
        mounted = False
        try:
            with fsstack.filesystem(
                image,
                fs,
                here / "fs",
                make=False,
                mount_options=_check_mount_options(fs, params["mount_options"]),
                direct_io=False,
            ) as stack:
                mounted = True
                env["BLKFUSE_FS"] = str(stack.mountpoint)
                return _recover_and_check(state, settings, env)
        except MountError as e:
            if mounted:  # taking the stack down failed: the harness's problem, not the state's
                return Failure(state.id, "error", f"teardown: {e}")
            return Failure(state.id, "unmountable", str(e))
    finally:
        shutil.rmtree(here, ignore_errors=True)


def check_state_confirmed(
    plan: CrashPlan, state: CrashState, params: Mapping[str, Any], settings: Settings, workdir: Path
) -> Failure | None:
    """check_state, and an unmountable state once more from scratch: another program on the
    machine may detach a loop device it does not own (a stale `losetup -d NAME` after the
    name was reused) while a state is being mounted. Only a refusal that repeats on a fresh
    image and device is the state's."""
    failure = check_state(plan, state, params, settings, workdir)
    if failure is not None and failure.kind == "unmountable":
        failure = check_state(plan, state, params, settings, workdir)
    return failure


def _check_mount_options(fs: str, recorded: str) -> str | None:
    """The recorded run's mount options, plus what lets copies of one filesystem be mounted
    side by side (-j)."""
    options = [o for o in (recorded, fsstack.COPY_MOUNT_OPTIONS.get(fs, "")) if o]
    return ",".join(options) or None


def _recover_and_check(
    state: CrashState, settings: Settings, env: Mapping[str, str]
) -> Failure | None:
    if settings.recover:
        status, said = run_command("--recover", settings.recover, env)
        if status != 0:
            return Failure(state.id, "recover", f"--recover: exit status {status}\n{said}")
    status, said = run_command("--check", settings.check, env)
    if status != 0:
        return Failure(state.id, "check", f"--check: exit status {status}\n{said}")
    return None


def check_states(
    settings: Settings,
    workdir: Path,
    report: Report,
    progress: Callable[[Report, CrashState, Failure | None], None] | None = None,
) -> None:
    """Check every state of the recorded plan, `settings.jobs` at a time; without
    keep_going, stop starting new ones after the first failure."""
    params, plan = load_plan(workdir)
    states = list(plan.all_states())
    report.crash_points = len(plan.points)
    report.planned = len(states)
    order = {s.id: n for n, s in enumerate(states)}
    started = time.monotonic()
    pending = iter(states)
    running: dict[Future[Failure | None], CrashState] = {}
    stop = False
    with ThreadPoolExecutor(max_workers=max(1, settings.jobs)) as pool:
        while True:
            while not stop and len(running) < max(1, settings.jobs):
                state = next(pending, None)
                if state is None:
                    break
                running[
                    pool.submit(check_state_confirmed, plan, state, params, settings, workdir)
                ] = state
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                state = running.pop(future)
                try:
                    failure = future.result()
                except Exception as e:  # the harness itself failed on this state
                    failure = Failure(state.id, "error", f"{type(e).__name__}: {e}")
                report.states += 1
                if failure is None:
                    report.passed += 1
                else:
                    report.failures.append(failure)
                    stop = stop or not settings.keep_going
                if progress is not None:
                    progress(report, state, failure)
    report.failures.sort(key=lambda f: order[f.id])
    report.check_seconds = time.monotonic() - started


def crashtest(
    workload: str,
    check: str,
    *,
    dir: str | os.PathLike[str] | None = None,
    progress: Callable[[Report, CrashState, Failure | None], None] | None = None,
    **options: Any,
) -> Report:
    """Record `workload` and check every crash state with `check` (shell commands); the
    other keywords are Settings' (size=, fs=, setup=, recover=, states=, seed=, jobs=,
    keep_going=, mkfs_options=, mount_options=, atomic=). The run lives in `dir` (made if
    missing, must be empty), else in a temporary directory that is removed when every
    state passed. CrashtestError if the run cannot be carried out."""
    settings = Settings(workload=workload, check=check, **options)
    if settings.fs not in FILESYSTEMS:
        raise CrashtestError(
            f"unknown --fs {settings.fs!r} (choose one of {', '.join(FILESYSTEMS)})"
        )
    if settings.atomic < SECTOR or settings.atomic & (settings.atomic - 1):
        raise CrashtestError(
            f"atomic must be a power of two of at least {SECTOR}: {settings.atomic}"
        )
    if settings.jobs < 1 or settings.states < 0:
        raise CrashtestError("jobs must be at least 1 and states at least 0")
    if dir is None:
        workdir = Path(tempfile.mkdtemp(prefix="blkfuse-crashtest-"))
    else:
        workdir = Path(os.path.abspath(dir))
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            raise CrashtestError(f"{workdir}: not empty (give a new or empty --dir)")
    report = Report(str(workdir))
    started = time.monotonic()
    try:
        record(settings, workdir)
    except BaseException:
        if dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    report.record_seconds = time.monotonic() - started
    check_states(settings, workdir, report, progress)
    if dir is None and not report.failures:
        shutil.rmtree(workdir, ignore_errors=True)
    return report
