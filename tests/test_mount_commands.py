"""The control file through a real mount: commands, errors that apply nothing, reload."""

import errno
import json
import os

import pytest

from conftest import blkfuse
from imageio import open_image


def test_bad_control_commands_apply_nothing(mount):
    m = mount("-o", "inject-error.0.event=read_aio,inject-error.0.errno=28")
    before = m.status()
    with pytest.raises(OSError) as e:
        m.ctl("inject-error event=write_aio\nbreak write_aio A\nfrobnicate now\n")
    assert e.value.errno == errno.EINVAL
    after = m.status()
    assert after["rules"] == before["rules"] and after["breakpoints"] == []
    assert after["last_error"] == "line 3: unknown command 'frobnicate' (try \"help\")"
    assert "line 3: unknown command" in m.status_text()
    r = blkfuse("ctl", m.mnt, "break", "write_aoi", "A")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "unknown event 'write_aoi'" in r.stderr
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
    assert os.pread(fd, 512, 0) == bytes(512)           # once: gone
    os.close(fd)
    r = blkfuse("status", m.mnt, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rules"] == []
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
