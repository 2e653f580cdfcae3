"""discard, write-zeroes, block status (SEEK_DATA/SEEK_HOLE), cache modes and format=none on
the block layer, beyond what the oracle cases and the differential test against qemu-io cover:
the backing file's holes, lseek's answers, option errors."""

import errno
import os

import pytest
import trio
from support.device import build_device
from support.recorder import Recorder

from blkfuse.daemon.callers import Caller
from blkfuse.engine.core import Engine
from blkfuse.rules.config import ConfigError, parse_config_text, parse_options


def device(tmp_path, size=65536, fill=0x77, config="", **kw):
    path = tmp_path / "img.raw"
    path.write_bytes(bytes([fill]) * size)
    engine = Engine(parse_config_text(config, "t.conf"))
    recorder = Recorder(engine)  # events and checks, through the engine's tracer hooks
    return build_device(path, engine, **kw), recorder, path


def run(fn, *args):
    return trio.run(fn, *args)


def test_discard_punches_a_hole_and_checks_discard(tmp_path):
    dev, engine, path = device(tmp_path)

    async def main():
        await dev.discard(8192, 16384)
        assert await dev.seek(0, os.SEEK_HOLE) == 8192
        assert await dev.seek(8192, os.SEEK_DATA) == 24576

    run(main)
    assert path.read_bytes()[8192:24576] == bytes(16384)
    assert path.read_bytes()[:8192] == b"\x77" * 8192
    assert ("discard", 8192, 16384) in engine.trace
    assert not [e for e in engine.trace if isinstance(e, str)]  # discard raises no event


def test_discard_splits_at_opt_discard_and_max_discard(tmp_path):
    dev, engine, _ = device(tmp_path, align=512, opt_discard=4096, max_discard=8192)
    run(dev.discard, 100, 20000)
    checks = [e[1:] for e in engine.trace if e[0] == "discard"]
    # [100, 512) is shorter than align: dropped unchecked; then up to the 4096 boundary,
    # at most 8192 bytes, up to the last 4096 boundary, its whole sectors, and the last
    # 132 bytes (shorter than align) dropped.
    assert checks == [(512, 3584), (4096, 8192), (12288, 4096), (16384, 3584)]


def test_write_zeroes_events_and_fallback_to_write(tmp_path):
    dev, engine, path = device(tmp_path, opt_write_zero=4096)
    run(dev.write_zeroes, 1000, 8000)
    assert engine.trace == [
        "pwritev_zero",
        ("write", 1000, 3096),
        ("write-zeroes", 4096, 4096),
        ("write", 8192, 808),
        "pwritev_done",
    ]
    data = path.read_bytes()
    assert data[1000:9000] == bytes(8000) and data[999] == data[9000] == 0x77


def test_write_zeroes_with_align_pads_like_a_write(tmp_path):
    dev, engine, path = device(tmp_path, align=4096)
    run(dev.write_zeroes, 100, 10000)
    events = [e for e in engine.trace if isinstance(e, str)]
    assert events == [
        "pwritev_rmw_head",
        "pwritev_rmw_after_head",
        "pwritev_rmw_tail",
        "pwritev_rmw_after_tail",
        "pwritev",
        "pwritev_done",
        "pwritev_zero",
        "pwritev_done",
        "pwritev",
        "pwritev_done",
    ]
    data = path.read_bytes()
    assert data[100:10100] == bytes(10000) and data[99] == data[10100] == 0x77


def test_seek_answers_as_qemus_fuse_export(tmp_path):
    dev, engine, _ = device(tmp_path, size=65536)

    async def main():
        assert await dev.seek(0, os.SEEK_DATA) == 0
        assert await dev.seek(100, os.SEEK_HOLE) == 65536
        with pytest.raises(OSError) as info:
            await dev.seek(65536, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
        with pytest.raises(OSError) as info:
            await dev.seek(70000, os.SEEK_HOLE)
        assert info.value.errno == errno.ENXIO
        with pytest.raises(OSError) as info:
            await dev.seek(0, os.SEEK_SET)
        assert info.value.errno == errno.EINVAL

    run(main)
    assert engine.trace[0] == ("block-status", 0, 65536)


def test_block_status_rule_fails_seek(tmp_path):
    config = '[inject-error]\nevent = "none"\niotype = "block-status"\nsector = "100"\n'
    dev, _, _ = device(tmp_path, config=config)

    async def main():
        with pytest.raises(OSError) as info:
            await dev.seek(0, os.SEEK_HOLE, caller=Caller(1, 0, 0))
        assert info.value.errno == errno.EIO
        assert await dev.seek(51200 + 512, os.SEEK_DATA) == 51712  # past the sector

    run(main)


def test_unsafe_flush_never_reaches_blkdebug(tmp_path):
    config = '[inject-error]\nevent = "none"\niotype = "flush"\n'
    dev, engine, _ = device(tmp_path, config=config, cache="unsafe")

    async def main():
        await dev.write(0, b"x" * 512)
        await dev.flush()

    run(main)
    assert "flush_to_disk" not in engine.trace and ("flush", 0, 0) not in engine.trace


def test_the_recorder_sees_writes_and_flushes_checked(tmp_path):
    """The counterpart of the test above: in writeback mode the same write and flush are
    checked, and the recorder (on the engine's tracer hooks) sees both."""
    dev, engine, _ = device(tmp_path)

    async def main():
        await dev.write(0, b"x" * 512)
        await dev.flush()

    run(main)
    assert engine.trace == [
        "write_aio",
        "pwritev",
        ("write", 0, 512),
        "pwritev_done",
        "flush_to_os",
        "flush_to_disk",
        ("flush", 0, 0),
    ]


def test_format_none_raises_no_raw_events(tmp_path):
    dev, engine, _ = device(tmp_path, format="none")

    async def main():
        await dev.read(0, 512)
        await dev.write(0, b"x" * 512)
        await dev.flush()

    run(main)
    events = [e for e in engine.trace if isinstance(e, str)]
    assert events == ["pwritev", "pwritev_done"]


@pytest.mark.parametrize("cache", ["none", "directsync"])
def test_o_direct_handles_unaligned_requests_and_the_size_tail(tmp_path, cache):
    dev, _, path = device(tmp_path, size=10000, cache=cache)

    async def main():
        await dev.write(4000, b"\x11" * 6500)  # past the end, unaligned
        assert await dev.read(3990, 20) == b"\x77" * 10 + b"\x11" * 10
        await dev.write_zeroes(5000, 100)

    run(main)
    data = path.read_bytes()
    assert len(data) == 10500
    assert data[4000:5000] == b"\x11" * 1000 and data[5000:5100] == bytes(100)
    assert data[5100:] == b"\x11" * 5400 and data[:4000] == b"\x77" * 4000


def test_options_cache_format_and_limits():
    _, s = parse_options(
        {
            "cache": "directsync",
            "format": "none",
            "align": "512",
            "opt-write-zero": "4k",
            "max-write-zero": "8k",
            "opt-discard": "4096",
            "max-discard": "64k",
        }
    )
    assert (
        s.cache,
        s.format,
        s.opt_write_zero,
        s.max_write_zero,
        s.opt_discard,
        s.max_discard,
    ) == ("directsync", "none", 4096, 8192, 4096, 65536)
    with pytest.raises(ConfigError, match='did you mean "unsafe"'):
        parse_options({"cache": "unsafr"})
    with pytest.raises(ConfigError, match="format"):
        parse_options({"format": "qcow2"})
    with pytest.raises(ConfigError, match="max-discard: 6144 is not a multiple of 4096"):
        parse_options({"opt-discard": "4096", "max-discard": "6144"})
    with pytest.raises(ConfigError, match="opt-write-zero: must be positive"):
        parse_options({"opt-write-zero": "0"})


def test_status_shows_the_cache_mode_and_format():
    from blkfuse.daemon.control import Control

    control = Control(
        Engine(),
        info={"image": "/x.img", "cache": "directsync", "format": "none", "opt_discard": 4096},
    )
    first = control.status_text().splitlines()[0]
    assert first == "image: /x.img (cache=directsync, format=none, opt-discard=4096)"


def test_fallocate_maps_modes_as_qemus_fuse_export(tmp_path):
    from blkfuse.block.image import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

    dev, engine, path = device(tmp_path, size=16384)

    async def main():
        await dev.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 12288, 8192)
        await dev.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 15000, 4096)
        assert dev.size() == 16384
        await dev.fallocate(FALLOC_FL_ZERO_RANGE, 16000, 1000)
        assert dev.size() == 17000
        await dev.fallocate(0, 17000, 1000)
        assert dev.size() == 18000
        for mode, error in (
            (0, errno.EOPNOTSUPP),
            (FALLOC_FL_PUNCH_HOLE, errno.EINVAL),
            (FALLOC_FL_KEEP_SIZE, errno.EOPNOTSUPP),
        ):
            with pytest.raises(OSError) as info:
                await dev.fallocate(mode, 0, 512)
            assert info.value.errno == error

    run(main)
    checks = [e for e in engine.trace if isinstance(e, tuple)]
    assert checks == [
        ("discard", 12288, 4096),
        ("write-zeroes", 15000, 1384),
        ("write-zeroes", 16000, 1000),
    ]
    assert path.read_bytes()[12288:17000] == bytes(4712)


def test_truncate_counts_as_written(tmp_path):
    config = '[inject-error]\nevent = "none"\niotype = "flush"\nerrno = "28"\n'
    dev, engine, _ = device(tmp_path, config=config)

    async def main():
        await dev.flush()  # nothing written: not checked
        dev.truncate(70000)
        with pytest.raises(OSError) as info:
            await dev.flush()
        assert info.value.errno == errno.ENOSPC

    run(main)
    assert "flush_to_disk" in engine.trace


@pytest.mark.parametrize(
    "mode, offset, length, decoded, size",
    [
        (0x03, 0, 4096, "discard", 8192),  # PUNCH_HOLE|KEEP_SIZE
        (0x10, 4096, 8192, "write-zeroes", 12288),  # ZERO_RANGE: grows
        (0x11, 4096, 8192, "write-zeroes", 8192),  # ZERO_RANGE|KEEP_SIZE: clamped
        (0x00, 8192, 4096, "allocate", 12288),  # past the end: grows
        (0x00, 4096, 8192, "allocate", 8192),  # inside: EOPNOTSUPP when run
        (0x02, 0, 4096, errno.EINVAL, None),  # PUNCH_HOLE without KEEP_SIZE
        (0x08, 0, 4096, errno.EOPNOTSUPP, None),  # COLLAPSE_RANGE
        (0x13, 0, 4096, errno.EOPNOTSUPP, None),  # PUNCH_HOLE|KEEP_SIZE|ZERO_RANGE
    ],
)
def test_fallocate_modes_are_decoded_in_one_place(mode, offset, length, decoded, size):
    from blkfuse.block.device import fallocate_request, fallocate_size

    if isinstance(decoded, int):
        for decode in (lambda: fallocate_request(mode), lambda: fallocate_size(mode, 0, 1, 8192)):
            with pytest.raises(OSError) as info:
                decode()
            assert info.value.errno == decoded
        return
    assert fallocate_request(mode) == decoded
    assert fallocate_size(mode, offset, length, 8192) == size
