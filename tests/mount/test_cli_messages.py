"""What the CLI prints: a failed mount is one line, exit status 1, nothing mounted; `events`."""

import os

from conftest import blkfuse, is_mounted


def _assert_failed(m, r, *words):
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("blkfuse: "), r.stderr
    for w in words:
        assert w in r.stderr
    assert not is_mounted(m.mnt)


def test_malformed_rules_at_mount(mount, fuse_dir):
    conf = fuse_dir / "bad.conf"
    conf.write_text('[inject-error]\nevent = "read_aoi"\n')
    m, r = mount("--config", conf, expect_ok=False)
    _assert_failed(m, r, "bad.conf:2", "read_aoi")
    m, r = mount("-o", "inject-error.0.event=read_aio,inject-error.0.errno=-5", expect_ok=False)
    _assert_failed(m, r)
    m, r = mount("-o", "align=3", expect_ok=False)
    _assert_failed(m, r, "align")


def test_two_rule_files_are_refused(mount, fuse_dir):
    a, b = fuse_dir / "a.conf", fuse_dir / "b.conf"
    a.write_text("")
    b.write_text("")
    m, r = mount("--config", a, "-o", f"config={b}", expect_ok=False)
    _assert_failed(m, r, "more than one rules file")


def test_missing_image_and_mountpoints(mount, fuse_dir):
    m, r = mount(image=fuse_dir / "nonexistent.img", expect_ok=False)
    _assert_failed(m, r, "nonexistent.img")
    img = fuse_dir / "x.img"
    img.write_bytes(bytes(4096))
    r = blkfuse("mount", img, fuse_dir / "no-such-dir")
    assert r.returncode == 1 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    m = mount()
    r = blkfuse("mount", img, m.mnt)  # busy: the mount there is named, as a lock holder is
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "already mounted" in r.stderr
    assert f"the blkfuse mount of {m.image} (daemon pid {m.pid})" in r.stderr
    assert f"blkfuse umount {m.mnt}" in r.stderr
    assert sorted(os.listdir(m.mnt)) == ["control", m.name]


def test_a_log_or_trace_file_that_cannot_be_written(mount, fuse_dir):
    missing = fuse_dir / "no-such-dir"
    m, r = mount("--log", missing / "log", expect_ok=False)
    _assert_failed(m, r, f"{missing / 'log'}: cannot write the log: No such file or directory")
    m, r = mount("--trace", missing / "trace", expect_ok=False)
    _assert_failed(m, r, f"{missing / 'trace'}: cannot write the trace: No such file")


def test_status_and_ctl_of_a_path_that_does_not_exist(fuse_dir):
    missing = fuse_dir / "no" / "such" / "dir"
    for args in (["status"], ["status", "--json"], ["ctl"]):
        extra = ["state 2"] if args == ["ctl"] else []
        r = blkfuse(*args, missing, *extra)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"{missing}: no such file or directory" in r.stderr
    r = blkfuse("umount", missing)
    assert r.returncode == 1 and f"{missing}: no such file or directory" in r.stderr
    r = blkfuse("status", fuse_dir)  # exists, but not a mount
    assert r.returncode == 1 and "not a blkfuse mount (no control file)" in r.stderr


def test_events_command_lists_every_event():
    from blkfuse.rules.events import EVENTS, REACHABLE_EVENTS

    r = blkfuse("events")
    assert r.returncode == 0
    for name in EVENTS:
        mark = "*" if name in REACHABLE_EVENTS else " "
        assert f"  {mark} {name}" in r.stdout
    assert "block-status" in r.stdout
