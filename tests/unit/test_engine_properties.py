"""Property: the indexed engine agrees with a deliberately naive model of docs/design.md,
"Rule semantics", and of blkfuse's extension keys (README "Beyond blkdebug")."""

import random
from dataclasses import dataclass

from hypothesis import given, settings, strategies as st

from blkfuse.daemon.callers import Caller
from blkfuse.engine.core import Engine
from blkfuse.engine.effects import Effect
from blkfuse.rules.events import DEFAULT_IOTYPES, IOTYPES
from blkfuse.rules.model import Extensions, InjectError, SetState

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
    # extension keys; `extended` False: a QEMU rule (the engine's rule.ext is None)
    extended: bool = False
    probability: float = 1.0
    after: int = 0
    count: int = 0
    sectors: int = 0
    delay_us: int = 0
    jitter_us: int = 0
    corrupt: str = ""
    pid: int = -1
    uid: int = -1
    heal: bool = False
    persistent: bool = False
    seen: int = 0
    acted: int = 0

    def span(self):
        start = self.sector * 512
        return start, start + (self.sectors * 512 if self.sectors else 1)


class Model:
    """Scan everything, every time: obviously right, hopelessly slow.

    The extension keys, as README "Beyond blkdebug" states them: the armed rules are looked
    at in file order; the first that *acts* decides. A rule acts on a request it matches
    (io type, sectors, caller) once it has let `after` such requests through and the seeded
    generator says yes to its `probability`. The generator is drawn in that order: one
    random() per probability test, one randint for jitter, 64 bits per corruption.
    """

    def __init__(self, rules, seed=0):
        self.rules = list(rules)
        self.order = {id(r): i for i, r in enumerate(self.rules)}
        self.state = 1
        self.active = []
        self.kept = []  # persistent rules once armed
        self.random = random.Random(seed)
        self.fire("none")

    def fire(self, event):
        matching = [r for r in self.rules if r.event == event and r.state in (0, self.state)]
        injects = [r for r in matching if r.inject]
        if injects:
            self.active = [r for r in injects if not r.persistent]
            self.kept += [r for r in injects if r.persistent and r not in self.kept]
        setters = [r for r in matching if not r.inject]
        if setters:
            self.state = setters[0].new_state

    def armed(self):
        return sorted(self.active + self.kept, key=lambda r: self.order[id(r)])

    def _remove(self, rule):
        for where in (self.active, self.kept, self.rules):
            if rule in where:
                where.remove(rule)

    def check(self, iotype, offset, length, caller=None):
        for rule in self.armed():
            if rule.sector < 0:
                inside = True
            else:
                start, end = rule.span()
                inside = length > 0 and offset < end and start < offset + length
            if not inside or iotype not in rule.iotypes:
                continue
            if not rule.extended:
                if rule.errno == 0:
                    return 0
                if rule.once:
                    self._remove(rule)
                return rule.errno
            if rule.pid >= 0 or rule.uid >= 0:
                if (
                    caller is None
                    or rule.pid not in (-1, caller.pid)
                    or rule.uid not in (-1, caller.uid)
                ):
                    continue
            if rule.heal and iotype == "write":
                start, end = rule.span()
                if offset <= start and end <= offset + length:
                    continue
            rule.seen += 1
            if rule.seen <= rule.after:
                continue
            if rule.probability < 1 and self.random.random() >= rule.probability:
                continue
            delay = rule.delay_us + (
                self.random.randint(0, rule.jitter_us) if rule.jitter_us else 0
            )
            corrupt = rule.corrupt if iotype in ("read", "write") else ""
            if not (rule.errno or delay or corrupt):
                return 0
            rule.acted += 1
            if rule.once or rule.acted == rule.count:
                self._remove(rule)
            if not (delay or corrupt):
                return rule.errno
            return (rule.errno, delay / 1e6, corrupt, self.random.getrandbits(64) if corrupt else 0)
        return 0

    def written(self, offset, length):
        for rule in self.armed():
            if rule.heal:
                start, end = rule.span()
                if offset <= start and end <= offset + length:
                    self._remove(rule)


model_rules = st.one_of(
    st.builds(
        ModelRule,
        inject=st.just(True),
        event=st.sampled_from(EVENTS),
        state=st.integers(0, 3),
        errno=st.integers(0, 30),
        sector=st.one_of(st.just(-1), st.integers(0, 8)),
        once=st.booleans(),
        iotypes=st.one_of(
            st.just(DEFAULT_IOTYPES), st.sampled_from(IOTYPES).map(lambda t: frozenset({t}))
        ),
    ),
    st.builds(
        ModelRule,
        inject=st.just(False),
        event=st.sampled_from(EVENTS),
        state=st.integers(0, 3),
        new_state=st.integers(0, 3),
    ),
)

operations = st.one_of(
    st.tuples(st.just("fire"), st.sampled_from(EVENTS)),
    st.tuples(
        st.just("check"),
        st.sampled_from(IOTYPES),
        st.integers(0, 10).map(lambda s: s * 512 - (s % 3)),
        st.sampled_from([0, 1, 512, 4096, 1000]),
    ),
    st.tuples(st.just("state"), st.integers(0, 3)),
)


def to_engine_rule(rule: ModelRule):
    if rule.inject:
        ext = None
        if rule.extended:
            ext = Extensions(
                probability=rule.probability,
                after=rule.after,
                count=rule.count,
                sectors=rule.sectors,
                delay_us=rule.delay_us,
                jitter_us=rule.jitter_us,
                corrupt=rule.corrupt,
                pid=rule.pid,
                uid=rule.uid,
                heal=rule.heal,
                persistent=rule.persistent,
            )
        return InjectError(
            rule.event,
            state=rule.state,
            errno=rule.errno,
            sector=rule.sector,
            once=rule.once,
            iotypes=rule.iotypes,
            ext=ext,
        )
    return SetState(rule.event, state=rule.state, new_state=rule.new_state)


def comparable(outcome):
    """An engine check's answer as the model gives it."""
    if isinstance(outcome, Effect):
        return (outcome.errno, outcome.delay, outcome.corrupt, outcome.seed)
    return outcome


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
    ModelRule,
    inject=st.just(True),
    event=st.just("none"),
    state=st.just(0),
    errno=st.integers(1, 30),
    sector=st.one_of(st.just(-1), st.integers(0, 16)),
    once=st.booleans(),
    iotypes=st.one_of(
        st.just(DEFAULT_IOTYPES), st.sampled_from(IOTYPES).map(lambda t: frozenset({t}))
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(armed_at_mount, min_size=1, max_size=20),
    st.lists(
        st.tuples(st.sampled_from(IOTYPES[:4]), st.integers(0, 8200), st.integers(1, 8192)),
        max_size=30,
    ),
)
def test_index_keeps_first_in_file_priority(rules, checks):
    """The sector index must pick exactly the rule a linear scan would."""
    model = Model(rules)
    engine = Engine([to_engine_rule(r) for r in rules])
    for iotype, offset, length in checks:
        assert engine.check(iotype, offset, length) == model.check(iotype, offset, length)


# ---- the extension keys ------------------------------------------------------------------

# pids no process has: the pid filter then compares thread ids only (no /proc answer)
PIDS = [4_000_001, 4_000_002]
CALLERS = [None] + [Caller(pid, uid, 0) for pid in PIDS for uid in (0, 1000)]


@st.composite
def extended_rules(draw):
    rule = ModelRule(
        inject=True,
        event=draw(st.sampled_from(EVENTS)),
        state=draw(st.integers(0, 3)),
        errno=draw(st.sampled_from([0, 5, 28])),
        sector=draw(st.one_of(st.just(-1), st.integers(0, 8))),
        iotypes=draw(
            st.one_of(
                st.just(DEFAULT_IOTYPES), st.sampled_from(IOTYPES).map(lambda t: frozenset({t}))
            )
        ),
        extended=True,
    )
    rule.probability = draw(st.sampled_from([1.0, 1.0, 0.5, 0.1]))
    rule.after = draw(st.sampled_from([0, 0, 1, 3]))
    limit = draw(st.sampled_from(["", "", "once", "count"]))
    rule.once = limit == "once"
    rule.count = draw(st.integers(1, 3)) if limit == "count" else 0
    if rule.sector >= 0:
        rule.sectors = draw(st.sampled_from([0, 1, 2, 8, 300]))
        rule.heal = draw(st.booleans())
    rule.delay_us = draw(st.sampled_from([0, 0, 100]))
    rule.jitter_us = draw(st.sampled_from([0, 0, 50]))
    rule.corrupt = draw(st.sampled_from(["", "", "flip", "zero", "random"]))
    if rule.corrupt:
        rule.errno = 0
    rule.pid = draw(st.sampled_from([-1, -1, PIDS[0]]))
    rule.uid = draw(st.sampled_from([-1, -1, 0]))
    rule.persistent = draw(st.booleans())
    return rule


mixed_rules = st.one_of(model_rules, extended_rules())

extended_operations = st.one_of(
    st.tuples(st.just("fire"), st.sampled_from(EVENTS)),
    st.tuples(
        st.just("check"),
        st.sampled_from(IOTYPES),
        st.integers(0, 10).map(lambda s: s * 512 - (s % 3)),
        st.sampled_from([0, 1, 512, 4096, 1000, 200_000]),
        st.sampled_from(CALLERS),
    ),
    st.tuples(
        st.just("written"),
        st.integers(0, 12).map(lambda s: s * 512),
        st.sampled_from([512, 4096, 200_000]),
    ),
    st.tuples(st.just("state"), st.integers(0, 3)),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(mixed_rules, max_size=12),
    st.lists(extended_operations, max_size=50),
    st.integers(0, 2**32),
)
def test_extension_keys_match_naive_model(rules, ops, seed):
    model = Model(rules, seed)
    engine = Engine([to_engine_rule(r) for r in rules], seed=seed)
    for op in ops:
        if op[0] == "fire":
            model.fire(op[1])
            engine.fire(op[1])
        elif op[0] == "state":
            model.state = op[1]
            engine.set_state(op[1])
        elif op[0] == "written":
            model.written(op[1], op[2])
            engine.written(op[1], op[2])
        else:
            _, iotype, offset, length, caller = op
            offset = max(offset, 0)
            if iotype == "flush":
                length = 0
            assert comparable(engine.check(iotype, offset, length, caller)) == model.check(
                iotype, offset, length, caller
            ), op
        assert engine.state == model.state
        assert [r.id for r in engine.active()] == [model.order[id(r)] + 1 for r in model.armed()]
        assert len([r for r in engine.rules() if not r.spent]) == len(model.rules)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5000), st.integers(1, 3000), st.booleans()),
        min_size=1,
        max_size=40,
    ),
    st.lists(st.tuples(st.integers(0, 5000 * 512), st.integers(1, 600_000)), max_size=40),
)
def test_range_index_finds_what_a_scan_finds(ranges, checks):
    """Ranges of every length class, overlapping or not: the bucketed index picks exactly
    the first-in-file rule a scan over every range would."""
    rules = [
        ModelRule(
            inject=True,
            event="none",
            state=0,
            errno=i + 1,
            sector=sector,
            sectors=sectors,
            extended=True,
            persistent=persistent,
        )
        for i, (sector, sectors, persistent) in enumerate(ranges)
    ]
    model = Model(rules)
    engine = Engine([to_engine_rule(r) for r in rules])
    for offset, length in checks:
        assert engine.check("read", offset, length) == model.check("read", offset, length)
