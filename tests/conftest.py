"""Real FUSE mounts for tests, through blkfuse's own Python API (blkfuse.client.api.Mount);
always unmounted afterwards, suspended requests resumed first."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blkfuse import ControlError, Mount, MountError, client
from blkfuse.client import fsstack, holders, mounttab

BLKFUSE = client.blkfuse_command()


def blkfuse(
    *args: object, check: bool = False, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run the blkfuse CLI; returns the CompletedProcess (text mode)."""
    r = subprocess.run(
        BLKFUSE + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"blkfuse {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
        )
    return r


# The layer of a test is the directory it is in (tests/unit/, mount/, qemu/, e2e/): each test
# gets that marker (pyproject.toml registers them), so `pytest -m unit` runs the fast ones.
LAYERS = ("unit", "mount", "qemu", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        layer = item.path.resolve().parent
        if layer.parent == tests and layer.name in LAYERS:
            item.add_marker(layer.name)


is_mounted = mounttab.is_mounted
force_unmount = client.force_unmount


class Mounted:
    """One live mount for a test: its backing image, mountpoint, and helpers to talk to it."""

    # Hang guard, not a timing check: a daemon that answers nothing for this long is wedged;
    # it is killed so that the test fails (its blocked requests end) instead of hanging.
    WEDGED_SECONDS = 180

    def __init__(self, base: Path, image: Path, mnt: Path, name: str, api: Mount | None = None):
        self.base = base
        self.image = image  # the backing file
        self.mnt = mnt
        self.name = name
        self.api = api  # None when the mount was expected to fail

    @property
    def pid(self) -> int | None:
        return self.api.pid if self.api else None

    @property
    def file(self) -> Path:  # the image file inside the mount
        return self.mnt / self.name

    @property
    def control(self) -> Path:
        return self.mnt / "control"

    def _ctl(self, text: str) -> str:
        """ctl() without the hang guard (for a thread that is meant to block)."""
        try:
            return client.send(self.mnt, text)
        except ControlError as e:
            raise OSError(e.errno, e.message) from None

    def ctl(self, text: str) -> str:
        """Write `text` to control as one write; return the answer read on the same handle.
        Raises OSError (with the daemon's errno) on failure."""
        try:
            return client.with_timeout(lambda: self._ctl(text), self.WEDGED_SECONDS)
        except client.NoAnswer:
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)
            raise AssertionError(f"the daemon did not answer {text!r}; killed it") from None

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status json"))

    def status_text(self) -> str:
        return self.control.read_text()

    def umount(self) -> None:
        r = blkfuse("umount", self.mnt)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(self.mnt)


# Loop devices a test leaves attached: nothing fails (no filesystem is mounted on them), but
# every run would leave more on the machine. Other runs on the same machine attach and detach
# (and, with older code, leak) their own meanwhile, so only this test's count: those this
# process attached through blkfuse's stack (fsstack.attached_here: its teardowns must let them
# go, even when the mount below went first and the kernel names the image /disk0.img), and
# those attached during the test (by the kernel's diskseq, never one there before) to a file
# in the test's own scratch directories.
# Hang guard, not a timing check: a device given `losetup -d` (autoclear) goes once its last
# user closes it; one without autoclear stays.
LOOP_SETTLE_SECONDS = 30.0
_scratch_dirs: list[Path] = []  # this test's fuse_dir


def _loops_left(before: dict[str, str], dirs: list[str]) -> dict[str, str]:
    """/dev/loopN -> backing file, for the loop devices this test left (see above)."""
    left = {
        device: fsstack.backing_file(device)
        for device, attachment in fsstack.attached_here().items()
        if before.get(device) != attachment
    }
    for name in os.listdir("/sys/block") if dirs else ():
        device = f"/dev/{name}"
        if name.startswith("loop") and device not in left:
            attachment, backing = fsstack.attachment(device), fsstack.backing_file(device)
            if attachment and attachment not in before.values():
                if any(backing.startswith(d + "/") for d in dirs):
                    left[device] = backing
    return left


@pytest.fixture(autouse=True)
def no_loop_device_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test that leaves a loop device attached (set up first: checked last, after
    every other fixture's teardown)."""
    before = {
        f"/dev/{name}": fsstack.attachment(f"/dev/{name}")
        for name in os.listdir("/sys/block")
        if name.startswith("loop")
    }
    _scratch_dirs.clear()
    yield
    dirs = [os.path.realpath(d) for d in _scratch_dirs]
    tmp = getattr(request.node, "funcargs", {}).get("tmp_path")
    if tmp is not None:
        dirs.append(os.path.realpath(tmp))
    deadline = time.monotonic() + LOOP_SETTLE_SECONDS
    while (left := _loops_left(before, dirs)) and time.monotonic() < deadline:
        if not any(holders.loop_use(device).autoclear for device in left):
            break
        time.sleep(0.05)
    if left:
        pytest.fail(
            "loop devices left attached: "
            + ", ".join(f"{device} on {backing}" for device, backing in sorted(left.items()))
            + f" (losetup -d {' '.join(sorted(left))})",
            pytrace=False,
        )


@pytest.fixture
def fuse_dir() -> Iterator[Path]:
    """A scratch directory every user can reach (pytest's tmp_path is 0700 root's)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    d = Path(tempfile.mkdtemp(prefix="blkfuse-test-"))
    _scratch_dirs.append(d)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# `blkfuse mount` options that take a value; the others the tests use are flags.
_VALUED = {
    "-o": "options",
    "--config": "config",
    "--name": "name",
    "--log": "log",
    "--trace": "trace",
}


def _api_args(args: tuple[object, ...]) -> dict[str, Any]:
    """The tests' `blkfuse mount` arguments as blkfuse.Mount keywords."""
    kw: dict[str, Any] = {"options": []}
    words = [str(a) for a in args]
    while words:
        word = words.pop(0)
        if word in _VALUED:
            key = _VALUED[word]
            if key == "options":
                kw["options"].append(words.pop(0))
            else:
                kw[key] = words.pop(0)
        elif word.startswith("--"):
            kw[word[2:].replace("-", "_")] = True
        else:
            raise AssertionError(f"mount fixture: unexpected argument {word!r}")
    return kw


@pytest.fixture
def mount(fuse_dir: Path) -> Iterator[Callable[..., Any]]:
    """mount(*cli_args, size=, data=, name=, image=, expect_ok=, mnt_name=) -> Mounted.
    Mounts with blkfuse.Mount; with expect_ok=False runs `blkfuse mount` and returns
    (Mounted, CompletedProcess). Every mount made is taken down at the end of the test,
    passed or failed (Mount.close: resume, orderly unmount, else kill and a lazy unmount)."""
    made: list[Mounted] = []

    def _mount(
        *args: object,
        size: int = 1 << 20,
        data: bytes | None = None,
        name: str | None = None,
        image: object = None,
        expect_ok: bool = True,
        mnt_name: str | None = None,
    ) -> Any:
        i = len(made)
        img = Path(str(image)) if image else fuse_dir / f"disk{i}.img"
        if not image:
            with open(img, "wb") as f:
                if data is not None:
                    f.write(data)
                else:
                    f.truncate(size)
        mnt = fuse_dir / (mnt_name or f"mnt{i}")
        mnt.mkdir(exist_ok=True)
        m = Mounted(fuse_dir, img, mnt, name or img.name)
        made.append(m)
        if not expect_ok:
            extra = ["--name", name] if name else []
            return m, blkfuse("mount", *extra, *args, img, mnt)
        m.api = Mount(img, mnt, name=name, **_api_args(args))
        try:
            m.api.mount()
        except MountError as e:
            raise AssertionError(f"mount failed: {e}") from None
        assert is_mounted(mnt)
        return m

    yield _mount
    problems = []
    for m in made:
        try:
            if m.api is not None:
                m.api.close(timeout=30)
            force_unmount(m.mnt)
        except MountError as e:
            problems.append(str(e))
    leftover = [m.mnt for m in made if is_mounted(m.mnt)]
    assert not leftover and not problems, f"still mounted: {leftover} {problems}"
