"""A FUA write through a mount and a power cut (README "Power cuts", "QEMU profiles"): under
QEMU 10.0 an RWF_DSYNC write reaches the file as a FUA write and is durable on its own; the
plain writes before it stay unsynced. Under 7.2 the block layer emulates FUA with a flush,
which makes everything before it durable too."""

import os

import pytest

from imageio import KiB, MiB, read, write_unsynced


@pytest.mark.parametrize(("qemu", "a_survives"), [("10.0", False), ("7.2", True)])
def test_an_rwf_dsync_write_is_durable_and_the_plain_write_before_it_is_not(
    mount, qemu, a_survives
):
    m = mount("-o", f"qemu={qemu},track-unsynced=on", data=bytes(MiB))
    write_unsynced(m, 0, b"A" * 8 * KiB)  # plain: in the volatile cache
    fd = os.open(m.file, os.O_RDWR)
    try:
        assert os.pwritev(fd, [b"B" * 4 * KiB], 64 * KiB, os.RWF_DSYNC) == 4 * KiB
        # a FUA write over part of A: A's bytes outside it stay revertible
        assert os.pwritev(fd, [b"C" * 1 * KiB], 2 * KiB, os.RWF_DSYNC) == 1 * KiB
    finally:
        os.close(fd)
    assert m.status()["unsynced"]["writes"] == (0 if a_survives else 1)
    answer = m.ctl("powercut keep=none")
    assert ("0 unsynced writes" if a_survives else "1 unsynced writes (0 kept, 1 lost)") in answer
    backing = m.image.read_bytes()
    a = b"A" if a_survives else b"\0"
    assert backing[: 8 * KiB] == a * 2 * KiB + b"C" * KiB + a * 5 * KiB
    assert backing[64 * KiB : 68 * KiB] == b"B" * 4 * KiB
    assert m.ctl("poweron").startswith("power on")
    assert read(m, 64 * KiB, 4 * KiB) == b"B" * 4 * KiB


@pytest.mark.parametrize("keep", ["random", "prefix"])
def test_random_and_prefix_cuts_keep_an_rwf_dsync_write_and_may_lose_the_one_before(mount, keep):
    """Whatever the coins say, the FUA writes stay; each plain 512-byte unit is its new bytes
    or its old ones (zeros here); the plain write under the FUA one stays revertible (some
    seed loses a unit of it: the old code made it durable with the FUA write)."""
    m = mount("-o", "qemu=10.0,track-unsynced=on", data=bytes(MiB))
    a_lost = 0
    for seed in range(6):
        write_unsynced(m, 0, b"A" * 16 * KiB)
        fd = os.open(m.file, os.O_RDWR)
        try:
            os.pwritev(fd, [b"B" * 4 * KiB], 4 * KiB, os.RWF_DSYNC)  # inside A
            write_unsynced(m, 6 * KiB, b"D" * 4 * KiB)  # over part of B, after it
        finally:
            os.close(fd)
        m.ctl(f"powercut keep={keep} seed={seed}")
        backing = m.image.read_bytes()
        m.ctl("poweron")
        for unit in range(0, 16 * KiB, 512):
            got = backing[unit : unit + 512]
            if 6 * KiB <= unit < 8 * KiB:  # B, then D over it: D or B, never A or zeros
                assert got in (b"D" * 512, b"B" * 512), (seed, unit)
            elif 4 * KiB <= unit < 6 * KiB:
                assert got == b"B" * 512, (seed, unit)
            elif 8 * KiB <= unit < 10 * KiB:  # D over A: D, or back to A, or to before A
                assert got in (b"D" * 512, b"A" * 512, bytes(512)), (seed, unit)
            else:
                assert got in (b"A" * 512, bytes(512)), (seed, unit)
                a_lost += got == bytes(512)
        write_unsynced(m, 0, bytes(16 * KiB))
        fd = os.open(m.file, os.O_RDWR)
        try:
            os.fsync(fd)  # the next round starts from zeros, synced
        finally:
            os.close(fd)
    assert a_lost
