"""The Python API (blkfuse.Mount), the mount table reader, and the pytest plugin, used as a
user would: real mounts, real I/O from this process and its threads."""

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from blkfuse import ControlError, Mount, MountError, client
from blkfuse.client import mounttab
from blkfuse.client.api import mount_args, parse_size

from conftest import blkfuse

MiB = 1 << 20


def _image(d: Path, size: int = MiB, name: str = "disk.img") -> Path:
    img = d / name
    with open(img, "wb") as f:
        f.truncate(size)
    return img


def _mnt(d: Path, name: str = "mnt") -> Path:
    mnt = d / name
    mnt.mkdir()
    return mnt


# ---- mounttab ---------------------------------------------------------------------------------


def test_mount_table_fields_are_decoded():
    text = (
        "sysfs /sys sysfs rw,nosuid 0 0\n"
        "blkfuse /tmp/my\\040mnt\\011x fuse.blkfuse rw,user_id=0 0 0\n"
        "/dev/sda1 /back\\134slash ext4 rw 0 0\n"
        "short line\n"
    )
    entries = mounttab.parse(text)
    assert [e.mountpoint for e in entries] == ["/sys", "/tmp/my mnt\tx", "/back\\slash"]
    assert [e.is_blkfuse for e in entries] == [False, True, False]
    assert entries[1].options == "rw,user_id=0"


def test_mount_table_sees_a_mount_with_a_space_in_its_name(fuse_dir):
    mnt = _mnt(fuse_dir, "a b")
    assert not mounttab.is_mounted(mnt)
    with Mount(_image(fuse_dir), mnt) as m:
        assert mounttab.is_mounted(mnt) and mounttab.is_blkfuse_mount(mnt)
        assert mounttab.find(mnt).fstype == mounttab.FSTYPE
        assert str(mnt) in [e.mountpoint for e in mounttab.blkfuse_mounts()]
        assert m.mounted
    assert not mounttab.is_mounted(mnt)
    assert not mounttab.is_blkfuse_mount("/proc")


# ---- the API ------------------------------------------------------------------------------


def test_sizes_and_mount_arguments():
    assert parse_size("64M") == 64 * MiB and parse_size("4096") == 4096
    assert parse_size("1.5G") == 3 << 29 and parse_size(512) == 512
    # one grammar, QEMU's (as -o reads sizes): "1GiB" is refused there, so here too
    for wrong in ("lots", "1GiB", "4 k"):
        with pytest.raises(ValueError, match="expects a size"):
            parse_size(wrong)
    args = mount_args(
        "d.img",
        "/m",
        "r.conf",
        {"align": 4096, "x": "a,b"},
        name="vda",
        read_only=True,
        allow_other=False,
        log=None,
    )
    assert args == [
        "mount",
        "--config",
        "r.conf",
        "-o",
        "align=4096,x=a,,b",
        "--name",
        "vda",
        "--read-only",
        "d.img",
        "/m",
    ]


def test_mount_io_rules_and_always_unmounted(fuse_dir):
    img = _image(fuse_dir)
    mnt = _mnt(fuse_dir)
    with Mount(
        img, mnt, options={"inject-error.0.event": "read_aio", "inject-error.0.sector": 8}
    ) as m:
        assert m.image_path == mnt / "disk.img" and m.backing == img
        assert sorted(os.listdir(mnt)) == ["control", "disk.img"]
        assert m.control_path == mnt / "control"
        fd = os.open(m.image_path, os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 512, 0)
            with pytest.raises(OSError) as e:
                os.pread(fd, 512, 8 * 512)
            assert e.value.errno == errno.EIO
            [first] = [r["id"] for r in m.status()["rules"]]
            rule = m.inject_error(event="write_aio", errno="ENOSPC", iotype="write", once=True)
            assert rule == first + 1
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"y" * 512, 0)
            assert e.value.errno == errno.ENOSPC
            os.pwrite(fd, b"z" * 512, 0)  # once: consumed
            m.remove(first)
            assert os.pread(fd, 512, 8 * 512) == bytes(512)
            sid = m.set_state(event="write_aio", state=1, new_state=2)
            ids = [r["id"] for r in m.status()["rules"]]
            assert sid in ids and first not in ids
            m.state(5)
            assert m.status()["state"] == 5
            m.clear()
            assert m.status()["rules"] == []
            answer = m.ctl(f"inject-error event=read_aio errno=5\nremove {sid + 1}")
            assert answer == f"added rule {sid + 1}\nremoved rule {sid + 1}\n"
        finally:
            os.close(fd)
        assert m.pid and "blkfuse" in repr(m)
    assert not mounttab.is_mounted(mnt) and not m.mounted
    assert img.read_bytes()[:512] == b"z" * 512
    m.close()  # idempotent


def test_control_errors_carry_errno_and_the_daemons_message(fuse_dir):
    with Mount(_image(fuse_dir), _mnt(fuse_dir)) as m:
        with pytest.raises(ControlError) as e:
            m.ctl("frobnicate now")
        assert e.value.errno == errno.EINVAL and "unknown command" in e.value.message
        with pytest.raises(ControlError) as e:
            m.resume("nobody")
        assert e.value.errno == errno.ENOENT and e.value.errno_name == "ENOENT"
        assert "nobody" in str(e.value)
        with pytest.raises(ControlError) as e:
            m.inject_error(event="read_aoi")
        assert e.value.errno == errno.ENOENT and "read_aoi" in e.value.message
        m.add_break("read_aio", "T")
        with pytest.raises(ControlError) as e:
            m.wait_break("T", timeout=0.01)
        assert e.value.errno == errno.ETIMEDOUT
        m.remove_break("T")
        assert m.status()["breakpoints"] == []


def test_status_is_exactly_the_clis_json(fuse_dir):
    with Mount(_image(fuse_dir), _mnt(fuse_dir), name="vda.raw") as m:
        m.inject_error(event="read_aio", errno=5, sector=8)
        r = blkfuse("status", "--json", m.mountpoint, check=True)
        assert json.loads(r.stdout) == m.status()
        assert m.image_path.name == "vda.raw"
        assert "state: 1" in m.status_text()


def test_a_breakpoint_held_request_is_resumed_and_the_mount_goes_on_exit(fuse_dir):
    mnt = _mnt(fuse_dir)
    result: dict[str, object] = {}
    with pytest.raises(RuntimeError, match="the test failed"):
        with Mount(_image(fuse_dir), mnt) as m:
            m.add_break("read_aio", "A")

            def reader() -> None:
                fd = os.open(m.image_path, os.O_RDONLY)
                try:
                    result["data"] = os.pread(fd, 4096, 0)
                finally:
                    os.close(fd)

            t = threading.Thread(target=reader, daemon=True)
            t.start()
            m.wait_break("A", timeout=60)
            [held] = m.suspended()
            assert (held["tags"], held["op"], held["length"]) == (["A"], "read", 4096)
            raise RuntimeError("the test failed while a request was suspended")
    t.join(60)
    assert not t.is_alive() and result["data"] == bytes(4096)
    assert not mounttab.is_mounted(mnt)


def test_resume_lets_the_request_finish(fuse_dir):
    with Mount(_image(fuse_dir), _mnt(fuse_dir)) as m:
        m.add_break("write_aio", "W")
        fd = os.open(m.image_path, os.O_RDWR)
        t = threading.Thread(target=os.pwrite, args=(fd, b"w" * 512, 0), daemon=True)
        t.start()
        m.wait_break("W")
        m.resume("W")
        t.join(60)
        os.close(fd)
        assert not t.is_alive() and m.backing.read_bytes()[:512] == b"w" * 512


def test_mount_failures_say_why_and_leave_nothing_mounted(fuse_dir):
    bad = fuse_dir / "bad.conf"
    bad.write_text('[inject-error]\nevent = "read_aoi"\n')
    mnt = _mnt(fuse_dir)
    with pytest.raises(MountError, match=r"bad.conf:2.*read_aoi"):
        Mount(_image(fuse_dir), mnt, config=bad).mount()
    with pytest.raises(MountError, match="no such image file"):
        Mount(fuse_dir / "none.img", mnt).mount()
    with pytest.raises(MountError, match="No such option .--colour"):
        Mount(_image(fuse_dir), mnt, colour="blue").mount()
    assert not mounttab.is_mounted(mnt)


def test_cli_mount_prints_nothing_on_success(fuse_dir):
    mnt = _mnt(fuse_dir)
    r = blkfuse("mount", _image(fuse_dir), mnt)
    try:
        assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    finally:
        client.unmount(mnt)
    assert not mounttab.is_mounted(mnt)


def test_blkfuse_command_runs_this_blkfuse():
    r = subprocess.run(client.blkfuse_command() + ["--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "version" in r.stdout
    r = subprocess.run([sys.executable, "-m", "blkfuse", "events"], capture_output=True, text=True)
    assert r.returncode == 0 and "read_aio" in r.stdout


# ---- the pytest plugin ------------------------------------------------------------------------

USER_TESTS = '''
import os
import threading

import pytest

from blkfuse import ControlError


def test_default_image(blkfuse_mount, tmp_path):
    m = blkfuse_mount()
    assert m.image_path.stat().st_size == 64 << 20
    assert m.backing.parent == tmp_path
    fd = os.open(m.image_path, os.O_RDWR)
    m.inject_error(event="write_aio", errno="ENOSPC", iotype="write")
    with pytest.raises(OSError) as e:
        os.pwrite(fd, b"x" * 4096, 0)
    os.close(fd)
    assert e.value.errno == 28
    with open(os.environ["USER_TESTS_LOG"], "a") as f:
        f.write(str(m.mountpoint) + "\\n")


def test_given_image_options_and_flags(blkfuse_mount, tmp_path):
    img = tmp_path / "given.img"
    img.write_bytes(bytes(8192))
    m = blkfuse_mount(img, options="inject-error.0.event=read_aio,inject-error.0.errno=5",
                      name="vda", read_only=True)
    assert m.image_path.name == "vda"
    with pytest.raises(OSError):
        os.pread(os.open(m.image_path, os.O_RDONLY), 512, 0)
    m2 = blkfuse_mount(size="1M")
    assert m2.image_path.stat().st_size == 1 << 20
    with pytest.raises(ControlError):
        m2.ctl("nonsense")


def test_fails_while_a_request_is_suspended(blkfuse_mount):
    m = blkfuse_mount(size="1M")
    m.add_break("read_aio", "A")
    threading.Thread(target=lambda: os.pread(os.open(m.image_path, os.O_RDONLY), 512, 0),
                     daemon=True).start()
    m.wait_break("A")
    with open(os.environ["USER_TESTS_LOG"], "a") as f:
        f.write(str(m.mountpoint) + "\\n")
    assert False, "deliberate failure with a suspended read"
'''


def _readme_example() -> str:
    """The README's pytest example (the python block that uses blkfuse_mount)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    [example] = [b for b in blocks if "def test_" in b and "blkfuse_mount" in b]
    return example


def test_pytest_plugin_in_a_users_own_suite(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    (suite / "test_readme.py").write_text(_readme_example())
    log = tmp_path / "mounts.log"
    env = dict(os.environ, USER_TESTS_LOG=str(log))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(suite),
            str(suite),
        ],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "1 failed, 4 passed" in out, out
    assert "deliberate failure with a suspended read" in out, out
    made = log.read_text().split()
    assert len(made) == 2
    for mnt in made:
        assert not mounttab.is_mounted(mnt), out
