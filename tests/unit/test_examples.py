"""The shipped example configs parse, and do what their comments say (block layer)."""

import errno
from pathlib import Path

import trio
from support.device import build_device

from blkfuse.engine.core import Engine
from blkfuse.rules.config import parse_config_file

EXAMPLES = Path(__file__).resolve().parents[2] / "blkfuse" / "examples"


def outcomes(tmp_path, name, ops):
    path = tmp_path / "img"
    path.write_bytes(bytes(4 << 20))
    device = build_device(path, Engine(parse_config_file(str(EXAMPLES / name))))
    results = []

    async def main():
        for op, offset in ops:
            try:
                if op == "read":
                    await device.read(offset, 4096)
                elif op == "write":
                    await device.write(offset, b"x" * 4096)
                else:
                    await device.flush()
                results.append("ok")
            except OSError as failure:
                results.append(errno.errorcode[failure.errno])

    trio.run(main)
    return results


def test_every_example_is_listed_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.conf")) == [
        "enospc-after-first-flush.conf",
        "one-bad-sector.conf",
        "third-write-fails.conf",
    ]


def test_one_bad_sector(tmp_path):
    assert outcomes(
        tmp_path,
        "one-bad-sector.conf",
        [
            ("read", 2048 * 512 - 4096),
            ("read", 2048 * 512),
            ("write", 2048 * 512),
            ("read", 2048 * 512 + 4096),
            ("flush", 0),
        ],
    ) == ["ok", "EIO", "EIO", "ok", "ok"]


def test_third_write_fails(tmp_path):
    assert outcomes(tmp_path, "third-write-fails.conf", [("write", 0)] * 5) == [
        "ok",
        "ok",
        "EIO",
        "ok",
        "ok",
    ]


def test_enospc_after_first_flush(tmp_path):
    assert outcomes(
        tmp_path,
        "enospc-after-first-flush.conf",
        [
            ("write", 0),
            ("read", 0),
            ("flush", 0),
            ("read", 0),
            ("write", 0),
            ("flush", 0),
            ("write", 4096),
        ],
    ) == ["ok", "ok", "ok", "ok", "ENOSPC", "ok", "ENOSPC"]
