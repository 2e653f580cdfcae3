"""The control-file language against a real engine, without FUSE."""

import errno
import json

import pytest
import trio
from hypothesis import given, settings, strategies as st

from blkfuse.daemon.control import Control, ControlError, json_document, parse
from blkfuse.engine.core import Engine, Request
from blkfuse.rules import config
from blkfuse.rules.model import InjectError, SetState


def run(coro_fn, *args):
    return trio.run(coro_fn, *args)


def make(rules=(), reload=None):
    engine = Engine(list(rules))
    return engine, Control(engine, reload=reload)


def snapshot(engine):
    return (
        engine.state,
        [config.format_rule(r) for r in engine.rules()],
        [r.id for r in engine.active()],
        engine.breakpoints(),
    )


def fails(control, text, err):
    async def go():
        with pytest.raises(ControlError) as info:
            await control.execute(text)
        return info.value

    e = run(go)
    assert e.errno == err, e.message
    return e


def ok(control, text):
    async def go():
        return await control.execute(text)

    return run(go)


# ---- parsing ------------------------------------------------------------------------------


def test_blank_lines_and_comments_are_ignored():
    assert parse("\n   \n# a comment\n  # another\n") == []
    cmds = parse("break read_aio A   # trailing comment\n\nresume A\n")
    assert [(n, c.name) for n, c, _ in cmds] == [(1, "break"), (3, "resume")]


def test_dotted_event_alias_is_accepted():
    [(_, cmd, args)] = parse("break pwritev_rmw.head T")
    assert cmd.name == "break"
    assert args == ("pwritev_rmw_head", "T")


def test_every_command_has_usage_help_and_a_parser():
    from blkfuse.daemon.control import COMMANDS, commands, help_text

    text = help_text()
    for c in commands():
        assert c.usage.split()[0] == c.name
        assert c.usage in text and c.summary.splitlines()[0] in text
        for alias in c.aliases:
            assert COMMANDS[alias] is c


@pytest.mark.parametrize(
    "text, err, words",
    [
        ("frobnicate", errno.EINVAL, "unknown command"),
        ("break read_aio", errno.EINVAL, "usage: break EVENT TAG"),
        ("break read_aoi A", errno.ENOENT, "unknown event"),
        ("resume", errno.EINVAL, "usage"),
        ("wait_break A soon", errno.EINVAL, "timeout"),
        ("wait_break A -1", errno.EINVAL, "timeout"),
        ("remove x", errno.EINVAL, "rule id"),
        ("state -2", errno.EINVAL, "negative"),
        ("clear now", errno.EINVAL, "clear"),
        ("inject-error", errno.EINVAL, "usage"),
        ("inject-error event=read_aio errno=EWHAT", errno.EINVAL, "errno"),
        ("inject-error event=nope", errno.ENOENT, "nope"),
        ("set-state event=read_aio colour=blue", errno.EINVAL, "colour"),
        ('break read_aio "A', errno.EINVAL, "quotation"),
    ],
)
def test_invalid_lines(text, err, words):
    engine, control = make()
    e = fails(control, "# first\n" + text, err)
    assert e.message.startswith("line 2: ")
    assert words in e.message
    assert control.last_error == e.message
    assert control.status_dict()["last_error"] == e.message
    assert words in control.status_text()


def test_one_bad_line_applies_nothing():
    engine, control = make([InjectError("read_aio")])
    before = snapshot(engine)
    text = (
        "inject-error event=write_aio errno=ENOSPC\n"
        "break write_aio A\n"
        "state 7\n"
        "clear\n"
        "inject-error event=read_aio sector=banana\n"
    )
    e = fails(control, text, errno.EINVAL)
    assert e.message.startswith("line 5:")
    assert snapshot(engine) == before


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "inject-error event=read_aio errno=28",
                "set-state event=write_aio new_state=2",
                "break read_aio T",
                "state 3",
                "clear",
                "# comment",
                "",
            ]
        ),
        max_size=6,
    ),
    st.sampled_from(
        [
            "bogus",
            "state x",
            "break nonesuch T",
            "inject-error event=read_aio once=maybe",
            "remove",
            "wait_break",
        ]
    ),
    st.integers(0, 6),
)
def test_any_invalid_line_leaves_everything_as_it_was(good, bad, where):
    engine, control = make([InjectError("read_aio", sector=3), SetState("none", new_state=2)])
    before = snapshot(engine)
    lines = list(good)
    lines.insert(min(where, len(lines)), bad)
    fails(control, "\n".join(lines), errno.ENOENT if "nonesuch" in bad else errno.EINVAL)
    assert snapshot(engine) == before


# ---- commands -----------------------------------------------------------------------------


def test_inject_error_reports_its_id():
    engine, control = make([InjectError("read_aio")])
    ok(control, 'inject-error event=write_aio errno="ENOSPC" sector=8 once=on')
    assert control.last_result == "added rule 2"
    rule = engine.rules()[-1]
    assert (rule.id, rule.event, rule.errno, rule.sector, rule.once, rule.source) == (
        2,
        "write_aio",
        errno.ENOSPC,
        8,
        True,
        "control",
    )
    d = control.status_dict()
    assert d["rules"][-1]["id"] == 2 and d["rules"][-1]["errno_name"] == "ENOSPC"
    assert "added rule 2" in control.status_text()
    assert "errno=28 sector=8 once=on" in control.status_text()


def test_set_state_state_remove_clear():
    engine, control = make()
    ok(control, "set-state event=read_aio state=1 new_state=5\nstate 4")
    assert engine.state == 4
    assert engine.rules()[0].new_state == 5
    ok(control, "remove 1")
    assert engine.rules() == []
    ok(control, "inject-error event=none\ninject-error event=read_aio")
    assert [r.id for r in engine.active()] == [2]
    ok(control, "clear")
    assert engine.rules() == [] and engine.active() == []
    assert control.last_result == "removed 2 rules"


def test_runtime_failure_stops_at_its_line_and_keeps_earlier_lines():
    engine, control = make()
    e = fails(control, "state 9\nresume NOPE\nstate 10", errno.ENOENT)
    assert e.message.startswith("line 2:") and "NOPE" in e.message
    assert "lines before it were applied" in e.message
    assert engine.state == 9  # line 1 done, line 3 not run
    fails(control, "remove 42", errno.ENOENT)
    fails(control, "remove_break X", errno.ENOENT)


def test_break_on_an_event_the_mount_never_raises_is_accepted_with_a_note():
    engine, control = make()
    ok(control, "break l2_load X")
    assert engine.breakpoints() == [("l2_load", "X")]
    assert "never" in control.last_result or "no request" in control.last_result


def test_wait_break_times_out():
    engine, control = make()
    ok(control, "break write_aio A")
    e = fails(control, "wait_break A 0.01", errno.ETIMEDOUT)
    assert "A" in e.message


def test_wait_break_without_such_breakpoint_is_enoent():
    engine, control = make()
    fails(control, "wait_break A 5", errno.ENOENT)


def test_breakpoint_suspend_status_resume():
    engine, control = make()
    order = []

    async def request():
        s = engine.fire("write_aio", Request("write", 4096, 512))
        assert s is not None
        await s.wait()
        order.append("request done")

    async def main():
        await control.execute("break write_aio A")
        async with trio.open_nursery() as n:
            n.start_soon(request)
            await control.execute("wait_break A")
            d = control.status_dict()
            [s] = d["suspended"]
            assert (s["tags"], s["event"], s["op"], s["offset"], s["length"]) == (
                ["A"],
                "write_aio",
                "write",
                4096,
                512,
            )
            assert "A at write_aio: write offset=4096 length=512" in control.status_text()
            order.append("resuming")
            await control.execute("resume A")
        assert control.status_dict()["suspended"] == []

    trio.run(main)
    assert order == ["resuming", "request done"]


def test_close_fails_pending_wait_break_and_new_commands():
    engine, control = make()

    async def main():
        await control.execute("break read_aio A")
        async with trio.open_nursery() as n:
            result = {}

            async def waiter():
                try:
                    await control.execute("wait_break A")
                except ControlError as e:
                    result["errno"] = e.errno

            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            control.close()
        assert result["errno"] == errno.ESHUTDOWN
        with pytest.raises(ControlError) as info:
            await control.execute("state 2")
        assert info.value.errno == errno.ESHUTDOWN

    import trio.testing  # noqa: F401

    trio.run(main)


def test_reload_replaces_rules_and_a_bad_config_keeps_the_old_ones():
    current = {"rules": [InjectError("read_aio", errno=errno.ENOSPC)]}

    def reload():
        if isinstance(current["rules"], Exception):
            raise current["rules"]
        return list(current["rules"])

    engine, control = make([InjectError("write_aio")], reload=reload)
    ok(control, "state 5\nreload")
    assert [(r.event, r.errno) for r in engine.rules()] == [("read_aio", errno.ENOSPC)]
    assert engine.state == 1
    before = snapshot(engine)
    current["rules"] = config.ConfigError('rules.conf:3: unknown event "x"')
    e = fails(control, "reload", errno.EINVAL)
    assert 'rules.conf:3: unknown event "x"' in e.message and "old rules kept" in e.message
    assert snapshot(engine) == before


def test_reload_without_a_source_is_einval():
    engine, control = make()
    fails(control, "reload", errno.EINVAL)


def test_help_and_status_answers():
    engine, control = make()
    assert "wait_break TAG [SECONDS]" in ok(control, "help")
    d = json.loads(ok(control, "status json"))
    assert d["state"] == 1
    assert ok(control, "status").startswith(control.status_text().splitlines()[0])


def test_status_dict_is_json_and_stable():
    engine, control = make(
        [InjectError("read_aio", errno=errno.ENOSPC), SetState("read_aio", new_state=3)]
    )
    engine.fire("read_aio", Request("read", 0, 512))
    assert engine.check("read", 0, 512) == errno.ENOSPC
    d = json.loads(json.dumps(control.status_dict()))
    assert set(d) == {
        "info",
        "state",
        "rules",
        "rule_count",
        "active",
        "active_count",
        "breakpoints",
        "suspended",
        "waiting",
        "waiting_hits",
        "events",
        "seed",
        "rules_healed",
        "held_by_delay",
        "held",
        "errors_injected",
        "interrupted",
        "last_result",
        "last_error",
        "last_error_errno",
        "power",
        "power_off_at",
        "unsynced",
        "last_cut",
        "armed",
        "log_writes",
        "backing_reads",
    }
    assert d["state"] == 3
    assert d["events"] == {"read_aio": 1, "none": 1}
    assert d["errors_injected"] == [{"errno": errno.ENOSPC, "name": "ENOSPC", "count": 1}]
    assert d["rules"][0]["hits"] == 1 and d["rules"][1]["kind"] == "set-state"
    assert isinstance(d["info"]["pid"], int)
    text = control.status_text()
    assert "ENOSPC(28)=1" in text and "read_aio=1" in text and "state: 3" in text
    assert "hits=1" in text


def test_misspelt_command_and_event_suggest_the_closest_name():
    engine, control = make()
    assert 'did you mean "break"' in fails(control, "brek write_aio A", errno.EINVAL).message
    assert 'did you mean "write_aio"' in fails(control, "break write_aoi A", errno.ENOENT).message
    assert 'try "help"' in fails(control, "xyzzy", errno.EINVAL).message
    assert "xyzzy" in control.status_text()  # the last error stays readable


def test_text_status_caps_the_rule_list_and_json_lists_all():
    engine, control = make([InjectError("none", sector=1000 + i) for i in range(300)])
    text = control.status_text()
    assert "rules: 300" in text and "... 100 more" in text and "(300 rules)" in text
    assert text.count("inject-error event=none") == 200
    assert len(json.loads(run(control.execute, "status json"))["rules"]) == 300


def test_status_rules_word_lists_as_many_rules_as_asked():
    engine, control = make([InjectError("none", sector=1000 + i) for i in range(300)])
    text = ok(control, "status rules=all")
    assert text.count("inject-error event=none") == 300 and " more" not in text
    assert "active: " + " ".join(str(i) for i in range(1, 301)) + "\n" in text
    assert ok(control, "status rules=5").count("inject-error event=none") == 5
    assert "... 295 more, not listed here (`blkfuse status --all MNT`" in ok(
        control, "status rules=5"
    )
    brief = json.loads(ok(control, "status json rules=0"))
    assert brief["rules"] == [] and brief["active"] == []
    assert brief["rule_count"] == brief["active_count"] == 300
    whole = json.loads(ok(control, "status json"))
    assert {k: v for k, v in brief.items() if k not in ("rules", "active")} == {
        k: v for k, v in whole.items() if k not in ("rules", "active")
    }
    first = json.loads(ok(control, "status json rules=2"))
    assert first["rules"] == whole["rules"][:2] and first["active"] == [1, 2]
    assert json.loads(ok(control, "status json rules=all")) == whole
    for bad in (
        "status rules=x",
        "status rules=-1",
        "status jsn",
        "status json all",
        "status rules=1 json",
    ):
        assert "rules=" in fails(control, bad, errno.EINVAL).message  # usage, or what is wrong


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200)
@given(
    st.dictionaries(st.text(), _json_values, max_size=4),
    st.lists(st.dictionaries(st.text(), _json_values, max_size=3), max_size=3),
    st.lists(st.integers(), max_size=3),
)
def test_json_document_is_the_status_as_json(rest, rules, active):
    status = {**rest, "rules": rules, "active": active}
    text = json_document(status)
    assert json.loads(text) == json.loads(json.dumps(status))
    assert list(json.loads(text)) == list(status)  # the keys in the status's order
    assert text.count("\n") >= len(rules)  # a rule a line


@pytest.mark.parametrize(
    "line, timeout",
    [
        ("wait_break W 2.5", 2.5),
        ("wait_break W 500ms", 0.5),
        ("wait_break W 10m", 600.0),
        ("wait_break W 1h30m", 5400.0),
        ("wait_hit 3 1m hits=2", 60.0),
    ],
)
def test_timeouts_take_seconds_or_a_duration_with_its_unit(line, timeout):
    [(_, _, args)] = parse(line)
    assert timeout in args


@pytest.mark.parametrize(
    "word, why",
    [
        ("soon", "expects a duration with a unit"),
        ("1m30", "expects a duration with a unit"),
        ("25h", "too long"),
        ("-1", ">= 0"),
    ],
)
def test_a_bad_timeout_says_what_is_wrong(word, why):
    with pytest.raises(ControlError) as e:
        parse(f"wait_break W {word}")
    assert e.value.errno == errno.EINVAL
    assert "timeout" in e.value.message and why in e.value.message
    assert "seconds" in e.value.message
