"""The dm-log-writes format module: round trips against a naive model of the bytes, the
superblock rules (interval, flush, append, trailing entries), and a log QEMU's blklogwrites
driver writes live (qemu-io) read back entry for entry."""

import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from blkfuse.crash import logwrites
from blkfuse.crash.logwrites import LogEntry, LogFormatError, LogWriter, read_log

# An operation: ("write", sector, data) / ("fua", sector, data) / ("zeroes", sector, n)
# / ("discard", sector, n) / ("flush",) / ("mark", name)
Op = tuple[object, ...]


def _ops(sectorsize: int) -> st.SearchStrategy[list[Op]]:
    sector = st.integers(0, 1 << 40)
    count = st.integers(1, 4)
    data = count.flatmap(lambda n: st.binary(min_size=n * sectorsize, max_size=n * sectorsize))
    name = st.text(
        st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=20,
    ).filter(lambda text: len(text.encode()) <= logwrites.max_mark_length(sectorsize))
    one = st.one_of(
        st.tuples(st.just("write"), sector, data),
        st.tuples(st.just("fua"), sector, data),
        st.tuples(st.just("zeroes"), sector, count),
        st.tuples(st.just("discard"), sector, st.integers(0, 1 << 20)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("mark"), name),
    )
    return st.lists(one, max_size=25)


def _apply(writer: LogWriter, op: Op) -> None:
    kind = op[0]
    if kind in ("write", "fua"):
        writer.write(int(op[1]), bytes(op[2]), fua=kind == "fua")
    elif kind == "zeroes":
        writer.write_zeroes(int(op[1]), int(op[2]))
    elif kind == "discard":
        writer.discard(int(op[1]), int(op[2]))
    elif kind == "flush":
        writer.flush()
    else:
        writer.mark(str(op[1]))


def _model(op: Op, index: int, sectorsize: int) -> tuple[LogEntry, bytes]:
    """The entry and its bytes in the log, spelled out field by field (the naive model)."""
    kind = op[0]
    if kind in ("write", "fua"):
        sector, payload = int(op[1]), bytes(op[2])
        flags = 2 if kind == "fua" else 0
        n = len(payload) // sectorsize
        entry = LogEntry(index, sector, n, flags, payload)
        head = struct.pack("<QQQQ", sector, n, flags, 0)
        return entry, head + bytes(sectorsize - 32) + payload
    if kind == "zeroes":
        sector, n = int(op[1]), int(op[2])
        entry = LogEntry(index, sector, n, 0, bytes(n * sectorsize))
        return entry, struct.pack("<QQQQ", sector, n, 0, 0) + bytes(
            sectorsize - 32 + n * sectorsize
        )
    if kind == "discard":
        sector, n = int(op[1]), int(op[2])
        return LogEntry(index, sector, n, 4), struct.pack("<QQQQ", sector, n, 4, 0) + bytes(
            sectorsize - 32
        )
    if kind == "flush":
        return LogEntry(index, 0, 0, 1), struct.pack("<QQQQ", 0, 0, 1, 0) + bytes(sectorsize - 32)
    name = str(op[1]).encode()
    head = struct.pack("<QQQQ", 0, 0, 8, len(name)) + name
    return LogEntry(index, 0, 0, 8, None, str(op[1])), head + bytes(sectorsize - len(head))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sectorsize=st.sampled_from([512, 4096, 64]), data=st.data())
def test_round_trip_matches_the_naive_model(
    tmp_path: Path, sectorsize: int, data: st.DataObject
) -> None:
    ops = data.draw(_ops(sectorsize))
    path = tmp_path / "log"
    with LogWriter(path, sectorsize=sectorsize) as writer:
        for op in ops:
            _apply(writer, op)
    expected = [_model(op, i, sectorsize) for i, op in enumerate(ops)]
    raw = path.read_bytes()
    superblock = struct.pack("<QQQI", 0x6A736677736872, 1, len(ops), sectorsize)
    assert raw == superblock.ljust(sectorsize, b"\0") + b"".join(b for _, b in expected)
    head, entries = read_log(path)
    assert (head.nr_entries, head.sectorsize) == (len(ops), sectorsize)
    assert list(entries) == [e for e, _ in expected]
    _, bare = read_log(path, data=False)
    assert [e.mark for e in bare] == [e.mark for e, _ in expected]


def test_superblock_follows_flushes_and_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "log"
    writer = LogWriter(path, super_update_interval=4)
    assert logwrites.read_super(path).nr_entries == 0  # readable before any flush
    writer.write(0, b"a" * 512)
    writer.write(1, b"b" * 512)
    assert logwrites.read_super(path).nr_entries == 0
    writer.write(2, b"c" * 512)
    assert logwrites.read_super(path).nr_entries == 0
    writer.write(3, b"d" * 512)  # fourth entry: the interval
    assert logwrites.read_super(path).nr_entries == 4
    writer.flush()
    assert logwrites.read_super(path).nr_entries == 5
    writer.mark("after")
    # Not closed (as after a SIGKILL): the superblock says 5, the mark trails it.
    _, entries = read_log(path)
    assert len(list(entries)) == 5
    _, with_trailing = read_log(path, trailing=True)
    assert [e.mark for e in with_trailing][-1] == "after"
    os.close(writer.fd)


def test_append_continues_a_log_and_keeps_its_sector_size(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with LogWriter(path, sectorsize=4096) as writer:
        writer.write(5, b"x" * 4096)
        writer.discard(9, 3)
    with LogWriter(path, append=True) as writer:
        assert writer.sectorsize == 4096
        writer.mark("second run")
    head, entries = read_log(path)
    assert head.sectorsize == 4096
    assert [(e.index, e.sector, e.flags, e.mark) for e in entries] == [
        (0, 5, 0, None),
        (1, 9, 4, None),
        (2, 0, 8, "second run"),
    ]
    with pytest.raises(ValueError, match="mutually exclusive"):
        LogWriter(path, append=True, sectorsize=512)


def test_bad_input_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with pytest.raises(ValueError, match="invalid log sector size 500"):
        LogWriter(path, sectorsize=500)
    with pytest.raises(ValueError, match="update interval 0"):
        LogWriter(path, super_update_interval=0)
    with LogWriter(path) as writer:
        with pytest.raises(ValueError, match="not whole log sectors"):
            writer.write(0, b"abc")
        with pytest.raises(ValueError, match="mark name must be 1 to 479 bytes"):
            writer.mark("m" * 480)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\1" * 1024)
    with pytest.raises(LogFormatError, match="not a dm-log-writes log"):
        read_log(junk)
    raw = bytearray(path.read_bytes())
    raw[0:28] = struct.pack("<QQQI", 0x6A736677736872, 1, 1, 512)
    path.write_bytes(bytes(raw))  # says one entry, has none
    with pytest.raises(LogFormatError, match="truncated entry 0"):
        list(read_log(path)[1])


@pytest.mark.qemu
def test_reads_the_log_qemu_blklogwrites_writes(tmp_path: Path) -> None:
    image, log = tmp_path / "disk.img", tmp_path / "disk.log"
    image.write_bytes(bytes(1 << 20))
    log.write_bytes(b"")
    opts = (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log},log-sector-size=4096"
    )
    commands = ["write -P 0xab 8192 8192", "write -z 0 4096", "discard 65536 4096", "flush"]
    args = ["qemu-io", "--image-opts", opts]
    for command in commands:
        args += ["-c", command]
    subprocess.run(args, check=True, capture_output=True)
    head, entries = read_log(log)
    assert head.sectorsize == 4096
    got = [e for e in entries if not e.is_flush]
    assert got == [
        LogEntry(0, 2, 2, 0, b"\xab" * 8192),
        LogEntry(1, 0, 1, 0, bytes(4096)),
        LogEntry(got[2].index, 16, 1, logwrites.DISCARD),
    ]
    # Every flush QEMU logged is a bare FLUSH entry, and the log ends with one (close).
    _, again = read_log(log)
    everything = list(again)
    assert len(everything) == head.nr_entries
    assert everything[-1].flags == logwrites.FLUSH
    assert all(e.nr_sectors == 0 for e in everything if e.is_flush)
