"""A mount with 100,000 rules (scripts/bench's 100k-rules set), through the CLI: the status
lists what it says it lists, and `blkfuse umount` takes it down in order. umount asks the
daemon for its status without the rule list (rules=0); asking for the whole list took longer
than umount's 10 s deadline on a loaded machine, and umount then detached the mount lazily."""

import json

from blkfuse import client

from conftest import blkfuse, is_mounted

RULES = 100_000
FIRST_SECTOR = 1_000_000  # sectors 1,000,000 .. 1,099,999, as scripts/bench writes them


def write_rules(path) -> None:
    with open(path, "w") as f:
        for sector in range(FIRST_SECTOR, FIRST_SECTOR + RULES):
            f.write(f'[inject-error]\nevent = "none"\nerrno = "5"\nsector = "{sector}"\n\n')


def rule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "inject-error event=none errno=5" in line]


def test_100k_rules_are_listed_and_the_mount_unmounts_in_order(mount, fuse_dir):
    conf = fuse_dir / "rules.conf"
    write_rules(conf)
    m, r = mount("--config", conf, size=1 << 30, expect_ok=False)  # sparse: 1 GiB of holes
    assert r.returncode == 0, r.stdout + r.stderr

    # The text (a read of control) lists the first 200 and says how to get the rest.
    text = blkfuse("status", m.mnt, check=True).stdout
    assert "rules: 100000\n" in text
    lines = rule_lines(text)
    assert len(lines) == 200 and lines[0].split()[0] == "1" and "sector=1000000" in lines[0]
    assert "... 99800 more, not listed here (`blkfuse status --all MNT`" in text
    assert "active: 1 2 3 " in text and " ... (100000 rules)\n" in text
    assert text == (m.mnt / "control").read_text()  # cat control: the same text

    every = rule_lines(blkfuse("status", "--all", m.mnt, check=True).stdout)
    assert len(every) == RULES and "sector=1099999" in every[-1]

    # JSON lists every rule, each with every field.
    status = json.loads(blkfuse("status", "--json", m.mnt, check=True).stdout)
    assert status["rule_count"] == status["active_count"] == len(status["rules"]) == RULES
    assert [rule["sector"] for rule in status["rules"]] == list(
        range(FIRST_SECTOR, FIRST_SECTOR + RULES)
    )
    assert status["rules"][-1]["text"] == "inject-error event=none errno=5 sector=1099999"
    assert status["active"] == list(range(1, RULES + 1))

    # What umount asks: everything but the rule list, which it does not need.
    brief = client.status(m.mnt, rules=0)
    assert brief["rules"] == [] and brief["rule_count"] == RULES
    assert brief["info"]["pid"] == status["info"]["pid"] and brief["suspended"] == []

    r = blkfuse("umount", m.mnt)
    # A lazy detach (the daemon did not answer in time) exits 1 saying "detached lazily".
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert not is_mounted(m.mnt)


def test_100k_rules_through_the_python_api(mount, fuse_dir):
    conf = fuse_dir / "rules.conf"
    write_rules(conf)
    m = mount("--config", conf, size=1 << 30)  # blkfuse.Mount: its info from `rules=0`
    first = m.api.status(rules=3)
    assert [rule["sector"] for rule in first["rules"]] == [1_000_000, 1_000_001, 1_000_002]
    assert first["rule_count"] == RULES and len(first["active"]) == 3
    assert m.api.suspended() == []
    m.api.close()  # release_all and the unmount: both ask rules=0
    assert not is_mounted(m.mnt)
