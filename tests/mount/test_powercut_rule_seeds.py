"""Each cut a powercut rule fires draws its own coins (README "Power cuts", the `powercut`
rule key): the first with the mount's seed, the n-th with the seed derived from it and n; the
seed each cut reports replays that cut alone with `powercut keep=random seed=S`."""

import errno
import hashlib
import os
import random

from imageio import KiB, MiB

SIZE = 4 * MiB
OFFSETS = [i * 64 * KiB for i in range(16)]


def derived(seed: int, n: int) -> int:
    """README's formula: the first 4 bytes, big-endian, of SHA-256 of "SEED:cut:n"."""
    return seed if n == 0 else int(hashlib.sha256(f"{seed}:cut:{n}".encode()).hexdigest()[:8], 16)


def one_round(m, fsync: bool) -> None:
    """The same 16 writes of 4 KiB (8 units of 512 bytes each) every time, then an fsync
    (which the rule cuts at: EIO)."""
    rng = random.Random(5)
    fd = os.open(m.file, os.O_RDWR)
    try:
        for offset in OFFSETS:
            os.pwrite(fd, rng.randbytes(4 * KiB), offset)
        if fsync:
            try:
                os.fsync(fd)
                raise AssertionError("the powercut rule did not cut at the fsync")
            except OSError as e:
                assert e.errno == errno.EIO
    finally:
        os.close(fd)


def pattern(cut: dict) -> tuple:
    return tuple(cut[key] for key in ("writes_kept", "writes_torn", "writes_lost", "size")) + (
        str(cut["lost"]),
        str(cut["torn"]),
    )


def test_two_rule_cuts_in_one_mount_draw_different_coins_and_each_replays(mount, fuse_dir):
    seed = 1234
    log = fuse_dir / "daemon.log"
    m = mount("-o", f"track-unsynced=on,seed={seed}", "--log", log, size=SIZE)
    m.ctl("inject-error event=flush_to_os iotype=flush powercut=random")
    cuts = []
    for n in range(2):
        one_round(m, fsync=True)
        cut = m.status()["last_cut"]
        assert cut["keep"] == "random" and cut["writes"] == 16
        assert cut["seed"] == derived(seed, n)  # the first: the mount's seed, as before
        cuts.append(cut)
        assert f"last cut: powercut keep=random seed={cut['seed']}: " in m.status_text()
        m.ctl("poweron")
    # The same writes over the same ranges before each cut: with one seed for both (the
    # old behaviour) the two patterns were the same; 128 unit coins and a size coin each.
    assert cuts[1]["seed"] != seed
    assert pattern(cuts[0]) != pattern(cuts[1])
    # the daemon's log names each cut's seed and where it came from
    text = log.read_text()
    for n, cut in enumerate(cuts):
        assert f"power cut (keep=random seed={cut['seed']}) at CLOCK_MONOTONIC " in text
        assert (
            f"by a powercut rule (the mount's rule cut {n + 1}, its seed from -o seed={seed})"
            in text
        )
    m.umount()

    # Each reported seed replays its cut on a fresh mount with the same round of writes.
    for cut in cuts:
        fresh = mount("-o", "track-unsynced=on", size=SIZE)
        one_round(fresh, fsync=False)
        answer = fresh.ctl(f"powercut keep=random seed={cut['seed']}")
        assert f"seed={cut['seed']}" in answer
        assert pattern(fresh.status()["last_cut"]) == pattern(cut)
        fresh.umount()
