"""Cuts the daemon fires itself (issue 21, part 2): the powercut rule key, powercut save=,
last_cut's extents, Mount.powercut()/poweron(), and poweron refusing while the image is held.
Through real mounts, with os.pwrite/os.fsync, losetup and the Python API as clients."""

import errno
import hashlib
import os
import random
import subprocess

import pytest

from blkfuse.client.api import Mount
from blkfuse.errors import ControlError

from conftest import blkfuse
from imageio import KiB, MiB

TRACK = "track-unsynced=on"
SIZE = 16 * MiB


def workload(m, rounds: int = 10) -> tuple[bytearray, int | None]:
    """Rounds of 8 seeded 4 KiB writes then an fsync, on one open handle, until a call fails.
    Returns the image as it was just before the failing call (what the backing file held
    then: every write so far landed) and the round whose fsync failed (None: none did)."""
    rng = random.Random(7)
    image = bytearray(SIZE)
    fd = os.open(m.file, os.O_RDWR)
    try:
        for n in range(rounds):
            for _ in range(8):
                offset = rng.randrange(0, SIZE // 4096) * 4096
                data = rng.randbytes(4096)
                os.pwrite(fd, data, offset)
                image[offset : offset + 4096] = data
            try:
                os.fsync(fd)
            except OSError as e:
                assert e.errno == errno.EIO, e
                return image, n
    finally:
        os.close(fd)
    return image, None


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def data_bytes(path) -> int:
    return os.stat(path).st_blocks * 512


RULE = "event=flush_to_os iotype=flush after=5 count=1 powercut=random"


def test_a_powercut_rule_at_the_6th_flush_cuts_the_same_way_on_every_run(mount, fuse_dir):
    hashes = []
    for run, seed in enumerate((1234, 1234, 4321)):
        save = fuse_dir / f"cut{run}.img"
        m = mount("-o", f"{TRACK},seed={seed}", size=SIZE)
        m.ctl(f"inject-error {RULE} powercut-save={save}")
        before, failed_round = workload(m)
        assert failed_round == 5  # the 6th fsync failed with EIO
        status = m.status()
        assert status["power"] == "off"
        cut = status["last_cut"]
        assert cut["keep"] == "random" and cut["seed"] == seed and cut["saved"] == str(save)
        assert cut["writes"] == 8  # the 6th round's writes: the 5th fsync covered the rest
        after = m.image.read_bytes()
        # every byte the cut changed lies in a lost extent; every lost extent is inside what
        # the 6th round wrote; a torn write has bytes of both kinds
        covered = bytearray(SIZE)
        for offset, length in cut["lost"]:
            assert offset % 512 == 0 and length % 512 == 0
            covered[offset : offset + length] = b"\1" * length
        assert cut["lost"], "a random cut of 8 writes of 8 units each lost nothing"
        for i in range(0, SIZE, 512):
            if after[i : i + 512] != before[i : i + 512]:
                assert covered[i], f"byte {i} changed outside the lost extents"
            else:  # random data: a unit set back to what the 5th fsync left differs
                assert not covered[i], f"unit at {i} is in a lost extent but did not change"
        for offset, length in cut["torn"]:
            piece = covered[offset : offset + length]
            assert any(piece) and not all(piece)
        # save=: a sparse copy equal to the image as the cut left it
        assert save.read_bytes() == after
        assert data_bytes(save) <= 1 * MiB < SIZE
        m.ctl("poweron")
        hashes.append(digest(m.image))
        m.umount()
    assert hashes[0] == hashes[1] and hashes[2] != hashes[0]


def test_the_request_the_rule_acts_on_fails_eio_and_never_lands(mount):
    m = mount("-o", TRACK, data=bytes(MiB))
    m.ctl("inject-error event=none iotype=write sector=16 powercut=none")
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"b" * 4096, 8192)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            os.pread(fd, 512, 0)  # the power is off
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert m.image.read_bytes() == bytes(MiB)  # keep=none: the first write is lost too
    cut = m.status()["last_cut"]
    assert cut["keep"] == "none" and cut["lost"] == [[0, 4096]] and cut["torn"] == []


def test_powercut_rules_in_a_config_file_and_in_options(mount, fuse_dir):
    conf = fuse_dir / "cut.conf"
    conf.write_text(
        '[inject-error]\nevent = "flush_to_os"\niotype = "flush"\npowercut = "prefix"\n'
    )
    m = mount("--config", conf, "-o", f"{TRACK},seed=5", size=MiB)
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 512, 0)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert m.status()["last_cut"]["keep"] == "prefix"
    m2 = mount(
        "-o",
        f"{TRACK},inject-error.0.event=none,inject-error.0.iotype=read,inject-error.0.powercut=none",
        size=MiB,
    )
    fd = os.open(m2.file, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 512, 0)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EIO and m2.status()["power"] == "off"


def test_a_powercut_rule_needs_track_unsynced_everywhere(mount, fuse_dir):
    conf = fuse_dir / "cut.conf"
    conf.write_text('[inject-error]\nevent = "flush_to_os"\npowercut = "random"\n')
    r = blkfuse("check", conf)
    assert r.returncode == 1 and "cut.conf:1" in r.stderr
    assert "powercut needs the option track-unsynced=on" in r.stderr
    r = blkfuse("check", conf, "-o", TRACK)
    assert r.returncode == 0 and "not portable: powercut" in r.stdout, r.stdout + r.stderr
    _, r = mount("--config", conf, expect_ok=False)
    assert r.returncode == 1 and "cut.conf:1" in r.stderr and "track-unsynced=on" in r.stderr
    _, r = mount("-o", "inject-error.0.event=none,inject-error.0.powercut=none", expect_ok=False)
    assert r.returncode == 1 and "track-unsynced=on" in r.stderr
    m = mount()
    with pytest.raises(OSError) as e:
        m.ctl("inject-error event=none powercut=random")
    assert e.value.errno == errno.EINVAL
    assert "powercut needs the option track-unsynced=on" in m.status()["last_error"]
    assert m.status()["rules"] == []


@pytest.mark.parametrize(
    "words,why",
    [
        ("powercut=nane", 'did you mean "none"'),
        ("powercut=none torn=1", "powercut and torn cannot be combined"),
        ("powercut=none errno=ENOSPC", "leave errno out"),
        ("powercut-save=/tmp/x.img", "powercut-save needs powercut"),
        ("powercut=none powercut-save=x.img", "absolute path"),
    ],
)
def test_bad_powercut_keys_are_refused_with_a_reason(mount, words, why):
    m = mount("-o", TRACK)
    with pytest.raises(OSError) as e:
        m.ctl(f"inject-error event=none {words}")
    assert e.value.errno == errno.EINVAL
    assert why in m.status()["last_error"]
    assert m.status()["rules"] == []


def test_powercut_save_answer_json_and_the_api(mount, fuse_dir):
    m = mount("-o", TRACK, size=SIZE)
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"s" * 8192, 65536)
        os.fsync(fd)
        os.pwrite(fd, b"u" * 4096, MiB)
    finally:
        os.close(fd)
    save = fuse_dir / "saved.img"
    answer = m.ctl(f"powercut keep=none save={save}")
    first, last = answer.strip().splitlines()
    assert f"image saved to {save}" in first
    assert '"lost":[[1048576,4096]]' in last and m.status()["last_cut"]["saved"] == str(save)
    assert save.read_bytes() == m.image.read_bytes()
    assert data_bytes(save) < 64 * KiB + 8192
    with pytest.raises(OSError) as e:
        m.ctl("powercut save=relative.img")
    assert e.value.errno == errno.EINVAL and "absolute path" in m.status()["last_error"]
    with pytest.raises(OSError) as e:
        m.ctl(f"powercut save={fuse_dir}/no/such/dir/x.img")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError) as e:
        m.ctl(f"powercut save={m.mnt}/copy.img")
    assert e.value.errno == errno.EINVAL and "not inside the mount" in m.status()["last_error"]
    # the API: the same through Mount.powercut / poweron
    api = Mount(m.image, m.mnt)
    api.poweron()
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"v" * 512, 0)
    finally:
        os.close(fd)
    cut = api.powercut(keep="random", seed=9, save=save)
    assert cut["keep"] == "random" and cut["seed"] == 9 and cut["writes"] == 1
    assert cut["saved"] == str(save) and save.read_bytes() == m.image.read_bytes()
    with pytest.raises(ControlError) as failure:
        api.powercut()
    assert failure.value.errno == errno.EINVAL  # the power is already off
    api.poweron()
    assert m.status()["power"] == "on"


def _detach(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True)
    while os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file"):
        subprocess.run(["udevadm", "settle"], capture_output=True)


def test_poweron_refuses_while_a_loop_device_or_a_process_holds_the_image(mount, fuse_dir):
    log = fuse_dir / "daemon.log"
    m = mount("-o", TRACK, "--log", log, size=4 * MiB)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(m.file)], capture_output=True, text=True, check=True
    ).stdout.strip()
    fs = fuse_dir / "fs"
    fs.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
        subprocess.run(["mount", dev, fs], check=True, capture_output=True)
        m.ctl("powercut")
        with pytest.raises(OSError) as e:
            m.ctl("poweron")
        assert e.value.errno == errno.EBUSY
        message = m.status()["last_error"]
        assert f"loop device {dev} (mounted at {fs})" in message, message
        assert "unmount that first" in message and "poweron force" in message
        assert m.status()["power"] == "off"
        subprocess.run(["umount", fs], capture_output=True)
        if os.path.ismount(fs):
            subprocess.run(["umount", "-l", fs], check=True)
        with pytest.raises(OSError) as e:
            m.ctl("poweron")
        assert e.value.errno == errno.EBUSY
        assert f"losetup -d {dev}" in m.status()["last_error"]
    finally:
        if os.path.ismount(fs):
            subprocess.run(["umount", "-l", fs], capture_output=True)
        _detach(dev)
    with open(m.file, "rb") as image:
        holder = subprocess.Popen(["sleep", "600"], stdin=image)
    try:
        with pytest.raises(OSError) as e:
            m.ctl("poweron")
        assert e.value.errno == errno.EBUSY
        assert f"pid {holder.pid} (sleep)" in m.status()["last_error"]
        assert m.ctl("poweron force").startswith("power on (forced)")
    finally:
        holder.kill()
        holder.wait()
    m.ctl("powercut keep=random seed=3")
    assert m.ctl("poweron").startswith("power on")
    assert "last cut: powercut keep=random seed=3: " in m.status_text()
    text = log.read_text()
    assert text.count(" ns, by powercut: powercut keep=") == 2
    assert text.count("power on") >= 2


def test_save_works_on_an_o_direct_image(mount, fuse_dir):
    """cache=none opens the image O_DIRECT: the copy reads it through a descriptor of its own."""
    m = mount("-o", f"{TRACK},cache=none", size=4 * MiB)
    fd = os.open(m.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"d" * 4096, 8192)
        os.fsync(fd)
        os.pwrite(fd, b"e" * 4096, 65536)
    finally:
        os.close(fd)
    save = fuse_dir / "direct.img"
    cut = Mount(m.image, m.mnt).powercut(save=save)
    assert cut["saved"] == str(save) and cut["save_error"] is None
    assert save.read_bytes() == m.image.read_bytes()
    assert save.read_bytes()[8192:12288] == b"d" * 4096


def test_a_probability_powercut_rule_cuts_at_the_same_write_for_the_same_seed(tmp_path):
    """Block level, many runs: the rule's coin and the cut's coins come from the mount's
    seed, so a seed names one cut (which write, which bytes); other seeds cut elsewhere."""
    import trio
    from support.device import build_device

    from blkfuse.engine.core import Engine
    from blkfuse.rules.config import parse_rule_args

    def run(seed: int) -> tuple[int, str]:
        path = tmp_path / f"s{seed}-{random.random()}.img"
        path.write_bytes(bytes(256 * KiB))
        rule = parse_rule_args(
            "inject-error", ["event=none", "iotype=write", "probability=0.2", "powercut=random"]
        )
        block = build_device(path, Engine([rule], seed=seed), track_unsynced=True)
        rng = random.Random(3)

        async def main() -> int:
            for n in range(1000):
                try:
                    await block.write(rng.randrange(0, 64) * 4096, rng.randbytes(4096))
                except OSError as e:
                    assert e.errno == errno.EIO and not block.powered
                    return n
                if n % 5 == 4:
                    await block.flush()
            raise AssertionError("no cut in 1000 writes at probability 0.2")

        n = trio.run(main)
        assert block.last_cut is not None and block.last_cut.seed == seed
        block.stack.close()
        return n, digest(path)

    assert run(11) == run(11)
    assert len({run(seed) for seed in range(12, 20)}) > 1
