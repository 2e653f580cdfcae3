"""One answer for one mistake: errnos and messages agree across commands, `blkfuse check`, the
CLI's help and README."""

import errno
import re

import pytest
import trio
from click.testing import CliRunner

from blkfuse.cli import SUBCOMMANDS, main
from blkfuse.daemon.control import Control, ControlError
from blkfuse.engine.core import Engine

from conftest import blkfuse


def control_error(text: str) -> ControlError:
    control = Control(Engine())

    async def go():
        with pytest.raises(ControlError) as info:
            await control.execute(text)
        return info.value

    return trio.run(go)


def control_answer(text: str) -> str:
    return trio.run(Control(Engine()).execute, text)


def test_an_unknown_event_is_enoent_with_one_message_in_every_command():
    messages = set()
    for text in (
        "break read_aoi A",
        "inject-error event=read_aoi",
        "set-state event=read_aoi new_state=2",
        "inject_error event=read_aoi",
    ):
        e = control_error(text)
        assert e.errno == errno.ENOENT, (text, e.message)
        messages.add(e.message)
    assert messages == {'line 1: unknown event "read_aoi" (did you mean "read_aio"?)'}


def test_other_bad_rule_values_stay_einval():
    assert control_error("inject-error event=read_aio errno=EWHAT").errno == errno.EINVAL
    assert control_error("inject-error evnt=read_aio").errno == errno.EINVAL


def test_runtime_rules_say_never_fires_and_warn_on_a_missing_new_state():
    note = '(never fires: no request through a blkfuse mount raises "l2_load")'
    assert note in control_answer("inject-error event=l2_load")
    assert note in control_answer("set-state event=l2_load new_state=2")
    assert note in control_answer("break l2_load A")
    assert "new_state is 0" in control_answer("set-state event=read_aio")
    assert control_answer("set-state event=read_aio new_state=2") == "added rule 1\n"


def test_check_without_a_path_and_its_warnings():
    r = CliRunner().invoke(main, ["check", "-o", "set-state.0.event=write_aio,growable=on"])
    assert r.exit_code == 0, r.output
    assert (
        "-o set-state.0: set-state event=write_aio new_state=0 (warning: new_state is 0" in r.output
    )
    assert "growable=on (not portable" in r.output
    r = CliRunner().invoke(main, ["check"])
    assert r.exit_code == 1 and "PATH, -o options, or both" in r.output


@pytest.mark.parametrize("args", [[]] + [[name] for name in SUBCOMMANDS])
def test_every_help_has_an_example(args):
    r = CliRunner().invoke(main, [*args, "--help"])
    assert r.exit_code == 0, r.output
    assert "Examples:\n" in r.output
    example = re.search(r"Examples:\n\s+(blkfuse \S+)", r.output).group(1)
    assert example.split()[1] in SUBCOMMANDS


def test_ctl_help_and_usage_name_the_same_thing():
    r = CliRunner().invoke(main, ["ctl", "--help"])
    usage = r.output.splitlines()[0]
    assert usage == "Usage: main ctl [OPTIONS] MOUNTPOINT COMMAND..."
    assert "Send COMMAND" in r.output and "WORDS" not in r.output


def test_an_unknown_event_through_a_mount(mount):
    m = mount()
    for words in (["break", "nope", "A"], ["inject-error", "event=nope"]):
        r = blkfuse("ctl", m.mnt, *words)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == 'blkfuse: line 1: unknown event "nope" (did you mean "none"?) [ENOENT]\n'
    assert m.status()["rules"] == []
