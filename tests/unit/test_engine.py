"""The rule engine alone: each observed QEMU fact that lives in the engine (oracle README)."""

import errno

import pytest
import trio

from blkfuse.engine.core import Engine, EngineError
from blkfuse.rules.events import DEFAULT_IOTYPES
from blkfuse.rules.model import InjectError, SetState

ALL_IO = ("read", "write", "write-zeroes", "discard", "flush")


def only(iotype):
    return frozenset({iotype})


def test_state_starts_at_1_and_none_arms_rules_before_any_request():  # fact 10
    engine = Engine([InjectError("none", errno=errno.ENOSPC)])
    assert engine.state == 1
    assert engine.event_counts["none"] == 1
    assert engine.check("read", 0, 512) == errno.ENOSPC


def test_active_rule_fails_every_io_type_until_replaced():  # fact 1
    engine = Engine([InjectError("read_aio")])
    engine.fire("read_aio")
    for iotype in ALL_IO:
        assert engine.check(iotype, 0, 512 if iotype != "flush" else 0) == errno.EIO
    assert engine.check("block-status", 0, 512) == 0  # fact 15


def test_active_set_replaced_only_by_an_event_that_arms_inject_rules():  # fact 1
    engine = Engine(
        [
            InjectError("read_aio", errno=1),
            SetState("write_aio", new_state=1),
            InjectError("pwritev", state=7, errno=2),
        ]
    )
    engine.fire("read_aio")
    engine.fire("write_aio")  # only a set-state rule: active set unchanged
    engine.fire("pwritev")  # inject rule of another state: unchanged
    assert engine.check("read", 0, 1) == 1
    engine.fire("flush_to_os")  # no rules at all
    assert engine.check("read", 0, 1) == 1


def test_state_gates_activation_only():  # fact 2
    engine = Engine([InjectError("read_aio", state=2), SetState("read_aio", state=2, new_state=3)])
    engine.set_state(2)
    engine.fire("read_aio")
    assert engine.state == 3
    assert engine.check("read", 0, 1) == errno.EIO  # armed in state 2, still active in 3


def test_rules_see_the_state_at_event_time():  # fact 3
    engine = Engine(
        [
            SetState("write_aio", state=1, new_state=2),
            SetState("write_aio", state=2, new_state=3),
            InjectError("write_aio", state=2),
        ]
    )
    engine.fire("write_aio")
    assert engine.state == 2
    assert engine.check("write", 0, 1) == 0  # not on the event that set state 2
    engine.fire("write_aio")
    assert engine.state == 3
    assert engine.check("write", 0, 1) == errno.EIO


def test_first_in_file_wins_for_inject_and_set_state():  # fact 4
    engine = Engine(
        [
            InjectError("read_aio", errno=28),
            InjectError("read_aio", errno=1),
            SetState("read_aio", new_state=5),
            SetState("read_aio", new_state=6),
        ]
    )
    engine.fire("read_aio")
    assert engine.state == 5
    assert engine.check("read", 0, 1) == 28


def test_sector_rule_tests_one_byte_and_never_matches_flush():  # fact 6
    engine = Engine([InjectError("none", sector=8)])
    assert engine.check("read", 4096, 512) == errno.EIO
    assert engine.check("read", 4096 + 511, 1) == 0
    assert engine.check("read", 3584, 512) == 0
    assert engine.check("read", 4608, 512) == 0
    assert engine.check("read", 0, 4097) == errno.EIO
    assert engine.check("flush", 0, 0) == 0


def test_errno_zero_passes_and_shadows_later_rules():  # fact 7
    engine = Engine([InjectError("none", errno=0, once=True), InjectError("none", errno=5)])
    for _ in range(3):
        assert engine.check("read", 0, 512) == 0
    assert len(engine.rules()) == 2  # a once rule with errno 0 stays


def test_once_removes_the_rule_forever():
    engine = Engine([InjectError("read_aio", once=True), SetState("read_aio", new_state=1)])
    engine.fire("read_aio")
    assert engine.check("read", 0, 1) == errno.EIO
    assert engine.check("read", 0, 1) == 0
    engine.fire("read_aio")
    assert engine.check("read", 0, 1) == 0
    # used up: never matched again, but listed as spent with its hit until removed
    assert [(r.kind, r.spent, r.hits) for r in engine.rules()] == [
        ("inject-error", True, 1),
        ("set-state", False, 2),
    ]
    engine.remove_rule(1)
    assert [r.kind for r in engine.rules()] == ["set-state"]


def test_iotype_filter_skips_a_rule_and_the_next_one_matches():
    engine = Engine(
        [InjectError("none", iotypes=only("write"), errno=1), InjectError("none", errno=2)]
    )
    assert engine.check("read", 0, 1) == 2
    assert engine.check("write", 0, 1) == 1
    assert DEFAULT_IOTYPES == frozenset(ALL_IO)


def test_first_match_priority_holds_across_sector_and_plain_rules():
    engine = Engine(
        [
            InjectError("none", sector=100, errno=1),
            InjectError("none", errno=2),
            InjectError("none", sector=2, errno=3),
        ]
    )
    assert engine.check("read", 0, 512) == 2  # rule 2 precedes rule 3
    assert engine.check("read", 100 * 512, 512) == 1  # rule 1 precedes rule 2


def test_counters():
    engine = Engine([InjectError("read_aio", errno=28)])
    engine.fire("read_aio")
    engine.check("read", 0, 1)
    engine.check("read", 0, 1)
    assert engine.event_counts["read_aio"] == 1
    assert engine.errors_injected == {28: 2}
    assert engine.rules()[0].hits == 2


def test_runtime_rules_add_remove_clear_state_reload():
    engine = Engine([InjectError("read_aio")])
    rule_id = engine.add_rule(InjectError("none", errno=28))
    assert rule_id == 2
    assert engine.check("write", 0, 1) == 28  # a `none` rule arms at once
    engine.remove_rule(rule_id)
    assert engine.check("write", 0, 1) == 0
    with pytest.raises(EngineError) as failure:
        engine.remove_rule(rule_id)
    assert failure.value.errno == errno.ENOENT
    engine.set_state(4)
    engine.replace_rules([InjectError("none", errno=1)])
    assert engine.state == 1 and engine.check("read", 0, 1) == 1
    engine.clear()
    assert engine.rules() == [] and engine.check("read", 0, 1) == 0


def test_100k_sector_rules_check_by_index():
    rules = [InjectError("none", sector=1_000_000 + i) for i in range(100_000)]
    engine = Engine(rules)
    assert engine.check("read", 0, 1 << 20) == 0
    assert engine.check("read", (1_000_000 + 77_777) * 512, 4096) == errno.EIO
    assert len(engine.active()) == 100_000


# ---- breakpoints (facts 13, 16) ----


def test_break_on_unknown_event_and_resume_unknown_tag_are_enoent():
    engine = Engine()
    for call in (
        lambda: engine.add_breakpoint("bogus_event", "A"),
        lambda: engine.resume("B"),
        lambda: engine.remove_breakpoint("B"),
    ):
        with pytest.raises(EngineError) as failure:
            call()
        assert failure.value.errno == errno.ENOENT


def test_breakpoint_suspends_after_the_events_rules_and_is_one_shot():
    engine = Engine([InjectError("write_aio", errno=28), SetState("write_aio", new_state=2)])
    engine.add_breakpoint("write_aio", "A")
    suspension = engine.fire("write_aio")
    assert suspension is not None and engine.is_suspended("A")
    assert engine.state == 2 and engine.check("read", 0, 1) == 28  # armed while suspended
    assert engine.fire("write_aio") is None  # one-shot
    engine.resume("A")
    assert suspension.done and not engine.is_suspended("A")


def test_two_breakpoints_on_one_event_need_both_resumes_in_any_order():
    engine = Engine()
    engine.add_breakpoint("read_aio", "A")
    engine.add_breakpoint("read_aio", "B")
    suspension = engine.fire("read_aio")
    assert engine.is_suspended("A") and engine.is_suspended("B")
    engine.resume("B")
    assert not suspension.done
    engine.resume("A")
    assert suspension.done


def test_remove_break_drops_breakpoint_and_wakes_suspended():
    engine = Engine()
    engine.add_breakpoint("read_aio", "A")
    engine.remove_breakpoint("A")
    assert engine.fire("read_aio") is None
    engine.add_breakpoint("read_aio", "A")
    suspension = engine.fire("read_aio")
    engine.remove_breakpoint("A")  # succeeds (QEMU 7.2 reports ENOENT here)
    assert suspension.done


def test_wait_break_blocks_until_suspended_and_times_out():
    async def main():
        engine = Engine()
        engine.add_breakpoint("write_aio", "A")
        order = []
        async with trio.open_nursery() as nursery:

            async def request():
                await trio.sleep(0.01)
                order.append("suspend")
                await engine.fire("write_aio").wait()
                order.append("resumed")

            nursery.start_soon(request)
            await engine.wait_break("A")
            order.append("waited")
            engine.resume("A")
        assert order == ["suspend", "waited", "resumed"]
        engine.add_breakpoint("read_aio", "T")
        with pytest.raises(EngineError) as failure:
            await engine.wait_break("T", 0.05)
        assert failure.value.errno == errno.ETIMEDOUT
        with pytest.raises(EngineError) as failure:
            await engine.wait_break("never-set")
        assert failure.value.errno == errno.ENOENT

    trio.run(main)


def test_resume_all_releases_everything():
    engine = Engine()
    engine.add_breakpoint("read_aio", "A")
    engine.add_breakpoint("write_aio", "B")
    suspension = engine.fire("read_aio")
    engine.resume_all()
    assert suspension.done and engine.breakpoints() == [] and engine.suspended() == []
