"""blkfuse replay's options on logs written with the format module, against a naive model of
what replay-log does with them (crash/replay.py)."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from blkfuse.crash.logwrites import LogWriter
from blkfuse.crash.replay import ReplayError, ReplayOptions, replay

SIZE = 64 * 512


def _log(path: Path) -> None:
    with LogWriter(path) as writer:
        writer.write(0, b"a" * 1024)  # 0
        writer.discard(4, 4)  # 1
        writer.flush()  # 2
        writer.write(8, b"b" * 512, fua=True)  # 3
        writer.mark("one")  # 4
        writer.write_zeroes(0, 1)  # 5
        writer.discard(10, 2)  # 6
        writer.mark("two")  # 7


def _run(log: Path, target: Path, **options: object) -> tuple[int, bytes, list[str]]:
    target.write_bytes(b"\x11" * SIZE)
    said: list[str] = []
    status = replay(str(log), str(target), ReplayOptions(**options), out=said.append)
    return status, target.read_bytes(), said


def _image(*changes: tuple[int, bytes]) -> bytes:
    image = bytearray(b"\x11" * SIZE)
    for offset, data in changes:
        image[offset : offset + len(data)] = data
    return bytes(image)


def test_start_stop_and_discard_options(tmp_path: Path) -> None:
    log, target = tmp_path / "log", tmp_path / "t"
    _log(log)
    a, disc1, b, zero, disc2 = (
        (0, b"a" * 1024),
        (2048, bytes(2048)),
        (4096, b"b" * 512),
        (0, bytes(512)),
        (5120, bytes(1024)),
    )
    assert _run(log, target)[1] == _image(a, disc1, b, zero, disc2)
    assert _run(log, target, next_flush=True)[1] == _image(a, disc1)
    assert _run(log, target, next_fua=True)[1] == _image(a, disc1, b)
    assert _run(log, target, end_mark="one")[1] == _image(a, disc1, b)
    assert _run(log, target, limit=1)[1] == _image(a)
    assert _run(log, target, start_entry=3, end_mark="two")[1] == _image(b, zero, disc2)
    assert _run(log, target, start_mark="one")[1] == _image(zero, disc2)
    assert _run(log, target, discard=False)[1] == _image(a, b, zero)
    # With a mark asked for, a flush or FUA entry stops only if it is that mark (replay-log).
    assert _run(log, target, next_flush=True, end_mark="two")[1] == _image(a, disc1, b, zero, disc2)
    status, _, said = _run(log, target, end_mark="one", verbose=1)
    assert status == 0 and said[1].startswith(
        "replaying 1@5: sector 4, size 2048, flags 0x4(DISCARD)"
    )
    assert said[4] == "replaying 4@9: sector 0, size 0, flags 0x8(MARK) mark one"


def test_check_runs_the_command_at_its_points(tmp_path: Path) -> None:
    log, target, calls = tmp_path / "log", tmp_path / "t", tmp_path / "calls"
    _log(log)
    for check, expected in (("discard", 2), ("flush", 1), ("fua", 1), ("3", 2)):
        calls.write_text("")
        status, _, _ = _run(log, target, check=check, fsck=f"echo >> {calls}")
        assert status == 0 and calls.read_text().count("\n") == expected, check
    for bad in ({"check": "0", "fsck": "true"}, {"check": "x", "fsck": "true"}, {"fsck": "true"}):
        with pytest.raises(ReplayError):
            _run(log, target, **bad)
    with pytest.raises(ReplayError, match="Couldn't find starting mark"):
        _run(log, target, start_mark="three")
    with pytest.raises(ReplayError, match="Invalid entry number"):
        _run(log, target, start_entry=8)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("w"), st.integers(0, 60), st.integers(1, 4), st.integers(0, 255)),
            st.tuples(st.just("d"), st.integers(0, 60), st.integers(1, 4), st.just(0)),
            st.tuples(st.just("f"), st.just(0), st.just(0), st.just(0)),
        ),
        max_size=20,
    ),
    limit=st.integers(0, 25),
)
def test_replaying_a_prefix_matches_the_model(tmp_path: Path, ops: list, limit: int) -> None:
    log, target = tmp_path / "log", tmp_path / "t"
    model = bytearray(b"\x11" * SIZE)
    with LogWriter(log) as writer:
        for i, (kind, sector, count, byte) in enumerate(ops):
            count = min(count, 64 - sector)
            if kind == "w":
                writer.write(sector, bytes([byte]) * 512 * count)
            elif kind == "d":
                writer.discard(sector, count)
            else:
                writer.flush()
            if limit and i >= limit:
                continue
            if kind == "w":
                model[sector * 512 : (sector + count) * 512] = bytes([byte]) * 512 * count
            elif kind == "d":
                model[sector * 512 : (sector + count) * 512] = bytes(512 * count)
    assert _run(log, target, limit=limit)[1] == bytes(model)
