"""Recording through real mounts (-o log-writes=FILE) and `blkfuse replay`/`blkfuse log` on
what was recorded: every mark replays to exactly the image as it was then; a SIGKILLed
daemon's log is complete up to its last acknowledged flush (README "Record and replay")."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from blkfuse.block.image import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)
from blkfuse.crash import logwrites
from blkfuse.crash.logwrites import read_log
from blkfuse.rules import config

from conftest import BLKFUSE

MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replay(log: Path, target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLKFUSE, "replay", str(log), str(target), *args], capture_output=True, text=True
    )


def test_each_mark_replays_to_the_image_as_it_was_then(mount, fuse_dir):
    initial = random.Random(20).randbytes(2 * MiB)
    log = fuse_dir / "disk.log"
    m = mount("-o", f"log-writes={log}", data=initial)
    at_mark: dict[str, str] = {}

    def mark(name: str) -> None:
        m.api.mark(name)
        at_mark[name] = sha(m.image)  # the backing file: what the mount wrote so far

    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"A" * 4096, 0)
        mark("plain")
        os.pwrite(fd, b"B" * 100, 1000)  # unaligned: logged padded to whole sectors
        os.fsync(fd)
        mark("after fsync")
        os.pwritev(fd, [b"C" * 8192], 65536, os.RWF_DSYNC)  # a FUA write
        mark("fua")
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 131072, 16384)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 200000 + 100, 5000)
        mark("discard")
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 262144, 32768)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 300000 + 7, 3000)
        os.fsync(fd)
        mark("zeroes")
        dsync = os.open(m.file, os.O_RDWR | os.O_DSYNC)  # O_DSYNC: every write FUA
        try:
            os.pwrite(dsync, b"D" * 512, 1 << 20)
        finally:
            os.close(dsync)
        os.pwrite(fd, b"E" * 3, 5)
        mark("last")
    finally:
        os.close(fd)
    m.umount()

    superblock, entries = read_log(log)
    listed = list(entries)
    assert superblock.sectorsize == 512 and superblock.nr_entries == len(listed)
    fua = [e for e in listed if e.is_fua]
    assert [(e.sector, e.nr_sectors, e.data) for e in fua] == [
        (128, 16, b"C" * 8192),
        (2048, 1, b"D" * 512),
    ]
    # Each FUA write is followed by the flush that emulates it.
    assert all(listed[e.index + 1].is_flush for e in fua)
    padded = next(e for e in listed if e.sector == 1 and e.is_write)
    assert padded.nr_sectors == 2 and padded.data == (b"A" * 488 + b"B" * 100 + b"A" * 436)
    discards = [(e.sector, e.nr_sectors) for e in listed if e.is_discard]
    assert discards == [(256, 32), (391, 9)]  # the whole sectors; partial ones as writes
    zeroes = [e for e in listed if e.is_write and e.data == bytes(len(e.data or b""))]
    assert (512, 64) in [(e.sector, e.nr_sectors) for e in zeroes]
    assert [e.mark for e in listed if e.is_mark] == list(at_mark)

    target = fuse_dir / "replayed.img"
    for name, expected in at_mark.items():
        target.write_bytes(initial)
        done = replay(log, target, "--end-mark", name)
        assert done.returncode == 0, done.stderr
        assert sha(target) == expected, f"replay to mark {name!r} differs"
    # The whole log gives the final image; --limit and --start-mark as replay-log's.
    target.write_bytes(initial)
    assert replay(log, target).returncode == 0
    assert sha(target) == sha(m.image)
    plain_index = next(e.index for e in listed if e.mark == "plain")
    target.write_bytes(initial)
    assert replay(log, target, "--limit", str(plain_index + 1)).returncode == 0
    assert sha(target) == at_mark["plain"]
    target.write_bytes(initial)
    replay(log, target, "--end-mark", "fua")
    assert replay(log, target, "--start-mark", "fua", "--end-mark", "zeroes").returncode == 0
    assert sha(target) == at_mark["zeroes"]


def test_replay_find_num_entries_check_and_log_listing(mount, fuse_dir):
    log = fuse_dir / "disk.log"
    m = mount("-o", f"log-writes={log}", "-o", "log-sector-size=4096")
    fd = os.open(m.file, os.O_RDWR)
    try:
        for i in range(3):
            os.pwrite(fd, bytes([i + 1]) * 4096, i * 8192)
            os.fsync(fd)
        m.api.mark("three")
    finally:
        os.close(fd)
    m.umount()
    blkfuse = list(BLKFUSE)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(blkfuse + list(args), capture_output=True, text=True)

    # entries: write, flush, write, flush, write, flush, mark: 4096-byte log sectors
    assert run("replay", str(log), "--num-entries").stdout == "7\n"
    assert run("replay", str(log), "--find", "--next-flush").stdout == "1@4\n"
    assert run("replay", str(log), "--find", "--end-mark", "three").stdout == "6@11\n"
    missing = run("replay", str(log), "--find", "--end-mark", "nope")
    assert missing.returncode == 1 and "Couldn't find entry" in missing.stderr
    target = fuse_dir / "t.img"
    target.write_bytes(bytes(MiB))
    calls = fuse_dir / "calls"
    check = run("replay", str(log), str(target), "--check", "flush", "--fsck", f"echo x >> {calls}")
    assert check.returncode == 0 and calls.read_text() == "x\n" * 3
    failing = run("replay", str(log), str(target), "--check", "2", "--fsck", "false")
    assert failing.returncode == 1 and "Fsck errored out on entry 1" in failing.stderr
    lonely = run("replay", str(log), str(target), "--check", "flush")
    assert lonely.returncode == 1 and "--check and --fsck go together" in lonely.stderr

    listing = run("log", str(log))
    assert listing.returncode == 0
    assert "3 writes, 3 flushes, 0 FUA, 0 discards, 1 marks, 12288 bytes" in listing.stdout
    assert listing.stdout.splitlines()[-2].split() == ["6", "0", "0", "MARK", "three"]
    document = json.loads(run("log", "--json", str(log)).stdout)
    assert document["sectorsize"] == 4096
    assert document["entries"][0] == {
        "index": 0,
        "sector": 0,
        "nr_sectors": 1,
        "flags": [],
        "mark": None,
    }
    assert document["summary"]["entries"] == 7
    junk = fuse_dir / "junk"
    junk.write_bytes(b"nope" * 200)
    bad = run("log", str(junk))
    assert bad.returncode == 1 and "not a dm-log-writes log" in bad.stderr


def test_a_sigkilled_daemon_leaves_every_entry_up_to_its_last_flush(mount):
    # The log on another file system than the image (tmpfs vs the scratch directory's).
    logdir = Path(tempfile.mkdtemp(prefix="blkfuse-log-", dir="/dev/shm"))
    try:
        log = logdir / "disk.log"
        initial = random.Random(7).randbytes(MiB)
        m = mount("-o", f"log-writes={log}", data=initial)
        fd = os.open(m.file, os.O_RDWR)
        rng = random.Random(8)
        try:
            for _ in range(200):
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(0, MiB - 4096))
            os.fsync(fd)
            flushed = sha(m.image)
            for _ in range(50):  # never flushed
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(0, MiB - 4096))
        finally:
            os.close(fd)
        pid = m.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        superblock, entries = read_log(log)
        listed = list(entries)
        assert len(listed) == superblock.nr_entries == 201
        assert listed[-1].is_flush
        target = logdir / "t.img"
        target.write_bytes(initial)
        assert replay(log, target).returncode == 0
        assert sha(target) == flushed
        # The unflushed writes made it to the log too (the page cache outlives the daemon).
        _, trailing = read_log(log, trailing=True)
        assert len(list(trailing)) == 251
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def test_mark_needs_the_option_and_a_name_that_fits(mount, fuse_dir):
    plain = mount()
    with pytest.raises(OSError) as e:
        plain.ctl("mark here")
    assert e.value.errno == errno.EINVAL
    assert "-o log-writes=FILE" in plain.status()["last_error"]
    assert plain.status()["log_writes"] is None
    log = fuse_dir / "x.log"
    m = mount("-o", f"log-writes={log}")
    with pytest.raises(OSError) as e:
        m.ctl("mark " + "m" * 480)
    assert e.value.errno == errno.EINVAL
    assert "mark name must be 1 to 479 bytes" in m.status()["last_error"]
    assert m.ctl("mark 'two words'").startswith("mark two words: entry 0")
    assert m.status()["log_writes"] == {"path": str(log), "entries": 1, "sectorsize": 512}


def test_log_append_continues_and_a_resize_replays(mount, fuse_dir):
    log = fuse_dir / "grow.log"
    m = mount("-o", f"log-writes={log}", "-o", "growable=on", size=65536)
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 512, 0)
        os.ftruncate(fd, 131072)
        os.pwrite(fd, b"y" * 512, 100000)
        os.ftruncate(fd, 70000)
    finally:
        os.close(fd)
    m.umount()
    again = mount("-o", f"log-writes={log}", "-o", "log-append=on", image=m.image)
    again.api.mark("second mount")
    final = sha(m.image)
    again.umount()
    marks = [e.mark for e in read_log(log)[1] if e.is_mark]
    assert marks == ["resize:131072", "resize:70000", "second mount"]
    target = fuse_dir / "t.img"
    target.write_bytes(bytes(65536))
    assert replay(log, target).returncode == 0
    assert sha(target) == final and target.stat().st_size == 70000


def test_options_are_checked_as_qemu_checks_them_and_marked_as_extensions():
    for options, message in (
        ({"log-sector-size": "4096"}, "only means something with log-writes=FILE"),
        ({"log-writes": "l", "log-sector-size": "1000"}, "power of two from 32 to 8M"),
        ({"log-writes": "l", "log-append": "on", "log-sector-size": "512"}, "mutually exclusive"),
        ({"log-writes": "l", "log-super-update-interval": "0"}, "at least 1"),
    ):
        with pytest.raises(config.ConfigError, match=message):
            config.parse_options(options)
    _, settings = config.parse_options(
        {"log-writes": "l", "log-sector-size": "4k", "log-super-update-interval": "16"}
    )
    assert (settings.log_writes, settings.log_sector_size) == ("l", 4096)
    assert settings.log_super_update_interval == 16
    checked = subprocess.run(
        [*BLKFUSE, "check", "-o", "log-writes=/tmp/x.log"], capture_output=True, text=True
    )
    assert checked.returncode == 0
    assert "log-writes=/tmp/x.log (not portable" in checked.stdout
    qemu = subprocess.run(
        [*BLKFUSE, "check", "--qemu", "-o", "log-writes=/tmp/x.log,log-append=on"],
        capture_output=True,
        text=True,
    )
    assert qemu.returncode == 1
    assert 'option log-append: "log-append" is a blkfuse extension option' in qemu.stderr


def test_a_log_that_cannot_be_opened_fails_the_mount_by_name(mount, fuse_dir):
    junk = fuse_dir / "junk.log"
    junk.write_bytes(b"not a log" * 100)
    m, done = mount("-o", f"log-writes={junk}", "-o", "log-append=on", expect_ok=False)
    assert done.returncode != 0
    assert f"option log-writes: {junk}: " in done.stderr
    assert "not a dm-log-writes log" in done.stderr
    assert logwrites.DEFAULT_SECTOR_SIZE == 512


def test_a_power_cut_appends_a_powercut_mark_after_everything_that_reached_the_image(
    mount, fuse_dir
):
    log = fuse_dir / "cut.log"
    initial = bytes(MiB)
    m = mount("-o", "track-unsynced=on", "-o", f"log-writes={log}", data=initial)
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"S" * 4096, 0)
        os.fsync(fd)
        synced = sha(m.image)
        os.pwrite(fd, b"U" * 4096, 8192)  # unsynced: the cut takes it back
        before_cut = sha(m.image)
    finally:
        os.close(fd)
    m.ctl("powercut keep=none")
    assert sha(m.image) == synced
    listed = list(read_log(log)[1])  # the cut synced the superblock
    assert [e.flags_text for e in listed] == ["NONE", "FLUSH", "NONE", "MARK"]
    assert listed[-1].mark == "powercut"
    target = fuse_dir / "t.img"
    target.write_bytes(initial)
    assert replay(log, target, "--end-mark", "powercut").returncode == 0
    assert sha(target) == before_cut  # what reached the image; the take-back is not logged
    target.write_bytes(initial)
    assert replay(log, target, "--next-flush").returncode == 0
    assert sha(target) == synced


def test_a_failed_write_is_not_logged_and_a_torn_one_logs_what_it_wrote(mount, fuse_dir):
    log = fuse_dir / "rules.log"
    m = mount(
        "-o",
        f"log-writes={log},"
        "inject-error.0.event=none,inject-error.0.iotype=write,inject-error.0.errno=5,"
        "inject-error.0.sector=8,inject-error.0.once=on,"
        "inject-error.1.event=none,inject-error.1.iotype=write,inject-error.1.errno=5,"
        "inject-error.1.sector=64,inject-error.1.torn=3,inject-error.1.once=on",
        data=bytes(MiB),
    )
    fd = os.open(m.file, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"F" * 4096, 4096)  # failed by rule 0 before the image
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError):
            os.pwrite(fd, b"T" * 4096, 32768)  # torn by rule 1: 3 sectors persist
        os.pwrite(fd, b"K" * 512, 0)
    finally:
        os.close(fd)
    m.umount()
    written = [(e.sector, e.nr_sectors, e.data) for e in read_log(log)[1] if e.is_write]
    assert written == [(64, 3, b"T" * 1536), (0, 1, b"K" * 512)]
    assert m.image.read_bytes()[32768:36864] == b"T" * 1536 + bytes(2560)


def test_replay_onto_a_loop_device_gives_the_recorded_image(mount, fuse_dir):
    from blkfuse.client.fsstack import loop_device

    log = fuse_dir / "dev.log"
    initial = random.Random(3).randbytes(MiB)
    m = mount("-o", f"log-writes={log}", data=initial)
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"W" * 8192, 16384)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 65536)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 262144, 4096)
        m.api.mark("done")
    finally:
        os.close(fd)
    m.umount()
    assert [e.flags_text for e in read_log(log)[1]] == ["NONE", "DISCARD", "NONE", "MARK", "FLUSH"]
    backing = fuse_dir / "device-backing.img"
    backing.write_bytes(initial)
    with loop_device(backing, direct_io=False) as device:
        done = replay(log, Path(device), "--end-mark", "done", "-v")
        assert done.returncode == 0, done.stderr
        assert "replaying 1@" in done.stdout and "DISCARD" in done.stdout
    assert sha(backing) == sha(m.image)


def test_a_full_log_fails_the_request_with_its_errno_and_stays_readable(mount, fuse_dir):
    small = fuse_dir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        log = small / "full.log"
        m = mount("-o", f"log-writes={log}")
        fd = os.open(m.file, os.O_RDWR)
        failed = None
        try:
            for i in range(40):  # 40 x (4 KiB + a header) > 64 KiB
                try:
                    os.pwrite(fd, bytes([i + 1]) * 4096, i * 4096)
                    os.fsync(fd)
                except OSError as e:
                    failed = (i, e.errno)
                    break
        finally:
            os.close(fd)
        assert failed is not None and failed[1] == errno.ENOSPC
        m.umount()
        listed = list(read_log(log)[1])
        assert listed and all(e.is_write or e.is_flush for e in listed)
        assert [e.sector for e in listed if e.is_write] == [8 * i for i in range(failed[0])]
    finally:
        subprocess.run(["umount", str(small)], check=True)
