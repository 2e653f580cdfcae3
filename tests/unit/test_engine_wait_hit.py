"""wait_hit and spent rules in the engine alone (no FUSE): when a wait returns, when it fails."""

import errno

import pytest
import trio
import trio.testing

from blkfuse.engine.core import Engine, EngineError
from blkfuse.engine.effects import Effect
from blkfuse.rules.config import parse_rule_args
from blkfuse.rules.model import InjectError, SetState


def run_with_waiter(engine, rule_id, timeout, poke, hits=None):
    """Start wait_hit(rule_id, timeout, hits), let it park (or return), run poke(engine),
    return its result or the EngineError it raised."""
    box = {}

    async def main():
        async def waiter():
            try:
                box["hits"] = await engine.wait_hit(rule_id, timeout, hits)
            except EngineError as e:
                box["error"] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            poke(engine)

    trio.run(main)
    return box


def test_wait_hit_returns_when_an_inject_rule_fails_a_request():
    engine = Engine([InjectError("read_aio", errno=5)])
    engine.fire("read_aio")
    engine.check("read", 0, 512)  # a hit before the wait: not counted
    assert run_with_waiter(engine, 1, None, lambda e: e.check("read", 0, 512)) == {"hits": 2}


def test_wait_hit_counts_set_state_changes_and_once_rules_end_spent():
    engine = Engine(
        [
            SetState("write_aio", state=1, new_state=2),
            InjectError("write_aio", state=2, errno=28, once=True),
        ]
    )
    assert run_with_waiter(engine, 1, None, lambda e: e.fire("write_aio")) == {"hits": 1}
    engine.fire("write_aio")  # state 2: arms rule 2
    assert run_with_waiter(engine, 2, None, lambda e: e.check("write", 0, 1)) == {"hits": 1}
    [_, spent] = engine.rules()
    assert spent.spent and spent.hits == 1
    engine.fire("write_aio")  # a spent rule is never armed again
    assert engine.check("write", 0, 1) == 0
    # a wait on the spent rule: its last act has happened, so the wait is over at once
    assert run_with_waiter(engine, 2, None, lambda e: None) == {"hits": 1}
    box = run_with_waiter(engine, 2, None, lambda e: None, hits=2)  # a count it cannot reach
    assert box["error"].errno == errno.ENOENT and "spent" in box["error"].message


def test_wait_hit_errors():
    engine = Engine([InjectError("read_aio")])
    box = run_with_waiter(engine, 7, None, lambda e: None)
    assert box["error"].errno == errno.ENOENT and "no rule with id 7" in box["error"].message
    box = run_with_waiter(engine, 1, 0.01, lambda e: None)
    assert box["error"].errno == errno.ETIMEDOUT
    box = run_with_waiter(engine, 1, None, lambda e: e.remove_rule(1))
    assert box["error"].errno == errno.ENOENT and "removed" in box["error"].message
    engine.add_rule(InjectError("read_aio"))
    box = run_with_waiter(engine, 2, None, lambda e: e.clear())
    assert box["error"].errno == errno.ENOENT


def test_a_spent_rule_can_be_removed_and_clear_counts_it():
    engine = Engine([InjectError("none", once=True)])
    assert engine.check("read", 0, 1) == errno.EIO
    assert [r.spent for r in engine.rules()] == [True]
    engine.remove_rule(1)
    assert engine.rules() == []
    with pytest.raises(EngineError):
        engine.remove_rule(1)


def delay_rule(*words):
    return parse_rule_args("inject-error", ["event=none", "iotype=write", *words], source="t")


def test_a_wait_issued_after_a_count_1_delay_began_its_hold_returns_at_once():
    """The race of issue #22: the hold has begun (the rule is spent) before the wait is
    issued. The act the user waits for has begun, so the wait is over."""
    engine = Engine([delay_rule("delay=3600s", "count=1")])
    effect = engine.check("write", 0, 512)  # the rule decides: the hold begins
    assert isinstance(effect, Effect) and effect.delay == 3600
    [rule] = engine.rules()
    assert rule.spent and rule.hits == 1
    assert run_with_waiter(engine, 1, None, lambda e: None) == {"hits": 1}
    assert run_with_waiter(engine, 1, None, lambda e: None, hits=1) == {"hits": 1}


def test_a_wait_issued_before_the_hold_returns_when_it_begins():
    engine = Engine([delay_rule("delay=3600s", "count=1")])
    assert run_with_waiter(engine, 1, None, lambda e: e.check("write", 0, 512)) == {"hits": 1}


def test_hits_n_waits_for_a_count_in_all_so_no_act_is_missed():
    engine = Engine([delay_rule("delay=1ms", "count=3")])
    engine.check("write", 0, 512)  # one act before the wait: counted with hits=
    engine.check("write", 0, 512)
    assert run_with_waiter(engine, 1, None, lambda e: None, hits=2) == {"hits": 2}
    assert run_with_waiter(engine, 1, None, lambda e: e.check("write", 0, 512), hits=3) == {
        "hits": 3
    }
    # without hits=, a rule that can still act waits for one act more than it had
    engine2 = Engine([delay_rule("delay=1ms", "count=3")])
    engine2.check("write", 0, 512)
    box = run_with_waiter(engine2, 1, 0.01, lambda e: None)
    assert box["error"].errno == errno.ETIMEDOUT and "waited for 2" in box["error"].message


def test_a_rule_healed_before_it_acted_fails_the_wait_when_it_heals():
    engine = Engine([delay_rule("errno=EIO", "sector=0", "heal=on")])
    engine.fire("none")
    box = run_with_waiter(engine, 1, None, lambda e: e.written(0, 512))
    assert box["error"].errno == errno.ENOENT and "spent" in box["error"].message
    assert run_with_waiter(engine, 1, None, lambda e: None)["error"].errno == errno.ENOENT
