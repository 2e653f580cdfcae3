"""Differential tests: generated blkdebug scenarios through qemu-io 7.2 and through blkfuse.

Scenarios come from tests/differential.py (how qemu-io's per-command answers, flushes
included, are read exactly is explained there). Environment:

  BLKFUSE_DIFF_SEED   seed (default: a fresh random one, printed on failure)
  BLKFUSE_DIFF_N      scenarios through the block layer (default 240)
  BLKFUSE_DIFF_MOUNT_N  scenarios through a real mount (default 30)

Where blkfuse and qemu-io disagree blkfuse is wrong, except for the one deliberate difference
(docs/design.md, "Deliberate differences") that generated scenarios can reach: with `align`, a failed read-modify-write read
fails the write (QEMU ignores it and writes garbage). There the test asserts blkfuse's
documented behaviour (the write fails with the read's errno) and compares no further.
"""

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

import differential as D

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(D.QEMU_IO is None, reason="qemu-io is not installed"),
]


def _pool_size() -> int:
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def _report(seed, scenarios, failures, oracle_errors, deliberate, what) -> str:
    lines = [
        f"{what}: {len(failures)} of {len(scenarios)} scenarios disagree with qemu-io "
        f"(rerun with BLKFUSE_DIFF_SEED={seed}); {len(deliberate)} stopped at the "
        f"deliberate RMW difference; {D.qemu_io_version()}"
    ]
    for sc, problems in failures[:15]:
        lines.append(sc.describe())
        lines += [f"    {p}" for p in problems]
    for sc, err in oracle_errors[:5]:
        lines.append(f"ORACLE ERROR (qemu-io output not understood) {sc.ident}: {err}")
        lines.append(sc.describe())
    return "\n".join(lines)


def test_generator_is_deterministic():
    a = D.generate_all(1234, 40)
    b = D.generate_all(1234, 40)
    assert [(s.config, s.ops, s.cache, s.align, s.max_transfer, s.format, s.limits) for s in a] == [
        (s.config, s.ops, s.cache, s.align, s.max_transfer, s.format, s.limits) for s in b
    ]
    assert {s.profile for s in a} == set(D.PROFILES)


def test_flush_results_are_read_exactly():
    """The reopen-for-flush reading (tests/differential.py) sees a failing flush and its errno."""
    sc = D.Scenario(
        seed=0,
        index=0,
        profile="writeback",
        ops=[("write", 0, 512, 0x11), ("flush",), ("flush",), ("read", 0, 512)],
        config='[inject-error]\nevent = "flush_to_os"\nerrno = "28"\nonce = "on"\n',
    )
    answer = D.run_qemu(sc)
    assert answer.inconsistency(sc, len(sc.ops)) is None
    assert [r.error for r in answer.results] == [0, 28, 0, 0]
    assert answer.results[3].data == bytes([0x11]) * 512


def _op_counts(scenarios, answers) -> list:
    """[(op kind, (count, failed in qemu-io))]: what a run exercised."""
    counts = {}
    for sc, qemu in zip(scenarios, answers):
        for i, op in enumerate(sc.ops):
            kind = "write -f" if op[0] == "write" and len(op) > 4 and op[4] else op[0]
            n, bad = counts.get(kind, (0, 0))
            failed = bool(qemu.results and qemu.results[i].error)
            counts[kind] = (n + 1, bad + failed)
    return sorted(counts.items())


def _differential(target: str, count: int, run_ours, fuse: bool = False) -> None:
    """Generate `count` scenarios, ask qemu-io, run each through `run_ours(k, scenario)` ->
    (results, image, deliberate differences), and fail on any disagreement. `fuse`: ours
    went through a mount, so QEMU's answers are compared as a FUSE reply carries them."""
    seed = D.run_seed()
    print(f"BLKFUSE_DIFF_SEED={seed}")  # shown by pytest whenever the test fails
    scenarios = D.generate_all(seed, count)
    if fuse:  # as a file client can send them (10.0: no discard; differential.py)
        scenarios = [D.as_file_operations(sc) for sc in scenarios]
    with ThreadPoolExecutor(_pool_size()) as pool:
        answers = list(pool.map(D.run_qemu, scenarios))
    failures, oracle_errors, deliberate = [], [], []
    for k, (sc, qemu) in enumerate(zip(scenarios, answers)):
        ours, image, rmw = run_ours(k, sc)
        if fuse and qemu.results is not None:
            qemu = dataclasses.replace(
                qemu, results=D.through_fuse(qemu.results), check=D.through_fuse(qemu.check or [])
            )
            rmw = [(i, D.through_fuse([D.Result(error)])[0].error) for i, error in rmw]
        try:
            problems, note = D.compare(sc, qemu, ours, image, rmw)
        except D.OracleError as e:
            oracle_errors.append((sc, str(e)))
            continue
        if note:
            deliberate.append((sc, note))
        if problems:
            failures.append((sc, problems))
    print(
        f"\ndifferential ({target}): seed {seed}, {len(scenarios)} scenarios, "
        f"{len(failures)} disagreements, {len(deliberate)} cut at the deliberate RMW "
        f"difference, {len(oracle_errors)} oracle errors; ops (failed in qemu-io): "
        + ", ".join(f"{kind} {n} ({bad})" for kind, (n, bad) in _op_counts(scenarios, answers))
    )
    assert not failures and not oracle_errors, _report(
        seed, scenarios, failures, oracle_errors, deliberate, target
    )


def test_block_layer_matches_qemu_io():
    count = D.scenario_count("BLKFUSE_DIFF_N", 240)
    _differential("block layer", count, lambda k, sc: D.run_block(sc))


def test_mount_matches_qemu_io(tmp_path):
    through_the_mount = D.through_mounts(tmp_path, D.run_mount, D.mount_deliberate)
    count = D.scenario_count("BLKFUSE_DIFF_MOUNT_N", 30)
    _differential("mount", count, through_the_mount, fuse=True)
