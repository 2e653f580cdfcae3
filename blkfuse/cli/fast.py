"""`blkfuse ctl` and `blkfuse status`: their work, and the fast path that runs it without click.

Users script these two in loops (a cut sent through the CLI landed late when every call paid
for click, trio and pyfuse3), so `blkfuse.cli.run` sends their plain forms here before
anything else is imported: `ctl MOUNTPOINT WORD...` and `status [--json] MOUNTPOINT`, no word
starting with "-". Anything else (options, --help, a missing argument) goes to the click
commands in ctl.py and status.py, which call the same functions below: one behavior, two ways
in. This module imports only the standard library's os/sys/json and blkfuse.client.
"""

import sys

from blkfuse.cli._common import control_failure, fail
from blkfuse.errors import ControlError


def ctl(mountpoint: str, words: tuple[str, ...] | list[str]) -> None:
    """Send the words, joined into one line, and print the answer (exit 1 on failure)."""
    from blkfuse.client import send

    try:
        answer = send(mountpoint, " ".join(words))
    except ControlError as e:
        fail(control_failure(e))
    if answer:
        _out(answer if answer.endswith("\n") else answer + "\n")


def status(mountpoint: str, as_json: bool, all_rules: bool = False) -> None:
    """Print the mount's status: the human text, or (as_json) the JSON document, as the
    daemon answers it (already indented: decoding and re-encoding 100,000 rules took
    seconds). The text lists the first rules only, unless all_rules."""
    if as_json or all_rules:
        from blkfuse.client import send

        try:
            answer = send(mountpoint, "status json" if as_json else "status rules=all")
        except ControlError as e:
            fail(control_failure(e))
        _out(answer)
        return
    from blkfuse.client import open_error, read_status

    try:
        text = read_status(mountpoint)
    except OSError as e:
        fail(open_error(mountpoint, e))
    _out(text)


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: list[str]) -> None:
    """Run `args` (the command line after `blkfuse`) and exit, if it is a plain ctl or status;
    else return, for the click group to parse it."""
    if not args or any(arg.startswith("-") for arg in args[1:] if arg != "--json"):
        return
    command, rest = args[0], args[1:]
    if command == "ctl" and len(rest) >= 2 and "--json" not in rest:
        ctl(rest[0], rest[1:])
    elif (
        command == "status" and rest.count("--json") <= 1 and len(rest) - rest.count("--json") == 1
    ):
        status(next(arg for arg in rest if arg != "--json"), "--json" in rest)
    else:
        return
    sys.exit(0)
