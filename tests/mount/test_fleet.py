"""Several mounts at once (blkfuse.client.fleet): `blkfuse ctl MNT1 MNT2 ... -- COMMAND` and
blkfuse.Fleet, through real mounts written with os.pwrite: correlated power cuts with derived
seeds, the spread of the cuts, poweron, failures on some nodes."""

import errno
import hashlib
import json

import pytest

import blkfuse
from blkfuse.client.fleet import FleetError, cut_report, node_seed, per_node_commands

from conftest import blkfuse as run_blkfuse
from imageio import MiB, read, write_unsynced

TRACK = ("-o", "track-unsynced=on")


def three(mount):
    nodes = [mount(*TRACK, data=bytes(MiB)) for _ in range(3)]
    for i, m in enumerate(nodes):
        write_unsynced(m, 0, bytes([0x41 + i]) * 8192)
    return nodes


# -- seeds (pure) ------------------------------------------------------------------------------


def test_node_seed_is_the_documented_sha256_prefix():
    assert node_seed(7, 0) == int(hashlib.sha256(b"7:0").hexdigest()[:8], 16)
    seeds = {node_seed(7, i) for i in range(100)}
    assert len(seeds) == 100  # distinct per node
    assert node_seed(7, 1) != node_seed(8, 1)


def test_a_powercut_line_gets_each_nodes_seed_and_other_lines_go_unchanged():
    texts, seed, seeds = per_node_commands("state 2\npowercut keep=random seed=7", 3)
    assert seed == 7 and seeds == [node_seed(7, i) for i in range(3)]
    for i, text in enumerate(texts):
        assert text == f"state 2\npowercut keep=random seed={node_seed(7, i)}"
    texts, seed, seeds = per_node_commands("poweron", 2)
    assert texts == ["poweron", "poweron"] and seed is None and seeds == [None, None]
    texts, seed, _ = per_node_commands("powercut", 2)  # no seed: one is picked, then derived
    assert seed is not None and texts[1] == f"powercut seed={node_seed(seed, 1)}"
    # a seed that is not a number goes out as written, for each daemon to refuse
    texts, seed, _ = per_node_commands("powercut seed=x", 2)
    assert texts == ["powercut seed=x"] * 2 and seed is None


def test_the_json_line_of_a_powercut_answer_is_the_nodescut_report():
    answer = (
        'powercut keep=none: 1 unsynced writes ...; the power is off\n{"keep":"none","seed":3}\n'
    )
    assert cut_report(answer) == {"keep": "none", "seed": 3}
    assert cut_report("powercut keep=none: 0 unsynced writes; the power is off\n") is None
    assert cut_report("a\n{not json\n") is None


def test_a_fleet_cut_saves_each_nodes_image_to_its_own_path():
    texts, _, _ = per_node_commands("powercut seed=1 save=/var/tmp/cut-{node}.img", 2)
    assert [t.split()[1] for t in texts] == ["save=/var/tmp/cut-0.img", "save=/var/tmp/cut-1.img"]
    with pytest.raises(ValueError, match=r"every node would save its image there"):
        per_node_commands("powercut save=/var/tmp/cut.img", 2)
    texts, _, _ = per_node_commands("powercut seed=1 save=/var/tmp/cut.img", 1)  # one node
    assert texts[0].startswith("powercut save=/var/tmp/cut.img seed=")


# -- through real mounts -----------------------------------------------------------------------


def test_fleet_powercut_cuts_every_node_with_its_derived_seed_and_reports_the_spread(mount):
    nodes = three(mount)
    fleet = blkfuse.Fleet([m.api for m in nodes])
    result = fleet.powercut(keep="random", seed=11)
    assert result.ok and result.seed == 11 and len(result.nodes) == 3
    for i, (m, n) in enumerate(zip(nodes, result.nodes, strict=True)):
        assert n.index == i and n.seed == node_seed(11, i)
        assert f"powercut keep=random seed={node_seed(11, i)}:" in n.answer
        st = m.status()
        assert st["power"] == "off"
        assert n.power_off_at == st["power_off_at"]
        # the answer's JSON line is the node's cut, as its status's last_cut
        assert n.cut == st["last_cut"] and n.cut["seed"] == n.seed and n.cut["keep"] == "random"
        assert n.cut["writes"] == 1  # the one unsynced pwrite
        assert set(n.power_off_at) == {"monotonic_ns", "realtime_ns"}
    stamps = [n.power_off_at["monotonic_ns"] for n in result.nodes]
    assert result.spread_ns == max(stamps) - min(stamps)  # reported, whatever it is
    assert result.issue_spread_ns is not None
    assert "spread: the 3 cuts landed within" in result.text()
    # the same node seed on one mount replays that node's cut: the derivation is the seed
    with pytest.raises(OSError) as e:
        read(nodes[0], 0, 512)
    assert e.value.errno == errno.EIO
    on = fleet.poweron()
    assert on.ok and all(n.answer.startswith("power on") for n in on.nodes)
    assert on.spread_ns is None and on.seed is None
    assert all(m.status()["power"] == "on" for m in nodes)


def test_fleet_keep_none_loses_every_nodes_unsynced_writes(mount, fuse_dir):
    nodes = three(mount)
    fleet = blkfuse.Fleet([m.mnt for m in nodes])  # mountpoints do as well as Mounts
    result = fleet.powercut(save=fuse_dir / "cut-{node}.img")
    fleet.poweron()
    for i, m in enumerate(nodes):
        assert read(m, 0, 8192) == bytes(8192)
        saved = fuse_dir / f"cut-{i}.img"
        assert result.nodes[i].cut["saved"] == str(saved)
        assert saved.read_bytes() == m.image.read_bytes()  # each node saved its own image


def test_a_subset_cut_keeps_the_fleet_index_seed_and_leaves_the_others_on(mount):
    nodes = three(mount)
    fleet = blkfuse.Fleet([m.api for m in nodes])
    result = fleet.powercut(nodes=[2, nodes[0].api], seed=5)
    assert [n.index for n in result.nodes] == [0, 2]
    assert [n.seed for n in result.nodes] == [node_seed(5, 0), node_seed(5, 2)]
    assert [m.status()["power"] for m in nodes] == ["off", "on", "off"]
    assert read(nodes[1], 0, 8192) == b"B" * 8192  # the node left on still serves
    with pytest.raises(ValueError, match="no node 3"):
        fleet.powercut(nodes=[3])
    fleet.poweron(nodes=[0, 2])


def test_a_node_that_fails_fails_the_fleet_command_and_the_others_still_run_it(mount):
    nodes = three(mount)
    fleet = blkfuse.Fleet([m.api for m in nodes])
    fleet.powercut(nodes=[1])
    with pytest.raises(FleetError) as e:
        fleet.powercut(via="write")  # node 1 is off already: EINVAL there, the others cut
    assert e.value.errno == errno.EINVAL and "already off" in e.value.message
    result = e.value.result
    assert [n.ok for n in result.nodes] == [True, False, True]
    assert all(m.status()["power"] == "off" for m in nodes)
    quiet = fleet.poweron(check=False)
    assert quiet.ok


def test_ctl_with_several_mounts_cuts_them_all_and_exits_1_if_one_fails(mount, fuse_dir):
    nodes = three(mount)
    mnts = [str(m.mnt) for m in nodes]
    r = run_blkfuse("ctl", *mnts, "--", "powercut", "keep=random", "seed=3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fleet seed 3" in r.stdout
    for i, mnt in enumerate(mnts):
        assert f"{mnt}: powercut keep=random seed={node_seed(3, i)}:" in r.stdout
    assert "spread: the 3 cuts landed within" in r.stdout
    # a mountpoint that is no mount: that node fails, the others answer, exit 1
    r = run_blkfuse("ctl", "--json", *mnts, str(fuse_dir), "--", "poweron")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert [n["ok"] for n in out["nodes"]] == [True, True, True, False]
    assert "not a blkfuse mount" in out["nodes"][3]["error"]
    assert all(m.status()["power"] == "on" for m in nodes)
    # the one-mount form is unchanged
    r = run_blkfuse("ctl", mnts[0], "state", "3")
    assert r.returncode == 0 and r.stdout == "state 3\n"
    r = run_blkfuse("ctl", "--", "poweron")
    assert r.returncode == 1 and "no mountpoint before" in r.stderr


def test_the_daemon_logs_the_moment_its_power_went_off(mount, fuse_dir):
    log = fuse_dir / "daemon.log"
    m = mount(*TRACK, "--log", log)
    result = blkfuse.Fleet([m.api]).powercut(seed=4)
    stamp = result.nodes[0].power_off_at
    assert result.spread_ns == 0  # one node: nothing to spread
    text = log.read_text()
    assert (
        f"power cut (keep=none seed={node_seed(4, 0)}) at CLOCK_MONOTONIC "
        f"{stamp['monotonic_ns']} ns, CLOCK_REALTIME {stamp['realtime_ns']} ns"
    ) in text
    m.ctl("poweron")
