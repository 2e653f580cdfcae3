"""`blkfuse ctl MNT COMMAND...` and `blkfuse ctl MNT1 MNT2 ... -- COMMAND...`: send control
commands to one mount, or to several at once (blkfuse.client.fleet)."""

import json

import click

from blkfuse.cli import fast
from blkfuse.cli._common import fail


class _FleetCommand(click.Command):
    """Splits the arguments at the first `--` before click sees them (click drops it): the
    words before it are mountpoints, the words after it the command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            before, after = args[:at], args[at + 1 :]
            # an option that takes a value (--via signal) keeps its value with it
            valued = {
                name
                for p in self.params
                if isinstance(p, click.Option) and not p.is_flag
                for name in p.opts
            }
            options, mountpoints = [], []
            words = iter(before)
            for word in words:
                if word.startswith("-"):
                    options.append(word)
                    value = next(words, None) if word in valued else None
                    if value is not None:
                        options.append(value)
                else:
                    mountpoints.append(word)
            ctx.meta["blkfuse.fleet"] = mountpoints
            args = [*options, "--", *after]
        return super().parse_args(ctx, args)


@click.command(
    "ctl",
    cls=_FleetCommand,
    context_settings={"ignore_unknown_options": True},
    epilog="""\b
Examples:
  blkfuse ctl /mnt/faulty inject-error event=write_aio errno=ENOSPC once=on
  blkfuse ctl /mnt/faulty wait_hit 1 30      # until rule 1 fires (exit 1 after 30 s)
  blkfuse ctl /mnt/faulty break read_aio A
  blkfuse ctl /mnt/faulty help
  blkfuse ctl /mnt/n1 /mnt/n2 /mnt/n3 -- powercut keep=random seed=7
  blkfuse ctl /mnt/n1 /mnt/n2 /mnt/n3 -- poweron""",
)
@click.option(
    "--json", "as_json", is_flag=True, help="With several mounts: print the outcome as JSON."
)
@click.option(
    "--via",
    type=click.Choice(["signal", "fifo", "write"]),
    default="fifo",
    show_default=True,
    help="With several mounts, how a powercut reaches them: armed through each control file, "
    "then fired by one write to a FIFO every daemon watches (fifo) or by SIGUSR2 to each "
    "daemon (signal), so cuts land together even on busy mounts; or the powercut line "
    "written to every control file (write: queued behind each mount's own requests).",
)
@click.argument("words", nargs=-1, required=True, metavar="MOUNTPOINT COMMAND...")
@click.pass_context
def command(ctx: click.Context, as_json: bool, via: str, words: tuple[str, ...]) -> None:
    """Send COMMAND to the mount at MOUNTPOINT and print its answer; or, after `--`, to
    every mount named before it, at once.

    COMMAND's words are joined into one line (`blkfuse ctl /mnt break write_aio A`); an
    argument holding newlines sends several lines in one write, applied only if all are valid.
    `blkfuse ctl /mnt help` lists the commands. On failure the daemon's message is printed
    and the exit status is 1.

    Several mounts (`blkfuse ctl MNT1 MNT2 ... -- COMMAND`): every control file is opened
    first, then the writes go out together (one thread per mount, released at once); each
    mount's answer is printed after its name, and the exit status is 1 if any failed. A
    `powercut` gets one seed (its seed=N, or a random one, printed); node i (0-based, in the
    order given) cuts with the first 4 bytes of SHA-256("N:i") as its seed, named in its
    answer. The cut is armed on every mount (powercut-arm; if any refuses, none is cut),
    then fired by one write to a FIFO they all watch (--via signal: SIGUSR2 to each
    daemon; --via write: the powercut line itself is written, as any command). After a cut
    the spread of the daemons' power-off stamps is printed.
    """
    fleet = ctx.meta.get("blkfuse.fleet")
    if fleet is None:
        if as_json:
            fail("--json is for several mounts: blkfuse ctl MNT1 MNT2 ... -- COMMAND")
        mountpoint, *rest = words
        if not rest:
            fail(f"no command for {mountpoint} (blkfuse ctl MNT COMMAND...; try: help)")
        fast.ctl(mountpoint, rest)  # the plain form of this command runs there without click
        return
    if not fleet:
        fail("no mountpoint before `--` (blkfuse ctl MNT1 MNT2 ... -- COMMAND)")
    from blkfuse.client.fleet import send_to

    try:
        result = send_to(fleet, " ".join(words), via=via)
    except ValueError as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
    else:
        click.echo(result.text(), nl=False)
    if not result.ok:
        raise SystemExit(1)
