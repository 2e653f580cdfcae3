"""wait_hit and spent rules in the engine alone (no FUSE): when a wait returns, when it fails."""

import errno

import pytest
import trio
import trio.testing

from blkfuse.engine.core import Engine, EngineError
from blkfuse.rules.model import InjectError, SetState


def run_with_waiter(engine, rule_id, timeout, poke):
    """Start wait_hit(rule_id, timeout), let it park, run poke(engine), return its result or
    the EngineError it raised."""
    box = {}

    async def main():
        async def waiter():
            try:
                box["hits"] = await engine.wait_hit(rule_id, timeout)
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
    box = run_with_waiter(engine, 2, None, lambda e: None)
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
