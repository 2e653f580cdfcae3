"""The extension keys through a real mount (README "Beyond blkdebug"): what os.pread,
os.pwrite and dd see. No timing thresholds: a delay is shown by ordering alone."""

import errno
import os
import subprocess
import threading

import pytest

from conftest import blkfuse
from imageio import pattern

KiB = 1024


def _errnos(m, n, flags, io):
    """n calls of io(fd) on the image file: None for a success, else the errno."""
    fd = os.open(m.file, flags)
    try:
        out = []
        for _ in range(n):
            try:
                io(fd)
                out.append(None)
            except OSError as e:
                out.append(e.errno)
        return out
    finally:
        os.close(fd)


def reads(m, n, offset=0, length=512):
    """n preads of the image file: None for a success, else the errno."""
    return _errnos(m, n, os.O_RDONLY, lambda fd: os.pread(fd, length, offset))


def writes(m, n, offset=0, length=512):
    return _errnos(m, n, os.O_RDWR, lambda fd: os.pwrite(fd, b"w" * length, offset))


def test_probability_is_binomial_and_replays_with_the_seed(mount):
    rule = "inject-error.0.event=none,inject-error.0.probability=0.3,inject-error.0.iotype=read"
    n = 400
    first = mount("-o", rule + ",seed=1234")
    outcome = reads(first, n)
    failed = outcome.count(errno.EIO)
    # mean 120, sd 9.2: 6 sd either side (and the seed fixes the draw: this never flickers)
    assert 65 <= failed <= 175, failed
    assert first.status()["seed"] == 1234
    assert first.status()["rules"][0]["failed"] == failed
    first.umount()
    again = mount("-o", rule + ",seed=1234")
    assert reads(again, n) == outcome  # same seed, same requests: same failures
    again.umount()
    other = mount("-o", rule + ",seed=1235")
    assert reads(other, n) != outcome


def test_random_seed_is_shown_and_replays(mount):
    rule = "inject-error.0.event=none,inject-error.0.probability=0.5"
    m = mount("-o", rule)
    seed = m.status()["seed"]
    assert f"seed: {seed}" in m.status_text()
    outcome = reads(m, 64)
    m.umount()
    assert reads(mount("-o", f"{rule},seed={seed}"), 64) == outcome


def test_after_and_count_are_exact(mount):
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.after=3,inject-error.0.count=2,"
        "inject-error.0.iotype=write,inject-error.0.errno=ENOSPC",
    )
    assert writes(m, 8) == [None] * 3 + [errno.ENOSPC] * 2 + [None] * 3
    st = m.status()
    assert st["rules"][0]["spent"] and st["errors_injected"][0]["count"] == 2


def test_sector_range(mount):
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.sector=16,inject-error.0.sectors=8",
        data=pattern(64 * KiB),
    )
    assert [reads(m, 1, sector * 512)[0] for sector in (15, 16, 20, 23, 24)] == [
        None,
        errno.EIO,
        errno.EIO,
        errno.EIO,
        None,
    ]
    assert reads(m, 1, 0, 64 * KiB) == [errno.EIO]  # overlapping read
    assert reads(m, 1, 15 * 512 + 511, 2) == [errno.EIO]  # one byte into the range


class Reader(threading.Thread):
    def __init__(self, m, offset):
        super().__init__(daemon=True)
        self.m, self.offset = m, offset
        self.data = self.error = None

    def run(self):
        try:
            fd = os.open(self.m.file, os.O_RDONLY)
            try:
                self.data = os.pread(fd, 512, self.offset)
            finally:
                os.close(fd)
        except OSError as e:
            self.error = e


def test_a_delayed_read_lets_a_read_elsewhere_complete_first(mount):
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.sector=0,inject-error.0.sectors=1,"
        "inject-error.0.delay=3600s,inject-error.0.iotype=read",
        data=pattern(64 * KiB),
    )
    slow = Reader(m, 0)
    slow.start()
    # the daemon counts the delay when it starts holding the read
    while m.status()["held_by_delay"] != 1:
        assert slow.is_alive(), slow.error
        threading.Event().wait(0.01)
    fast = Reader(m, 8192)
    fast.start()
    fast.join()
    assert fast.data == pattern(64 * KiB)[8192:8704]
    assert slow.is_alive() and m.status()["held_by_delay"] == 1  # still held: ordering, not time
    assert m.status()["held"] == 1  # the old name of held_by_delay, kept for one release
    assert m.status()["rules"][0]["delayed"] == 1
    # unmounting ends the hold and the read goes on (--lazy: the reader still has it open)
    blkfuse("umount", "--lazy", m.mnt, check=True)
    slow.join()
    assert slow.data == pattern(64 * KiB)[:512]


def test_corruption_is_in_what_was_read_and_nowhere_else(mount):
    data = pattern(64 * KiB)
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.sector=8,inject-error.0.sectors=8,"
        "inject-error.0.corrupt=flip,inject-error.0.corrupt-bytes=3,"
        "inject-error.0.iotype=read",
        data=data,
    )
    fd = os.open(m.file, os.O_RDONLY)
    got = os.pread(fd, 16 * KiB, 0)
    changed = [i for i in range(len(got)) if got[i] != data[i]]
    assert len(changed) == 3 and all(4096 <= i < 8192 for i in changed)
    assert os.pread(fd, 4 * KiB, 8 * KiB) == data[8 * KiB : 12 * KiB]  # elsewhere: clean
    os.close(fd)
    assert m.image.read_bytes() == data  # image untouched
    assert m.status()["rules"][0]["corrupted"] == 1


def test_corruption_is_in_what_was_written_and_the_write_succeeds(mount):
    data = pattern(64 * KiB)
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.corrupt=zero,"
        "inject-error.0.corrupt-bytes=4,inject-error.0.iotype=write",
        data=data,
    )
    payload = b"\xa5" * 4096  # no zero byte: each zeroed byte shows
    fd = os.open(m.file, os.O_RDWR)
    assert os.pwrite(fd, payload, 12 * KiB) == 4096
    os.close(fd)
    expected = data[: 12 * KiB] + payload + data[16 * KiB :]
    image = m.image.read_bytes()
    changed = [i for i in range(len(image)) if image[i] != expected[i]]
    assert len(changed) == 4 and all(12 * KiB <= i < 16 * KiB and image[i] == 0 for i in changed)


def test_heal_a_bad_range_by_writing_it(mount):
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.sector=8,inject-error.0.sectors=8,"
        "inject-error.0.heal=on",
        data=pattern(64 * KiB),
    )
    assert reads(m, 1, 4096, 512) == [errno.EIO]
    assert writes(m, 1, 4096, 1024) == [errno.EIO]  # covers part: still bad
    assert reads(m, 1, 4096, 512) == [errno.EIO]
    assert writes(m, 1, 4096, 4096) == [None]  # covers it all: remapped
    assert reads(m, 1, 4096, 4096) == [None]
    st = m.status()
    assert st["rules"][0]["spent"] and st["rules_healed"] == 1


def test_persistent_rules_survive_a_later_arming_and_status_shows_every_key(mount):
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.sector=8,"
        "inject-error.0.persistent=on,inject-error.0.errno=EIO,"
        "inject-error.1.event=write_aio,inject-error.1.sector=100,"
        "inject-error.1.errno=ENOSPC,inject-error.1.delay=1ms,"
        "inject-error.1.jitter=2ms",
    )
    assert writes(m, 1, 0, 512) == [None]  # arms rule 2
    assert reads(m, 1, 8 * 512) == [errno.EIO]  # rule 1 kept
    assert writes(m, 1, 100 * 512) == [errno.ENOSPC]
    st = m.status()
    assert st["active"] == [1, 2]
    kept, later = st["rules"]
    assert kept["persistent"] and later["delay_us"] == 1000 and later["jitter_us"] == 2000
    assert later["failed"] == 1 and later["delayed"] == 1
    text = m.status_text()
    assert "persistent=on" in text and "delay=1ms jitter=2ms" in text
    answer = m.ctl("inject-error event=none sector=50")
    assert "warning" in answer and "persistent" in answer


def test_bad_extension_value_fails_the_control_write(mount):
    m = mount()
    with pytest.raises(OSError) as info:
        m.ctl("inject-error event=none delay=soon")
    assert info.value.errno == errno.EINVAL
    assert m.status()["rules"] == []
    assert "delay expects a duration" in m.status()["last_error"]


def test_caller_filters_fail_dd_but_not_this_process(mount):
    """comm: dd's reads fail, this process's do not; pid: the other way round."""
    m = mount(
        "-o",
        "inject-error.0.event=none,inject-error.0.comm=dd,inject-error.0.iotype=read",
        data=pattern(64 * KiB),
    )
    dd = subprocess.run(
        ["dd", f"if={m.file}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
        capture_output=True,
        text=True,
    )
    assert dd.returncode != 0 and "Input/output error" in dd.stderr
    assert reads(m, 3) == [None] * 3
    assert m.status()["rules"][0]["failed"] == 1
    m.ctl(f"clear\ninject-error event=none iotype=read pid={os.getpid()}")
    dd = subprocess.run(
        ["dd", f"if={m.file}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
        capture_output=True,
        text=True,
    )
    assert dd.returncode == 0, dd.stderr
    assert reads(m, 1) == [errno.EIO]
