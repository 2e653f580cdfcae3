"""`blkfuse crashtest`: record a workload once, check every crash state (blkfuse.crash.harness)."""

import hashlib
import json
import shlex
import sys
from pathlib import Path

import click

from blkfuse.client.api import parse_size
from blkfuse.crash.harness import (
    DEFAULT_STATES,
    FILESYSTEMS,
    HARNESS_MARK,
    CrashtestError,
    Failure,
    Report,
    crashtest,
    replay,
)
from blkfuse.crash.states import CrashState

EPILOG = """\b
The workload and the check are shell commands. They get:
  BLKFUSE_FS       the mounted filesystem (empty with --fs none)
  BLKFUSE_IMAGE    the disk image (with --fs none, the workload's I/O goes here)
  BLKFUSE_CONTROL  (workload) the control file: write `mark ack:17` to it when
                   the workload has acknowledged something to its client
  BLKFUSE_MARKS    (check, recover) a file with the marks before the crash
                   point, one per line: what was acknowledged
  BLKFUSE_CRASH_ID (check, recover) the crash state's ID, e.g. p17-s3

\b
Crash points: at every flush (in flight: what it is to cover written, not
yet durable), after every FUA write and after every mark. At each point every
write a completed flush covered is kept; of the writes since: state s0 loses
them all, s1..sN each lose, keep or tear (at --atomic bytes) every one of
them by a seeded coin.
Each state is built, fsck'd (ext4; exit 0 and 1 are fine), mounted, then
--recover and --check run; check exit 0 means consistent.

\b
Examples:
  blkfuse crashtest --fs ext4 --states 4 -j 2 --dir /tmp/ct \\
      --setup 'python3 app.py init' --workload 'python3 app.py run' \\
      --check 'python3 app.py check'
  blkfuse crashtest --dir /tmp/ct --replay p17-s3 --out p17-s3.img

Exit status: 0 every state passed, 1 a state failed, 2 the run could not be
carried out (usage, a failing setup or workload, a missing tool)."""


def _usage(message: str) -> click.UsageError:
    return click.UsageError(message)


class _Bar:
    """One progress line on stderr, redrawn in place (only on a terminal)."""

    WIDTH = 30

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()

    def __call__(self, report: Report, state: CrashState, failure: Failure | None) -> None:
        if not self.live:
            return
        total = max(report.planned, 1)
        full = self.WIDTH * report.states // total
        bar = "#" * full + "." * (self.WIDTH - full)
        click.echo(
            f"\r[{bar}] {report.states}/{report.planned} states, {report.failed} failed",
            err=True,
            nl=False,
        )

    def end(self) -> None:
        if self.live:
            click.echo("", err=True)


def summary(report: Report) -> str:
    heads = ("crash points", "states", "passed", "failed", "unmountable", "states/min")
    values = (
        report.crash_points,
        report.states,
        report.passed,
        report.failed,
        report.unmountable,
        f"{report.states_per_minute:.1f}",
    )
    widths = [max(len(h), len(str(v))) for h, v in zip(heads, values, strict=True)]
    return "\n".join(
        "  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True))
        for row in (heads, values)
    )


@click.command("crashtest", epilog=EPILOG)
@click.option("--workload", metavar="CMD", help="The program whose crash states are checked.")
@click.option("--check", metavar="CMD", help="Exit 0 if the state is consistent.")
@click.option("--setup", metavar="CMD", help="Runs before the workload; its writes are durable.")
@click.option("--recover", metavar="CMD", help="Runs on each state before --check.")
@click.option(
    "--size", metavar="SIZE", default="256M", show_default=True, help="Size of the image."
)
@click.option(
    "--fs",
    type=click.Choice(FILESYSTEMS),
    default="ext4",
    show_default=True,
    help="The filesystem on a loop device over the mount; none: the workload uses the image.",
)
@click.option("--mkfs-options", metavar="ARGS", default="", help="More mkfs arguments.")
@click.option(
    "--mount-options",
    metavar="OPTS",
    default="",
    help="Mount options of the filesystem (e.g. barrier=0 for a negative control).",
)
@click.option(
    "--states",
    type=click.IntRange(0),
    default=DEFAULT_STATES,
    show_default=True,
    help="Seeded random states per crash point, besides the one that loses every unflushed write.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random states.")
@click.option(
    "--atomic",
    metavar="BYTES",
    default="512",
    show_default=True,
    help="Bytes a write is torn at (a power of two, at least 512).",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="States checked at once.",
)
@click.option(
    "--dir",
    "workdir",
    metavar="DIR",
    help="Keep the run here (base image, write log): what --replay needs. Default: a temporary "
    "directory, kept only if a state failed.",
)
@click.option("--json", "json_file", metavar="FILE", help="Write the report as JSON (- : stdout).")
@click.option(
    "--keep-going", is_flag=True, help="Check every state, not only up to the first failure."
)
@click.option("--replay", metavar="ID", help="Rebuild crash state ID of the run in --dir.")
@click.option("--out", metavar="IMAGE", help="Where --replay writes the image.")
def command(
    workload: str | None,
    check: str | None,
    setup: str | None,
    recover: str | None,
    size: str,
    fs: str,
    mkfs_options: str,
    mount_options: str,
    states: int,
    seed: int,
    atomic: str,
    jobs: int,
    workdir: str | None,
    json_file: str | None,
    keep_going: bool,
    replay: str | None,
    out: str | None,
) -> None:
    """Record a workload's writes once, then check every crash state it could leave."""
    if replay is not None:
        if workdir is None or out is None:
            raise _usage("--replay needs --dir DIR (a recorded run) and --out IMAGE")
        if workload or check or setup or recover:
            raise _usage("--replay rebuilds a state of a recorded run: no --workload/--check")
        _replay(Path(workdir), replay, Path(out))
        return
    if not workload or not check:
        raise _usage("give --workload CMD and --check CMD (or --dir DIR --replay ID --out IMAGE)")
    if out is not None:
        raise _usage("--out goes with --replay")
    try:
        size_bytes = parse_size(size)
        atomic_bytes = parse_size(atomic)
    except ValueError as e:
        raise _usage(str(e)) from None
    bar = _Bar()
    click.echo("recording the workload...", err=True)
    try:
        report = crashtest(
            workload,
            check,
            dir=workdir,
            progress=bar,
            setup=setup,
            recover=recover,
            size=size_bytes,
            fs=fs,
            mkfs_options=shlex.split(mkfs_options),
            mount_options=mount_options,
            states=states,
            seed=seed,
            atomic=atomic_bytes,
            jobs=jobs,
            keep_going=keep_going,
        )
    except (CrashtestError, ValueError) as e:
        bar.end()
        click.echo(f"blkfuse crashtest: {e}", err=True)
        sys.exit(2)
    bar.end()
    click.echo(summary(report))
    if report.failures:
        first = report.failures[0]
        click.echo(f"\nfirst failure: {first.id} ({first.kind})")
        click.echo(first.output.rstrip())
        click.echo(f"\nrebuild it: {report.replay_command(first.id)}")
        if report.states < report.planned:
            click.echo(
                f"stopped after the first failure ({report.states} of {report.planned} states "
                "checked; --keep-going checks them all)"
            )
    if json_file is not None:
        text = json.dumps(report.to_json(), indent=2) + "\n"
        if json_file == "-":
            click.echo(text, nl=False)
        else:
            Path(json_file).write_text(text)
    sys.exit(1 if report.failures else 0)


def _replay(workdir: Path, id: str, out: Path) -> None:
    try:
        state = replay(workdir, id, out)
    except CrashtestError as e:
        click.echo(f"blkfuse crashtest: {e}", err=True)
        sys.exit(2)
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    point = state.point
    where = "at the flush in flight" if point.reason == "flush" else f"after the {point.reason}"
    marks = [m for m in point.marks if not m.startswith(HARNESS_MARK)]
    last = f"last mark before it: {marks[-1]}" if marks else "no mark before it"
    click.echo(
        f"{out}: crash state {id} ({where}, log entry {point.entry}; {point.flushed} flushed "
        f"writes, {len(point.volatile)} unflushed; {last}); sha256 {digest.hexdigest()}"
    )
