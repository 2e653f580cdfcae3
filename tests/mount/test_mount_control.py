"""The control file through real mounts: commands, errors that apply nothing, reload, reading an
answer back on the same open file whatever the offset, waiting for a rule to act."""

import contextlib
import errno
import json
import os
import threading
import time

import pytest

from conftest import blkfuse
from imageio import open_image


def test_the_answer_is_read_from_its_start_whatever_the_offset(mount):
    m = mount()
    fd = os.open(m.control, os.O_RDWR)
    try:
        os.write(fd, b"status json\n")  # the write moved the offset to 12
        chunks = []
        while chunk := os.read(fd, 100):  # plain read(): from the answer's start
            chunks.append(chunk)
        answer = b"".join(chunks)
        assert json.loads(answer)["info"]["pid"] == m.pid
        assert os.pread(fd, 1 << 20, 0) == answer  # pread at 0 reads it again
        os.lseek(fd, 12345, os.SEEK_SET)  # a new command, at another offset
        os.write(fd, b"help\n")
        assert os.read(fd, 1 << 20).startswith(b"commands")
    finally:
        os.close(fd)
    with open(m.control, "r+") as f:  # buffered text I/O, as a script does it
        f.write("status json\n")
        f.flush()
        assert json.loads(f.read())["state"] == 1


def test_an_error_is_read_from_its_start_too(mount):
    m = mount()
    fd = os.open(m.control, os.O_RDWR)
    try:
        try:
            os.write(fd, b"resume nobody\n")
        except OSError:
            pass
        assert os.read(fd, 1 << 20).startswith(b"error: line 1: ")
    finally:
        os.close(fd)
    r = blkfuse("status", m.mnt, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["last_error"].startswith("line 1")


def test_wait_hit_returns_when_a_request_fires_the_rule(mount):
    m = mount()
    m.ctl("inject-error event=read_aio errno=EIO sector=0 once=on")
    box = {}

    def waiter():
        try:
            box["answer"] = m._ctl("wait_hit 1 600")
        except OSError as e:
            box["error"] = e

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    while m.status()["waiting_hits"] != [1]:  # the daemon holds the wait
        assert t.is_alive(), box
        time.sleep(0.01)
    assert "wait_hit pending: 1" in m.status_text()
    fd = os.open(m.file, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 512, 0)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 512, 0) == bytes(512)  # once: used up
    finally:
        os.close(fd)
    t.join(60)
    assert box == {"answer": "rule 1 acted (hits=1)\n"}
    # the spent rule stays listed with its hit until removed
    [rule] = m.status()["rules"]
    assert (rule["spent"], rule["hits"]) == (True, 1)
    assert "hits=1 spent" in m.status_text()
    r = blkfuse("ctl", m.mnt, "wait_hit", "1", "5")  # spent: its act is over, so is the wait
    assert r.returncode == 0 and r.stdout == "rule 1 acted (hits=1)\n", r.stderr
    r = blkfuse("ctl", m.mnt, "wait_hit", "1", "5", "hits=2")  # a count it cannot reach
    assert r.returncode == 1 and "spent" in r.stderr and "ENOENT" in r.stderr
    m.ctl("remove 1")
    assert m.status()["rules"] == []


def test_wait_hit_errors_through_the_mount(mount):
    m = mount()
    with pytest.raises(OSError) as e:
        m.ctl("wait_hit 9")
    assert e.value.errno == errno.ENOENT
    m.ctl("set-state event=write_aio state=1 new_state=2")
    with pytest.raises(OSError) as e:
        m.ctl("wait_hit 1 0.01")
    assert e.value.errno == errno.ETIMEDOUT
    assert "rule 1 did not act" in m.status()["last_error"]


def test_bad_control_commands_apply_nothing(mount):
    m = mount("-o", "inject-error.0.event=read_aio,inject-error.0.errno=28")
    before = m.status()
    with pytest.raises(OSError) as e:
        m.ctl("inject-error event=write_aio\nbreak write_aio A\nfrobnicate now\n")
    assert e.value.errno == errno.EINVAL
    after = m.status()
    assert after["rules"] == before["rules"] and after["breakpoints"] == []
    assert after["last_error"] == 'line 3: unknown command "frobnicate" (try "help")'
    assert "line 3: unknown command" in m.status_text()
    r = blkfuse("ctl", m.mnt, "break", "write_aoi", "A")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and 'unknown event "write_aoi"' in r.stderr
    r = blkfuse("ctl", m.mnt, "resume", "nobody")
    assert r.returncode == 1 and "nobody" in r.stderr and "ENOENT" in r.stderr


def test_ctl_adds_rules_and_reports_ids(mount):
    m = mount()
    r = blkfuse("ctl", m.mnt, "inject-error", "event=read_aio", "errno=ENOSPC", "once=on")
    assert r.returncode == 0 and r.stdout == "added rule 1\n"
    assert "added rule 1" in m.status_text()
    fd = open_image(m, os.O_RDONLY)
    with pytest.raises(OSError) as e:
        os.pread(fd, 512, 0)
    assert e.value.errno == errno.ENOSPC
    assert os.pread(fd, 512, 0) == bytes(512)  # once: gone
    os.close(fd)
    r = blkfuse("status", m.mnt, "--json")  # used up: listed as spent
    assert r.returncode == 0
    assert [(x["id"], x["spent"], x["hits"]) for x in json.loads(r.stdout)["rules"]] == [
        (1, True, 1)
    ]
    r = blkfuse("status", m.mnt)
    assert r.returncode == 0 and "errors injected: ENOSPC(28)=1" in r.stdout


def test_reload_rereads_the_config(mount, fuse_dir):
    conf = fuse_dir / "rules.conf"
    conf.write_text('[inject-error]\nevent = "read_aio"\n')
    m = mount("--config", conf)
    conf.write_text('[inject-error]\nevent = "write_aio"\nerrno = "28"\n')
    m.ctl("reload")
    assert [r["event"] for r in m.status()["rules"]] == ["write_aio"]
    conf.write_text('[inject-error]\nevent = "write_aoi"\n')
    with pytest.raises(OSError) as e:
        m.ctl("reload")
    assert e.value.errno == errno.EINVAL
    st = m.status()
    assert [r["event"] for r in st["rules"]] == ["write_aio"]
    assert "rules.conf:3" in st["last_error"] or "write_aoi" in st["last_error"]


def test_python_api_wait_hit_from_another_thread(fuse_dir):
    from blkfuse import ControlError, Mount

    img = fuse_dir / "api.img"
    img.write_bytes(bytes(64 * 1024))
    mnt = fuse_dir / "api-mnt"
    mnt.mkdir()
    with Mount(img, mnt) as m:
        rule = m.inject_error(event="write_aio", errno="ENOSPC", iotype="write", once=True)
        box = {}
        t = threading.Thread(target=lambda: box.update(hits=m.wait_hit(rule, 600)), daemon=True)
        t.start()
        while m.status()["waiting_hits"] != [rule]:
            assert t.is_alive(), box
            time.sleep(0.01)
        fd = os.open(m.image_path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"w" * 512, 0)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        t.join(60)
        assert box == {"hits": 1}
        assert m.wait_hit(rule, 1) == 1  # spent: its last act is over, so is the wait
        with pytest.raises(ControlError) as e:
            m.wait_hit(rule, 1, hits=2)
        assert e.value.errno == errno.ENOENT  # spent: it cannot act again


def test_wait_hit_issued_while_a_count_1_delay_holds_its_request_returns(mount):
    """Issue #22's race, made certain: the hold has begun (the rule is spent) before the wait
    is issued, and the wait answers that the rule acted instead of ENOENT."""
    m = mount()
    m.ctl("inject-error event=none iotype=write delay=3600s count=1")
    box = {}
    fd = os.open(m.file, os.O_RDWR)

    def writer():
        try:
            box["wrote"] = os.pwrite(fd, b"w" * 512, 0)
        except OSError as e:
            box["error"] = e

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        while m.status()["held_by_delay"] != 1:  # the hold has begun
            assert t.is_alive(), box
            time.sleep(0.01)
        [rule] = m.status()["rules"]
        assert (rule["spent"], rule["hits"]) == (True, 1)
        assert m.ctl("wait_hit 1 600") == "rule 1 acted (hits=1)\n"
        assert m.api.wait_hit(1, 600, hits=1) == 1
        r = blkfuse("ctl", m.mnt, "wait_hit", "1")
        assert r.returncode == 0 and r.stdout == "rule 1 acted (hits=1)\n", r.stderr
        assert t.is_alive() and m.status()["held_by_delay"] == 1  # still held
    finally:
        blkfuse("umount", "--lazy", m.mnt, check=True)  # ends the hold: the write goes on
        t.join(60)
        with contextlib.suppress(OSError):  # close's flush after the detach: ENOTCONN
            os.close(fd)
    assert box == {"wrote": 512}


def test_wait_hit_hits_n_through_the_mount(mount):
    m = mount()
    m.ctl("inject-error event=none iotype=read errno=EIO count=3")
    fd = os.open(m.file, os.O_RDONLY)
    try:
        for _ in range(2):
            with pytest.raises(OSError):
                os.pread(fd, 512, 0)
        assert m.ctl("wait_hit 1 hits=2") == "rule 1 acted (hits=2)\n"  # already there
        with pytest.raises(OSError) as e:
            m.ctl("wait_hit 1 0.01")  # one more than it has: not yet
        assert e.value.errno == errno.ETIMEDOUT
        with pytest.raises(OSError) as e:
            m.ctl("wait_hit 1 5 5")
        assert e.value.errno == errno.EINVAL and "one timeout only" in str(e.value)
    finally:
        os.close(fd)
