"""Property: the indexed engine agrees with a deliberately naive model of docs/design.md,
"Rule semantics"."""

from dataclasses import dataclass

from hypothesis import given, settings, strategies as st

from blkfuse.engine import Engine
from blkfuse.events import IOTYPES, DEFAULT_IOTYPES
from blkfuse.rules import InjectError, SetState

EVENTS = ["none", "read_aio", "write_aio", "pwritev", "flush_to_os"]


@dataclass
class ModelRule:
    inject: bool
    event: str
    state: int
    errno: int = 0
    sector: int = -1
    once: bool = False
    iotypes: frozenset = DEFAULT_IOTYPES
    new_state: int = 0


class Model:
    """Scan everything, every time: obviously right, hopelessly slow."""

    def __init__(self, rules):
        self.rules = list(rules)
        self.state = 1
        self.active = []
        self.fire("none")

    def fire(self, event):
        matching = [r for r in self.rules if r.event == event and r.state in (0, self.state)]
        injects = [r for r in matching if r.inject]
        if injects:
            self.active = injects
        setters = [r for r in matching if not r.inject]
        if setters:
            self.state = setters[0].new_state

    def check(self, iotype, offset, length):
        for rule in self.active:
            inside = rule.sector < 0 or (length > 0 and offset <= rule.sector * 512 < offset + length)
            if inside and iotype in rule.iotypes:
                if rule.errno == 0:
                    return 0
                if rule.once:
                    self.active.remove(rule)
                    self.rules.remove(rule)
                return rule.errno
        return 0


model_rules = st.one_of(
    st.builds(ModelRule, inject=st.just(True), event=st.sampled_from(EVENTS),
              state=st.integers(0, 3), errno=st.integers(0, 30),
              sector=st.one_of(st.just(-1), st.integers(0, 8)), once=st.booleans(),
              iotypes=st.one_of(st.just(DEFAULT_IOTYPES), st.sampled_from(IOTYPES).map(lambda t: frozenset({t})))),
    st.builds(ModelRule, inject=st.just(False), event=st.sampled_from(EVENTS),
              state=st.integers(0, 3), new_state=st.integers(0, 3)),
)

operations = st.one_of(
    st.tuples(st.just("fire"), st.sampled_from(EVENTS)),
    st.tuples(st.just("check"), st.sampled_from(IOTYPES), st.integers(0, 10).map(lambda s: s * 512 - (s % 3)),
              st.sampled_from([0, 1, 512, 4096, 1000])),
    st.tuples(st.just("state"), st.integers(0, 3)),
)


def to_engine_rule(rule: ModelRule):
    if rule.inject:
        return InjectError(rule.event, state=rule.state, errno=rule.errno, sector=rule.sector,
                           once=rule.once, iotypes=rule.iotypes)
    return SetState(rule.event, state=rule.state, new_state=rule.new_state)


@settings(max_examples=400, deadline=None)
@given(st.lists(model_rules, max_size=12), st.lists(operations, max_size=40))
def test_engine_matches_naive_model(rules, ops):
    model = Model(rules)
    engine = Engine([to_engine_rule(r) for r in rules])
    for op in ops:
        if op[0] == "fire":
            model.fire(op[1])
            engine.fire(op[1])
        elif op[0] == "state":
            model.state = op[1]
            engine.set_state(op[1])
        else:
            _, iotype, offset, length = op
            offset = max(offset, 0)
            if iotype == "flush":
                length = 0
            assert engine.check(iotype, offset, length) == model.check(iotype, offset, length), op
        assert engine.state == model.state
        assert len(engine.active()) == len(model.active)
        assert len([r for r in engine.rules() if not r.spent]) == len(model.rules)


armed_at_mount = st.builds(
    ModelRule, inject=st.just(True), event=st.just("none"), state=st.just(0),
    errno=st.integers(1, 30), sector=st.one_of(st.just(-1), st.integers(0, 16)),
    once=st.booleans(),
    iotypes=st.one_of(st.just(DEFAULT_IOTYPES), st.sampled_from(IOTYPES).map(lambda t: frozenset({t}))))


@settings(max_examples=300, deadline=None)
@given(st.lists(armed_at_mount, min_size=1, max_size=20),
       st.lists(st.tuples(st.sampled_from(IOTYPES[:4]), st.integers(0, 8200), st.integers(1, 8192)),
                max_size=30))
def test_index_keeps_first_in_file_priority(rules, checks):
    """The sector index must pick exactly the rule a linear scan would."""
    model = Model(rules)
    engine = Engine([to_engine_rule(r) for r in rules])
    for iotype, offset, length in checks:
        assert engine.check(iotype, offset, length) == model.check(iotype, offset, length)
