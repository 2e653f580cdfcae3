"""Real FUSE mounts for tests: `blkfuse mount` in a subprocess, always unmounted afterwards."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

_BIN = Path(sys.executable).with_name("blkfuse")
BLKFUSE = [str(_BIN)] if _BIN.exists() else [sys.executable, "-c",
                                             "import sys; from blkfuse.cli import main; "
                                             "sys.argv[0] = 'blkfuse'; main()"]


def blkfuse(*args, check=False, timeout=120, **kw):
    """Run the blkfuse CLI; returns the CompletedProcess (text mode)."""
    r = subprocess.run(BLKFUSE + [str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"blkfuse {' '.join(map(str, args))} failed ({r.returncode}):\n"
                             f"{r.stdout}{r.stderr}")
    return r


def mounted_paths() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
                for line in f}


def is_mounted(path) -> bool:
    return os.path.realpath(path) in mounted_paths()


def force_unmount(path):
    """Last resort: remove a (possibly dead) mount without asking its daemon."""
    path = os.path.realpath(path)
    if not is_mounted(path):
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmds = ([[tool, "-u", "-z", path]] if tool else []) + [["umount", "-l", path]]
    for cmd in cmds:
        subprocess.run(cmd, capture_output=True)
        if not is_mounted(path):
            return


class Mounted:
    """One live mount: its backing image, mountpoint, and helpers to talk to it."""

    def __init__(self, base: Path, image: Path, mnt: Path, name: str):
        self.base = base
        self.image = image          # the backing file
        self.mnt = mnt
        self.name = name

    @property
    def file(self) -> Path:         # the image file inside the mount
        return self.mnt / self.name

    @property
    def control(self) -> Path:
        return self.mnt / "control"

    # Hang guard, not a timing check: a daemon that answers nothing for this long is wedged;
    # it is killed so that the test fails (its blocked requests end) instead of hanging.
    WEDGED_SECONDS = 180
    pid = None                      # the daemon's, learnt right after mounting

    def _ctl(self, text: str) -> str:
        fd = os.open(self.control, os.O_RDWR)
        try:
            os.write(fd, text.encode())
            return os.pread(fd, 1 << 22, 0).decode()
        finally:
            os.close(fd)

    def ctl(self, text: str) -> str:
        """Write `text` to control as one write; return the answer read on the same handle.
        Raises OSError (with the daemon's errno) on failure."""
        box = {}

        def run():
            try:
                box["answer"] = self._ctl(text)
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(self.WEDGED_SECONDS)
        if t.is_alive():
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)
            raise AssertionError(f"the daemon did not answer {text!r}; killed it")
        if "error" in box:
            raise box["error"]
        return box["answer"]

    def status(self) -> dict:
        return json.loads(self.ctl("status json"))

    def status_text(self) -> str:
        return self.control.read_text()

    def umount(self):
        r = blkfuse("umount", self.mnt)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(self.mnt)


@pytest.fixture
def fuse_dir():
    """A scratch directory every user can reach (pytest's tmp_path is 0700 root's)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    d = Path(tempfile.mkdtemp(prefix="blkfuse-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mount(fuse_dir):
    """mount(*cli_args, size=, data=, name=) -> Mounted. Every mount made is unmounted at the
    end of the test, passed or failed: `blkfuse umount`, then a forced lazy unmount."""
    made = []

    def _mount(*args, size=1 << 20, data=None, name=None, image=None, expect_ok=True,
               mnt_name=None):
        i = len(made)
        img = Path(image) if image else fuse_dir / f"disk{i}.img"
        if not image:
            with open(img, "wb") as f:
                if data is not None:
                    f.write(data)
                else:
                    f.truncate(size)
        mnt = fuse_dir / (mnt_name or f"mnt{i}")
        mnt.mkdir(exist_ok=True)
        extra = ["--name", name] if name else []
        m = Mounted(fuse_dir, img, mnt, name or img.name)
        made.append(m)
        r = blkfuse("mount", *extra, *args, img, mnt)
        if expect_ok:
            assert r.returncode == 0, r.stderr
            assert r.stdout == "" and r.stderr == ""
            assert is_mounted(mnt)
            m.pid = m.status()["info"]["pid"]
            return m
        return m, r

    yield _mount
    for m in made:
        if is_mounted(m.mnt):
            r = blkfuse("umount", m.mnt, "--timeout", "30")
            if r.returncode != 0 and m.pid:
                try:
                    os.kill(m.pid, signal.SIGKILL)      # wedged: end it, then the mount
                except ProcessLookupError:
                    pass
        force_unmount(m.mnt)
    leftover = [m.mnt for m in made if is_mounted(m.mnt)]
    assert not leftover, f"still mounted: {leftover}"
