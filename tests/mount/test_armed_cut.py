"""Armed power cuts (powercut-arm / powercut-disarm / powercut-wait, fired by SIGUSR2 to the
daemon) through real mounts, and the fleet's signal way of cutting several mounts with them.
No timing is asserted: scripts/bench-spread measures how close the cuts land."""

import errno
import json
import os
import signal
import time

import pytest

import blkfuse
from blkfuse.client.fleet import FleetError, node_seed

from conftest import blkfuse as run_blkfuse
from imageio import Command, MiB, read, write_unsynced

TRACK = ("-o", "track-unsynced=on")
HANG_GUARD_SECONDS = 60  # a daemon silent this long is wedged: the test fails, not hangs


def ctl_error(m, text):
    with pytest.raises(OSError) as e:
        m.ctl(text)
    return e.value


def unsynced_writes(m, count):
    for i in range(count):
        write_unsynced(m, i * 8192, bytes([0x41 + i]) * 4096)


def wait_for_log(path, text):
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.01)


def test_an_armed_cut_fires_on_sigusr2_with_its_seed_through_the_one_power_cut(mount):
    armed = mount(*TRACK, data=bytes(MiB))
    plain = mount(*TRACK, data=bytes(MiB))
    for m in (armed, plain):
        unsynced_writes(m, 6)
    answer = armed.ctl("powercut-arm keep=random seed=99")
    pid = armed.status()["info"]["pid"]
    assert answer.startswith("armed: powercut keep=random seed=99;")
    assert f"SIGUSR2 to pid {pid}" in answer
    st = armed.status()
    assert st["armed"] == {"keep": "random", "seed": 99, "save": None, "fifo": None}
    assert st["power"] == "on" and st["power_off_at"] is None
    assert "armed: powercut keep=random seed=99" in armed.status_text()
    assert read(armed, 0, 4096) == b"A" * 4096  # armed is not cut: it still serves

    os.kill(pid, signal.SIGUSR2)
    cut = armed.ctl("powercut-wait")  # answers once the cut has run, as powercut does
    assert "powercut keep=random seed=99:" in cut
    assert "the power is off" in cut
    st = armed.status()
    assert st["power"] == "off" and st["armed"] is None
    assert json.loads(cut.splitlines()[-1]) == st["last_cut"]
    assert set(st["power_off_at"]) == {"monotonic_ns", "realtime_ns"}
    assert armed.ctl("powercut-wait") == cut  # it stays readable
    assert ctl_error(armed, "powercut-disarm").errno == errno.ENOENT  # it fired: none armed

    # the same seed through the plain command makes the same decisions: one code path
    plain.ctl("powercut keep=random seed=99")
    mine, theirs = st["last_cut"], plain.status()["last_cut"]
    assert {k: v for k, v in mine.items() if k != "saved"} == {
        k: v for k, v in theirs.items() if k != "saved"
    }
    armed.ctl("poweron")
    plain.ctl("poweron")
    assert read(armed, 0, 6 * 8192) == read(plain, 0, 6 * 8192)


def test_a_disarmed_cut_does_not_fire_and_the_signal_is_ignored(mount, fuse_dir):
    log = fuse_dir / "daemon.log"
    m = mount(*TRACK, "--log", log)
    unsynced_writes(m, 1)
    m.ctl("powercut-arm seed=5")
    assert m.ctl("powercut-disarm") == "disarmed: powercut keep=none seed=5\n"
    assert m.status()["armed"] is None
    os.kill(m.status()["info"]["pid"], signal.SIGUSR2)
    wait_for_log(log, "SIGUSR2: no powercut armed (powercut-arm): ignored")
    assert m.status()["power"] == "on"
    assert read(m, 0, 4096) == b"A" * 4096  # nothing lost
    e = ctl_error(m, "powercut-wait")
    assert e.errno == errno.ENOENT and "none armed, or disarmed" in e.strerror
    assert ctl_error(m, "powercut-disarm").errno == errno.ENOENT


def test_a_second_arm_is_refused_and_leaves_the_first(mount):
    m = mount(*TRACK)
    m.ctl("powercut-arm keep=prefix seed=1")
    e = ctl_error(m, "powercut-arm keep=random seed=2")
    assert e.errno == errno.EBUSY
    assert "already armed (powercut keep=prefix seed=1)" in e.strerror
    assert "powercut-disarm first" in e.strerror
    assert m.status()["armed"] == {"keep": "prefix", "seed": 1, "save": None, "fifo": None}
    m.ctl("powercut-disarm")
    m.ctl("powercut-arm keep=random seed=2")  # once disarmed, a new arm is taken
    assert m.status()["armed"]["seed"] == 2


def test_a_bad_arm_names_the_problem_and_arms_nothing(mount, fuse_dir):
    untracked = mount()
    e = ctl_error(untracked, "powercut-arm")
    assert e.errno == errno.EINVAL and "track-unsynced=on" in e.strerror
    m = mount(*TRACK)
    for text, code, words in [
        ("powercut-arm keep=some", errno.EINVAL, "keep must be none, random or prefix"),
        ("powercut-arm seed=x", errno.EINVAL, "seed must be an integer"),
        ("powercut-arm save=rel.img", errno.EINVAL, "absolute path"),
        (f"powercut-arm save={fuse_dir}/no/such.img", errno.ENOENT, "no directory"),
        ("powercut-wait soon", errno.EINVAL, "number of seconds"),
        ("state 2\npowercut-arm bad", errno.EINVAL, "expected keep=..."),
        ("powercut-arm fifo=rel", errno.EINVAL, "fifo= needs an absolute path"),
        (f"powercut-arm fifo={fuse_dir}/none", errno.ENOENT, "No such file"),
        (f"powercut-arm fifo={fuse_dir}", errno.EINVAL, "not a FIFO"),
    ]:
        e = ctl_error(m, text)
        assert e.errno == code and words in e.strerror, (text, e)
        assert m.status()["armed"] is None and m.status()["state"] == 1
    m.ctl("powercut seed=1")
    e = ctl_error(m, "powercut-arm")
    assert e.errno == errno.EINVAL and "already off" in e.strerror
    assert m.status()["armed"] is None


def test_a_write_to_its_fifo_fires_every_daemon_armed_on_it(mount, fuse_dir):
    nodes = [mount(*TRACK, data=bytes(MiB)) for _ in range(2)]
    fifo = fuse_dir / "fire"
    os.mkfifo(fifo)
    for i, m in enumerate(nodes):
        unsynced_writes(m, 1)
        answer = m.ctl(f"powercut-arm seed={i} fifo={fifo}")
        assert f"or a write to {fifo} fires it" in answer
        assert m.status()["armed"]["fifo"] == str(fifo)
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the daemons hold the read end
    os.write(fd, b"!")
    os.close(fd)
    for m in nodes:
        answer = m.ctl("powercut-wait")
        st = m.status()
        assert json.loads(answer.splitlines()[-1]) == st["last_cut"]
        assert st["power"] == "off" and st["armed"] is None and st["last_cut"]["writes_lost"] == 1
        m.ctl("poweron")
        assert read(m, 0, 4096) == bytes(4096)  # the unsynced write was lost


def test_a_disarmed_fifo_arm_lets_go_of_the_fifo(mount, fuse_dir):
    m = mount(*TRACK)
    fifo = fuse_dir / "fire"
    os.mkfifo(fifo)
    m.ctl(f"powercut-arm fifo={fifo}")
    m.ctl("powercut-disarm")
    # no reader is left: a writer that will not wait finds none (ENXIO)
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while True:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:
            assert e.errno == errno.ENXIO
            break
        assert time.monotonic() < deadline, "the daemon kept the FIFO open"
        time.sleep(0.01)
    assert m.status()["power"] == "on"
    m.ctl(f"powercut-arm seed=8 fifo={fifo}")  # and it can be armed on it again
    assert m.status()["armed"]["seed"] == 8


def test_a_wait_for_an_armed_cut_that_is_not_fired_times_out(mount):
    m = mount(*TRACK)
    m.ctl("powercut-arm seed=3")
    e = ctl_error(m, "powercut-wait 0.05")
    assert e.errno == errno.ETIMEDOUT and "did not fire" in e.strerror
    assert m.status()["armed"]["seed"] == 3  # still armed


def test_help_lists_the_armed_cut_commands():
    from blkfuse.daemon.control import COMMANDS, help_text

    text = help_text()
    for name in ("powercut-arm", "powercut-disarm", "powercut-wait"):
        assert f"  {name}" in text
        assert COMMANDS[name].extension  # QEMU has no such command


# -- the fleet's signal way --------------------------------------------------------------------


def three(mount):
    nodes = [mount(*TRACK, data=bytes(MiB)) for _ in range(3)]
    for i, m in enumerate(nodes):
        write_unsynced(m, 0, bytes([0x41 + i]) * 8192)
    return nodes


def test_a_fleet_cut_arms_every_node_then_fires_them_all_at_once(mount, fuse_dir):
    log = fuse_dir / "daemon.log"
    nodes = [mount(*TRACK, "--log", log, data=bytes(MiB)) for _ in range(3)]
    fleet = blkfuse.Fleet([m.api for m in nodes])
    result = fleet.powercut(keep="random", seed=21, via="signal")
    assert result.ok and result.via == "signal"
    for i, (m, n) in enumerate(zip(nodes, result.nodes, strict=True)):
        assert n.command == f"powercut keep=random seed={node_seed(21, i)}"
        assert f"powercut keep=random seed={node_seed(21, i)}:" in n.answer
        st = m.status()
        assert st["power"] == "off" and st["armed"] is None
        assert n.power_off_at == st["power_off_at"] and n.cut == st["last_cut"]
    stamps = [n.power_off_at["monotonic_ns"] for n in result.nodes]
    assert result.spread_ns == max(stamps) - min(stamps)
    assert "signals sent within" in result.text()
    assert "by an armed powercut (SIGUSR2)" in log.read_text()
    fleet.poweron()
    # the other ways make the same cuts (same seeds, same history)
    for via, issued in [(None, "the FIFO written within"), ("write", "writes issued within")]:
        again = fleet.powercut(keep="random", seed=21, **({"via": via} if via else {}))
        via = via or "fifo"  # the default
        assert again.ok and again.via == via and issued in again.text()
        assert [n.cut for n in again.nodes] == [n.cut for n in result.nodes]
        assert all(m.status()["armed"] is None for m in nodes)
        fleet.poweron()
    assert "by an armed powercut (fifo=/" in log.read_text()


def test_a_node_that_cannot_be_armed_leaves_every_node_uncut(mount):
    nodes = three(mount)
    fleet = blkfuse.Fleet([m.api for m in nodes])
    fleet.powercut(nodes=[1])
    with pytest.raises(FleetError) as e:
        fleet.powercut()  # node 1 is off: it refuses the arm, the others are disarmed
    result = e.value.result
    assert [n.ok for n in result.nodes] == [False, False, False]
    assert "already off" in result.nodes[1].error.message
    for i in (0, 2):
        assert result.nodes[i].error.errno == errno.ECANCELED
        assert "not cut: node 1 could not be armed" in result.nodes[i].error.message
    assert [m.status()["power"] for m in nodes] == ["on", "off", "on"]
    assert all(m.status()["armed"] is None for m in nodes)
    fleet.poweron(check=False)


def test_ctl_cuts_several_mounts_by_signal_or_by_write(mount):
    nodes = three(mount)
    mnts = [str(m.mnt) for m in nodes]
    for via in ("signal", "fifo", "write"):
        r = run_blkfuse("ctl", "--json", "--via", via, *mnts, "--", "powercut", "seed=3")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["via"] == via and out["spread_ns"] is not None
        assert [n["seed"] for n in out["nodes"]] == [node_seed(3, i) for i in range(3)]
        assert all(m.status()["power"] == "off" for m in nodes)
        r = run_blkfuse("ctl", *mnts, "--", "poweron")
        assert r.returncode == 0, r.stdout + r.stderr
    # a text that is more than one powercut line goes out as written, whatever --via says
    r = run_blkfuse("ctl", "--json", *mnts, "--", "state 2\npowercut seed=4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["via"] == "write"
    assert all(m.status()["state"] == 2 for m in nodes)


def test_umount_drops_the_armed_cut_and_ends_a_pending_wait_with_eshutdown(mount):
    m = mount(*TRACK)
    unsynced_writes(m, 1)
    m.ctl("powercut-arm seed=6")
    t = Command(m, "powercut-wait")
    t.start()
    m.umount()  # orderly: the unsynced write is kept, nothing is cut
    t.join(HANG_GUARD_SECONDS)
    assert not t.is_alive() and t.error is not None and t.error.errno == errno.ESHUTDOWN
    assert m.image.read_bytes()[:4096] == b"A" * 4096
