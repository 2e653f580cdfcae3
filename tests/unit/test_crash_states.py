"""Crash states (blkfuse.crash.states) against a naive model: every state's image, built from a
base and a write log, equals the one a sector-by-sector replay of the same fates gives; IDs
rebuild the same bytes; the points and the fates obey the CrashMonkey model."""

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from blkfuse.crash.logwrites import DISCARD, FLUSH, FUA, MARK, LogEntry
from blkfuse.crash.states import KEPT, LOST, CrashPlan, build_image, parse_id

SECTOR = 512
DISK_SECTORS = 64


def _entry(index, op):
    kind = op[0]
    if kind == "write":
        _, sector, n, fua, flush, fill = op
        data = random.Random(fill).randbytes(n * SECTOR)
        flags = (FUA if fua else 0) | (FLUSH if flush else 0)
        return LogEntry(index, sector, n, flags, data)
    if kind == "discard":
        return LogEntry(index, op[1], op[2], DISCARD)
    if kind == "flush":
        return LogEntry(index, 0, 0, FLUSH)
    return LogEntry(index, 0, 0, MARK, None, op[1])


write_op = st.builds(
    lambda sector, n, fua, flush, fill: (
        "write",
        sector,
        min(n, DISK_SECTORS - sector),
        fua,
        flush,
        fill,
    ),
    st.integers(0, DISK_SECTORS - 1),
    st.integers(1, 12),
    st.booleans(),
    st.integers(0, 6).map(lambda x: x == 0),  # now and then a flush carrying data
    st.integers(0, 1 << 30),
)
discard_op = st.builds(
    lambda sector, n: ("discard", sector, min(n, DISK_SECTORS - sector)),
    st.integers(0, DISK_SECTORS - 1),
    st.integers(1, 8),
)
ops = st.lists(
    st.one_of(
        write_op,
        write_op,
        write_op,
        discard_op,
        st.just(("flush",)),
        st.builds(lambda n: ("mark", f"ack:{n}"), st.integers(0, 99)),
    ),
    max_size=30,
)


def naive_image(base, entries, plan, state):
    """Replay sector by sector: what the CrashMonkey model says this state's disk holds."""
    image = bytearray(base)
    # at a flush the flush is in flight: the entries before it
    if state.point.reason == "flush":
        upto = [e for e in entries if e.index < state.point.entry]
    else:
        upto = [e for e in entries if e.index <= state.point.entry]
    last_flush = max((e.index for e in upto if e.is_flush), default=-1)
    volatile_fates = iter(state.fates)
    for e in upto:
        if not e.nr_sectors or e.is_mark:
            continue
        durable = e.index < last_flush or e.is_fua
        fate = KEPT if durable else next(volatile_fates)
        if fate == LOST:
            continue
        first_unit = e.sector * SECTOR // plan.atomic
        for k in range(e.nr_sectors):
            at = (e.sector + k) * SECTOR
            if fate != KEPT and not fate[at // plan.atomic - first_unit]:
                continue
            image[at : at + SECTOR] = (
                bytes(SECTOR) if e.is_discard else e.data[k * SECTOR : (k + 1) * SECTOR]
            )
    assert next(volatile_fates, None) is None  # the plan's volatile writes are the model's
    return bytes(image)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=ops,
    seed=st.integers(0, 1 << 20),
    atomic=st.sampled_from([512, 1024, 4096]),
    n=st.integers(0, 4),
    start=st.integers(0, 5),
)
def test_every_state_matches_the_naive_model(tmp_path, ops, seed, atomic, n, start):
    entries = [_entry(i, op) for i, op in enumerate(ops)]
    base = random.Random(seed).randbytes(DISK_SECTORS * SECTOR)
    base_path = tmp_path / "base.img"
    base_path.write_bytes(base)
    plan = CrashPlan.from_log(entries, seed=seed, atomic=atomic, states_per_point=n, start=start)

    every = set()
    # A point at every flush, FUA write and mark from `start` on, in log order.
    # (a flush that carries FUA data has two: the flush in flight, then its FUA write done)
    expected_points = [
        e.index
        for e in entries
        if e.index >= start
        for _ in range(e.is_flush + e.is_fua + e.is_mark)
    ]
    assert [p.entry for p in plan.points] == expected_points
    for p in plan.points:
        assert p.marks == tuple(e.mark for e in entries if e.is_mark and e.index <= p.entry)
        states = list(plan.states(p))
        if p.reason == "flush":  # the writes since the previous flush are what it is to cover
            previous = max(
                (e.index for e in entries if e.is_flush and e.index < p.entry), default=-1
            )
            assert [plan.writes[i].entry for i in sorted(p.volatile + p.fua)] == [
                e.index
                for e in entries
                if previous <= e.index < p.entry and e.nr_sectors and not e.is_mark
            ]
        assert states[0].id == f"p{p.number}-s0"
        assert all(f == LOST for f in states[0].fates)  # s0 loses every unflushed write
        assert len({s.fates for s in states}) == len(states)  # no state twice
        assert len(states) <= n + 1
        for s in states:
            out = tmp_path / "state.img"
            build_image(plan, s, str(base_path), str(out))
            image = out.read_bytes()
            assert image == naive_image(base, entries, plan, s), s.id
            again = plan.state(s.id)  # an ID names the same fates, hence the same bytes
            assert again.fates == s.fates
            every.add((image, p.marks))
    # all_states leaves out only repeats of the same bytes with the same marks
    checked = []
    for s in plan.all_states():
        out = tmp_path / "state.img"
        build_image(plan, s, str(base_path), str(out))
        checked.append((out.read_bytes(), s.point.marks))
    assert set(checked) == every


def test_an_id_rebuilds_the_same_bytes_from_a_fresh_plan(tmp_path):
    rng = random.Random(7)
    entries = []
    for i in range(40):
        if i % 9 == 8:
            entries.append(LogEntry(i, 0, 0, FLUSH))
        else:
            entries.append(LogEntry(i, rng.randrange(56), 8, 0, rng.randbytes(8 * SECTOR)))
    entries.append(LogEntry(40, 0, 0, MARK, None, "ack:1"))
    base = tmp_path / "base.img"
    base.write_bytes(bytes(DISK_SECTORS * SECTOR))
    plan = CrashPlan.from_log(entries, seed=3, atomic=1024, states_per_point=5)
    images = []
    for _ in range(2):
        plan = CrashPlan.from_log(entries, seed=3, atomic=1024, states_per_point=5)
        state = plan.state("p5-s4")
        out = tmp_path / f"{len(images)}.img"
        build_image(plan, state, str(base), str(out))
        images.append(out.read_bytes())
    assert images[0] == images[1]
    # a different seed draws other fates (the last point has 4 unflushed writes)
    other = CrashPlan.from_log(entries, seed=4, atomic=1024, states_per_point=5)
    assert [s.fates for s in other.states(other.points[-1])] != [
        s.fates for s in plan.states(plan.points[-1])
    ]


def test_states_are_built_sparse(tmp_path):
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(64 << 20)
        f.write(b"x" * 4096)
    entries = [
        LogEntry(0, 16, 8, 0, b"y" * 4096),
        LogEntry(1, 0, 0, FLUSH),
        LogEntry(2, 4096, 8, DISCARD),
        LogEntry(3, 0, 0, MARK, None, "done"),
    ]
    plan = CrashPlan.from_log(entries, states_per_point=0)
    out = tmp_path / "state.img"
    build_image(plan, plan.state("p2-s0"), str(base), str(out))  # the write kept, the discard lost
    assert os.path.getsize(out) == 64 << 20
    assert os.stat(out).st_blocks * 512 <= 1 << 20  # 8 KiB of data, not 64 MiB
    with open(out, "rb") as f:
        assert f.read(12288) == b"x" * 4096 + bytes(4096) + b"y" * 4096


def test_bad_ids_and_logs_are_named():
    plan = CrashPlan.from_log([LogEntry(0, 0, 0, FLUSH)], states_per_point=2)
    assert parse_id("p1-s2") == (1, 2)
    with pytest.raises(ValueError, match="expected pP-sS"):
        plan.state("17-3")
    with pytest.raises(ValueError, match="no crash point p2 .*p1 to p1"):
        plan.state("p2-s0")
    with pytest.raises(ValueError, match="s0 to s2"):
        plan.state("p1-s3")
    with pytest.raises(ValueError, match="without its data"):
        CrashPlan.from_log([LogEntry(0, 0, 8, 0, None)])
    with pytest.raises(ValueError, match="power of two"):
        CrashPlan.from_log([], atomic=1000)
