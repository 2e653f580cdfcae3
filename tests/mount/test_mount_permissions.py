"""Who may do what through a mount: the image file has the backing file's owner, group and mode
and the kernel enforces them (default_permissions); `control` is the mounting user's.

Another user is `nobody` (setpriv: new uid and gid, no supplementary groups), trying each
operation in a child process; the mounts use --allow-other so that other users get in at all.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from imageio import pattern

NOBODY = 65534  # nobody / nogroup on Debian

# Runs as the other user: tries each (operation, path) and prints what happened, as JSON.
_TRY = r"""
import errno, json, os, sys
out = []
for op, path in json.loads(sys.argv[1]):
    try:
        if op == "read":
            fd = os.open(path, os.O_RDONLY)
            data = os.read(fd, 64)
            os.close(fd)
            out.append("ok" if data else "empty")
        elif op == "write":
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, b"written by nobody\n")
            os.close(fd)
            out.append("ok")
        elif op == "truncate":
            os.truncate(path, 0)
            out.append("ok")
        elif op == "stat":
            os.stat(path)
            out.append("ok")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
print(json.dumps(out))
"""


def as_nobody(*attempts: tuple[str, object]) -> list[str]:
    """What each (operation, path) gives when `nobody` tries it: "ok" or an errno name."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to act as another user")
    r = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            _TRY,
            json.dumps([(op, str(path)) for op, path in attempts]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_image_has_the_backing_files_owner_group_and_mode_live(mount):
    m = mount(data=pattern(64 * 1024))
    os.chmod(m.image, 0o640)
    os.chown(m.image, NOBODY, NOBODY)
    backing, shown = os.stat(m.image), os.stat(m.file)
    assert (shown.st_uid, shown.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(shown.st_mode) == 0o640 and stat.S_ISREG(shown.st_mode)
    assert shown.st_size == backing.st_size
    os.chmod(m.image, 0o604)  # live, like the size
    os.chown(m.image, 0, 0)
    shown = os.stat(m.file)
    assert (shown.st_uid, shown.st_gid, stat.S_IMODE(shown.st_mode)) == (0, 0, 0o604)


@pytest.mark.parametrize(
    "mode, other_reads", [(0o600, "EACCES"), (0o644, "ok")], ids=["0600", "0644"]
)
def test_other_users_get_what_the_backing_file_grants_them(mount, mode, other_reads):
    """A root-owned image mounted with --allow-other: the mount grants nobody more than the
    backing file does (before default_permissions, a 0600 image was writable by everyone)."""
    m = mount("--allow-other", data=pattern(64 * 1024))
    os.chmod(m.image, mode)
    assert as_nobody(("read", m.file), ("write", m.file), ("truncate", m.file)) == [
        other_reads,
        "EACCES",
        "EACCES",
    ]
    assert m.image.read_bytes() == pattern(64 * 1024)
    assert "write_aio" not in m.status()["events"]  # no write reached the daemon


def test_the_backing_files_owner_may_write_through_the_mount(mount):
    m = mount("--allow-other", data=pattern(4096))
    os.chown(m.image, NOBODY, NOBODY)
    os.chmod(m.image, 0o600)
    assert as_nobody(("read", m.file), ("write", m.file)) == ["ok", "ok"]
    assert m.image.read_bytes().startswith(b"written by nobody\n")


def test_a_read_only_mount_is_not_writable_whatever_the_mode(mount):
    m = mount("--read-only", "--allow-other", data=pattern(4096))
    os.chmod(m.image, 0o666)
    assert stat.S_IMODE(os.stat(m.file).st_mode) == 0o444
    assert as_nobody(("read", m.file), ("write", m.file)) == ["ok", "EACCES"]
    with pytest.raises(OSError) as e:  # root passes the modes: EROFS
        os.open(m.file, os.O_WRONLY)
    assert e.value.errno == errno.EROFS
    assert m.image.read_bytes() == pattern(4096)


def test_control_belongs_to_the_mounting_user_and_others_may_only_read_it(mount):
    m = mount("--allow-other")
    st = os.stat(m.control)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getuid(), os.getgid(), 0o644)
    assert as_nobody(("write", m.control), ("truncate", m.control), ("read", m.control)) == [
        "EACCES",
        "EACCES",
        "ok",
    ]
    st = m.status()
    assert st["rules"] == [] and st["last_error"] is None


def test_without_allow_other_other_users_cannot_even_look(mount):
    m = mount(data=pattern(4096))
    os.chmod(m.image, 0o666)
    assert as_nobody(("stat", m.file), ("read", m.file), ("write", m.control)) == [
        "EACCES",
        "EACCES",
        "EACCES",
    ]
