"""QEMU profiles (-o qemu=7.2|10.0, blkfuse/rules/profiles.py): each switch, on the engine, the
block layer and through a real mount; the option, the status and `blkfuse check`. The oracle
cases replay both versions' recorded answers (test_oracle_cases.py)."""

import errno
import json
import os

import pytest
import trio
from support.device import build_device

from blkfuse.crash.logwrites import FLUSH, read_log
from blkfuse.engine.core import Engine
from blkfuse.rules.config import ConfigError, parse_config_text, parse_options
from blkfuse.rules.profiles import DEFAULT, PROFILES, QEMU_7_2, QEMU_10_0, for_version, profile

from conftest import blkfuse

ONCE_ERRNO0 = '[inject-error]\nevent = "read_aio"\nerrno = "0"\nonce = "on"\n'


class Recorder(Engine):
    """An engine that remembers the events and checks in order."""

    def __init__(self, rules=(), **kw):
        self.trace = []
        super().__init__(rules, **kw)

    def fire(self, event, request=None):
        self.trace.append(event)
        return super().fire(event, request)

    def check(self, iotype, offset, length, caller=None):
        self.trace.append((iotype, offset, length))
        return super().check(iotype, offset, length, caller)


def test_profiles_and_the_default():
    assert set(PROFILES) == {"7.2", "10.0"} and DEFAULT is QEMU_7_2
    assert profile("10.0") is QEMU_10_0
    assert parse_options({})[1].qemu == "7.2"
    assert parse_options({"qemu": "10.0"})[1].qemu == "10.0"
    with pytest.raises(ConfigError, match=r'option qemu: unknown QEMU profile "10"'):
        parse_options({"qemu": "10"})
    with pytest.raises(ConfigError, match='did you mean "7.2"'):
        parse_options({"qemu": "7.3"})


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("qemu-io version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", "7.2"),
        ("qemu-io version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)", "10.0"),
        ("qemu-io version 8.2.2", "7.2"),
        ("qemu-io version 11.1.0", "10.0"),
        ("qemu-io version 6.2.0", "7.2"),
    ],
)
def test_the_profile_of_an_installed_qemu(version, name):
    assert for_version(version).name == name


@pytest.mark.parametrize(("qemu", "spent"), [(QEMU_7_2, False), (QEMU_10_0, True)])
def test_a_once_rule_with_errno_0(qemu, spent):
    """7.2's rule_check returns before the once removal when errno is 0; 10.0 removes first."""
    engine = Engine(parse_config_text(ONCE_ERRNO0, "t.conf"), profile=qemu)
    engine.fire("read_aio")
    assert engine.check("read", 0, 512) == 0
    engine.fire("read_aio")
    assert engine.check("read", 0, 512) == 0
    (rule,) = engine.rules()
    assert (rule.spent, rule.hits) == ((True, 1) if spent else (False, 2))


def _device(tmp_path, qemu, config="", **kw):
    tmp_path.mkdir()
    path = tmp_path / "img.raw"
    path.write_bytes(bytes(65536))
    engine = Recorder(parse_config_text(config, "t.conf"), profile=qemu)
    return build_device(path, engine, qemu=qemu.name, **kw), engine, path


@pytest.mark.parametrize("cache", ["writethrough", "directsync"])
@pytest.mark.parametrize("fmt", ["raw", "none"])
def test_a_fua_write_is_a_flush_in_7_2_and_reaches_the_file_in_10_0(tmp_path, cache, fmt):
    config = '[inject-error]\nevent = "none"\niotype = "flush"\nerrno = "5"\n'
    for qemu in (QEMU_7_2, QEMU_10_0):
        dev, engine, path = _device(tmp_path / qemu.name, qemu, config, cache=cache, format=fmt)

        async def main(dev=dev):
            failed = []
            for offset, byte in ((0, b"a"), (4096, b"b")):
                try:
                    await dev.write(offset, byte * 4096)
                except OSError as failure:
                    failed.append(failure.errno)
            return failed

        failed = trio.run(main)
        dev.stack.image.close()
        flushes = [e for e in engine.trace if e in ("flush_to_os", "flush_to_disk")]
        if qemu is QEMU_7_2:
            # the flush after the write is checked once something was written before it
            assert failed == ([errno.EIO] * 2 if fmt == "raw" else [errno.EIO])
            assert (fmt == "raw") is ("flush_to_os" in flushes)
        else:
            assert failed == [] and flushes == []
        assert path.read_bytes()[:8192] == b"a" * 4096 + b"b" * 4096


def test_status_shows_the_profile(mount):
    m = mount("-o", "qemu=10.0")
    assert m.status()["info"]["qemu"] == "10.0"
    assert "qemu=10.0" in m.status_text().splitlines()[0]
    status = json.loads(blkfuse("status", "--json", m.mnt).stdout)
    assert status["info"]["qemu"] == "10.0"


@pytest.mark.parametrize(("qemu", "spent"), [("7.2", False), ("10.0", True)])
def test_once_errno_0_through_a_mount(mount, qemu, spent):
    m = mount("-o", f"qemu={qemu},cache=none")
    m.ctl("inject-error event=read_aio errno=0 once=on")
    fd = os.open(m.file, os.O_RDONLY)
    try:
        os.pread(fd, 512, 0)
        os.pread(fd, 512, 0)
    finally:
        os.close(fd)
    (rule,) = m.status()["rules"]
    assert (rule["spent"], rule["hits"]) == ((True, 1) if spent else (False, 2))


@pytest.mark.parametrize(("qemu", "fails"), [("7.2", True), ("10.0", False)])
def test_an_rwf_dsync_write_under_each_profile(mount, qemu, fails):
    m = mount("-o", f"qemu={qemu}", size=1 << 20)
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"p" * 4096, 0)
        m.ctl("inject-error event=none iotype=flush errno=5")
        if fails:
            with pytest.raises(OSError) as e:
                os.pwritev(fd, [b"s" * 4096], 8192, os.RWF_DSYNC)
            assert e.value.errno == errno.EIO
        else:
            assert os.pwritev(fd, [b"s" * 4096], 8192, os.RWF_DSYNC) == 4096
    finally:
        os.close(fd)
    events = m.status()["events"]
    assert ("flush_to_os" in events) is fails
    with open(m.image, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"s" * 4096  # the data reached the image either way


def test_check_names_the_profile_and_what_it_changes(tmp_path):
    conf = tmp_path / "r.conf"
    conf.write_text(ONCE_ERRNO0)
    out = blkfuse("check", str(conf), "-o", "qemu=10.0,cache=writethrough").stdout
    assert f"{conf}:1: once with errno 0: spent by its first match (QEMU 10.0" in out
    assert "cache=writethrough under QEMU 10.0: FUA writes to the file" in out
    assert "qemu=10.0 (QEMU 10.0's blkdebug and block layer)" in out
    out = blkfuse("check", str(conf)).stdout
    assert "stays armed after a match (QEMU 7.2; 10.0 spends it)" in out
    # --qemu validates against the profile: qemu= itself is not an extension to reject
    r = blkfuse("check", "--qemu", str(conf), "-o", "qemu=10.0", check=False)
    assert r.returncode == 0, r.stderr
    r = blkfuse("check", "--qemu", str(conf), "-o", "qemu=10.0,seed=3", check=False)
    assert r.returncode == 1 and "QEMU 10.0 would reject 1 key" in r.stderr


@pytest.mark.parametrize("qemu", [QEMU_7_2, QEMU_10_0])
def test_punch_hole_under_each_profile(tmp_path, qemu):
    """fallocate(PUNCH_HOLE) as each QEMU's FUSE export maps it: a discard (7.2), or a
    write-zeroes that may unmap and must not fall back (10.0; qsd 10.0.13, measured)."""
    from blkfuse.block.image import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

    punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    rules = (
        '[inject-error]\nevent = "none"\niotype = "discard"\nsector = "20"\n'
        '[inject-error]\nevent = "none"\niotype = "write-zeroes"\nsector = "40"\n'
    )
    dev, engine, path = _device(tmp_path / "d", qemu, rules, align=4096)
    path.write_bytes(b"\x11" * 65536)
    ranges = ((0, 4608), (4096, 4096), (8192, 4096), (20480, 4096), (100, 10))

    async def main():
        answers = []
        for offset, length in ranges:
            try:
                await dev.fallocate(punch, offset, length)
                answers.append("ok")
            except OSError as e:
                answers.append(errno.errorcode[e.errno])
        return answers

    answers = trio.run(main)
    dev.stack.image.close()
    data = path.read_bytes()
    events = [e for e in engine.trace if isinstance(e, str) and e != "none"]
    if qemu is QEMU_7_2:  # discards: whole blocks only, the 512-byte tail dropped unchecked
        assert answers == ["ok", "ok", "EIO", "ok", "ok"]
        assert data[:8192] == bytes(8192) and data[8192:12288] == b"\x11" * 4096
        assert events == []  # a discard raises no event
    else:  # padding refused before any event, nothing zeroed; write-zeroes rules apply
        assert answers == ["ENOTSUP", "ok", "ok", "EIO", "ENOTSUP"]
        assert data[:4096] == b"\x11" * 4096 and data[4096:12288] == bytes(8192)
        assert events == ["pwritev_zero", "pwritev_done"] * 3
    # the write-zeroes rule's range: discarded in 7.2, refused (EIO) in 10.0
    assert data[20480:24576] == (bytes(4096) if qemu is QEMU_7_2 else b"\x11" * 4096)


@pytest.mark.parametrize("qemu", [QEMU_7_2, QEMU_10_0])
def test_a_fua_write_over_the_write_recorder_is_a_flush_under_each_profile(tmp_path, qemu):
    """QEMU's blklogwrites takes no FUA, so even 10.0 emulates a FUA write above it with a
    flush: the log has a flush entry after each FUA write, and the flush events fire (what
    qemu-io 10.0 logs with cache=directsync, tests/test_logwrites_differential.py)."""
    log = tmp_path / "w.log"
    dev, engine, _ = _device(
        tmp_path / "d", qemu, cache="directsync", format="raw", log_writes=str(log)
    )

    async def main():
        for offset, byte in ((0, b"a"), (4096, b"b"), (8192, b"c")):
            await dev.write(offset, byte * 4096)

    trio.run(main)
    dev.stack.close()
    entries = list(read_log(log, trailing=True)[1])
    kinds = ["flush" if e.flags & FLUSH else e.sector for e in entries]
    assert kinds == [0, "flush", 8, "flush", 16, "flush"]
    assert "flush_to_os" in engine.trace
