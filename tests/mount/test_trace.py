"""The per-request trace: against known requests through the block layer (no FUSE), then
through a real mount: `--trace FILE`, the live stream (Mount.trace, `blkfuse trace`)."""

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import trio
from support.device import build_device

from blkfuse import ControlError, Mount, client
from blkfuse.client import mounttab
from blkfuse.daemon.trace import TracedBlock, Tracer
from blkfuse.engine.core import Engine
from blkfuse.rules.model import InjectError, SetState

from conftest import blkfuse

KEYS = ["time", "op", "offset", "length", "events", "rules", "errno", "us"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _strip(record: dict) -> dict:
    """What does not depend on timing or on who asked."""
    return {k: v for k, v in record.items() if k not in ("time", "us", "pid", "comm")}


# ---- block layer, no FUSE ---------------------------------------------------------------------


def test_trace_of_known_requests_through_the_block_layer(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 * 1024))
    trace_file = tmp_path / "trace.jsonl"
    rules = [
        SetState("flush_to_os", state=1, new_state=2),  # id 1
        InjectError(
            "write_aio",
            state=2,
            errno=errno.ENOSPC,  # id 2
            iotypes=frozenset({"write"}),
        ),
        InjectError("read_aio", errno=errno.EIO, sector=64),
    ]  # id 3
    engine = Engine(rules)
    tracer = Tracer(engine, str(trace_file))
    block = TracedBlock(build_device(img, engine), tracer)
    assert engine.tracer is tracer

    async def main() -> None:
        await block.write(0, b"a" * 4096)
        await block.flush()
        with pytest.raises(OSError):
            await block.write(4096, b"b" * 512)
        await block.read(0, 512)
        with pytest.raises(OSError):
            await block.read(64 * 512, 512)
        engine.add_breakpoint("read_aio", "A")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(block.read, 1024, 512)
            await engine.wait_break("A")
            engine.resume("A")

    trio.run(main)
    tracer.close()
    got = _records(trace_file)
    assert [list(r) for r in got] == [KEYS] * 5 + [KEYS + ["suspended_at"]]
    assert [_strip(r) for r in got] == [
        {
            "op": "write",
            "offset": 0,
            "length": 4096,
            "events": ["write_aio", "pwritev", "pwritev_done"],
            "rules": [],
            "errno": 0,
        },
        {
            "op": "flush",
            "offset": 0,
            "length": 0,
            "events": ["flush_to_os", "flush_to_disk"],
            "rules": [1],
            "errno": 0,
        },
        {
            "op": "write",
            "offset": 4096,
            "length": 512,
            "events": ["write_aio", "pwritev", "pwritev_done"],
            "rules": [2],
            "errno": errno.ENOSPC,
        },
        {"op": "read", "offset": 0, "length": 512, "events": ["read_aio"], "rules": [], "errno": 0},
        {
            "op": "read",
            "offset": 64 * 512,
            "length": 512,
            "events": ["read_aio"],
            "rules": [3],
            "errno": errno.EIO,
        },
        {
            "op": "read",
            "offset": 1024,
            "length": 512,
            "events": ["read_aio"],
            "rules": [],
            "errno": 0,
            "suspended_at": "read_aio",
        },
    ]
    assert all(r["us"] >= 0 and r["time"] > 1e9 for r in got)
    assert engine.tracer is None  # closed: off again


def test_trace_is_off_without_a_file_or_a_reader(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    engine = Engine([])
    tracer = Tracer(engine)
    block = TracedBlock(build_device(img, engine), tracer)
    assert engine.tracer is None and not tracer.active
    stream = tracer.open_stream()
    assert engine.tracer is tracer

    async def main() -> bytes:
        await block.write(0, b"x" * 512)
        return await stream.read(1 << 16)

    line = trio.run(main)
    assert json.loads(line)["op"] == "write"
    stream.close()
    assert engine.tracer is None and not tracer.active
    assert trio.run(stream.read, 100) == b""  # a closed stream reads as end of file


# ---- a real mount -------------------------------------------------------------------------------


def test_mount_trace_file_and_live_stream_agree(fuse_dir):
    img = fuse_dir / "disk.img"
    img.write_bytes(bytes(1 << 20))
    mnt = fuse_dir / "mnt"
    mnt.mkdir()
    trace_file = fuse_dir / "trace.jsonl"
    live: list[dict] = []
    with Mount(
        img,
        mnt,
        trace=trace_file,
        options={
            "inject-error.0.event": "write_aio",
            "inject-error.0.sector": 16,
            "inject-error.0.errno": 28,
        },
    ) as m:
        assert sorted(os.listdir(mnt)) == ["control", "disk.img"]
        records = m.trace()

        def follow() -> None:
            for record in records:  # ends when the mount goes
                live.append(record)

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        fd = os.open(m.image_path, os.O_RDWR)
        os.pwrite(fd, b"x" * 4096, 0)
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"y" * 4096, 8192)
        assert e.value.errno == errno.ENOSPC
        os.fsync(fd)
        os.pread(fd, 512, 512)
        os.close(fd)
        assert sorted(os.listdir(mnt)) == ["control", "disk.img"]
    reader.join(60)
    assert not reader.is_alive()  # the stream ended with the mount
    in_file = _records(trace_file)
    assert [_strip(r) for r in in_file] == [
        {
            "op": "write",
            "offset": 0,
            "length": 4096,
            "events": ["write_aio", "pwritev", "pwritev_done"],
            "rules": [],
            "errno": 0,
        },
        {
            "op": "write",
            "offset": 8192,
            "length": 4096,
            "events": ["write_aio", "pwritev", "pwritev_done"],
            "rules": [1],
            "errno": 28,
        },
        {
            "op": "flush",
            "offset": 0,
            "length": 0,
            "events": ["flush_to_os", "flush_to_disk"],
            "rules": [],
            "errno": 0,
        },
        {
            "op": "read",
            "offset": 512,
            "length": 512,
            "events": ["read_aio"],
            "rules": [],
            "errno": 0,
        },
    ]
    assert live == in_file
    for r in in_file:
        if "pid" in r:  # when the FUSE layer passes the caller
            assert r["pid"] == os.getpid()


def test_blkfuse_trace_command(fuse_dir):
    img = fuse_dir / "disk.img"
    img.write_bytes(bytes(1 << 20))
    mnt = fuse_dir / "mnt"
    mnt.mkdir()
    with Mount(img, mnt) as m:
        import subprocess

        # `with`: its stdout pipe is closed after (left open, the garbage collector found it
        # later, in whichever test was running, and warned of an unclosed file)
        with subprocess.Popen(
            client.blkfuse_command() + ["trace", "-n", "2", str(mnt)],
            stdout=subprocess.PIPE,
            text=True,
        ) as p:
            try:
                fd = os.open(m.image_path, os.O_RDWR)
                # Until the command's stream is open, requests are not traced: write until
                # two records came (the command exits after -n 2).
                while p.poll() is None:
                    os.pwrite(fd, b"t" * 512, 0)
                os.close(fd)
                out = p.stdout.read()
            finally:
                if p.poll() is None:
                    p.kill()
        assert p.returncode == 0
        lines = [json.loads(x) for x in out.splitlines()]
        assert [(r["op"], r["offset"], r["length"], r["errno"]) for r in lines] == [
            ("write", 0, 512, 0)
        ] * 2
        with pytest.raises(ControlError) as e:
            m.ctl("trace\nstatus")
        assert e.value.errno == errno.EINVAL and "only command" in e.value.message
    r = blkfuse("trace", mnt)
    assert r.returncode == 1 and "not a blkfuse mount" in r.stderr
    assert not mounttab.is_mounted(mnt)


def test_trace_names_the_caller_and_fallocate_ops(fuse_dir):
    """pid and comm come from the FUSE request (the patched pyfuse3 passes its context);
    fallocate's punch-hole is a discard, zero-range a write-zeroes."""
    img = fuse_dir / "disk.img"
    img.write_bytes(bytes(1 << 20))
    mnt = fuse_dir / "mnt"
    mnt.mkdir()
    trace_file = fuse_dir / "trace.jsonl"
    with Mount(img, mnt, trace=trace_file) as m:
        fd = os.open(m.image_path, os.O_RDWR)
        os.pwrite(fd, b"p" * 4096, 0)
        punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        zero = 0x10  # FALLOC_FL_ZERO_RANGE
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        results = [libc.fallocate(fd, mode, 0, 4096) for mode in (punch, zero)]
        os.close(fd)
    records = _records(trace_file)
    write = records[0]
    assert (write["op"], write["pid"], write["comm"]) == (
        "write",
        os.getpid(),
        Path("/proc/self/comm").read_text().strip(),
    )
    assert results == [0, 0]
    assert [r["op"] for r in records[1:]] == ["discard", "write-zeroes"], records


def test_extension_rules_that_act_are_traced_through_a_mount(fuse_dir):
    """Every rule that acts on a request is in its record's rules: a read failed by a
    probability rule, a write held by a delay rule, a read let through by count's rule
    once it is spent is not (the extension path used to leave them all out)."""
    img = fuse_dir / "disk.img"
    img.write_bytes(bytes(1 << 20))
    mnt = fuse_dir / "mnt"
    mnt.mkdir()
    trace_file = fuse_dir / "trace.jsonl"
    options = {
        "seed": 1,  # random.Random(1)'s first draw is 0.13: the probability rule acts
        "inject-error.0.event": "none",
        "inject-error.0.iotype": "read",
        "inject-error.0.probability": 0.5,
        "inject-error.0.count": 1,
        "inject-error.1.event": "none",
        "inject-error.1.iotype": "write",
        "inject-error.1.delay": "1ms",
    }
    with Mount(img, mnt, trace=trace_file, options=options) as m:
        fd = os.open(m.image_path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 512, 0)
            assert e.value.errno == errno.EIO
            os.pread(fd, 512, 0)  # the rule is spent
            os.pwrite(fd, b"d" * 512, 4096)
        finally:
            os.close(fd)
    got = [(r["op"], r["rules"], r["errno"]) for r in _records(trace_file)]
    assert got == [("read", [1], errno.EIO), ("read", [], 0), ("write", [2], 0)]
