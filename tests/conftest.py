"""Real FUSE mounts for tests, through blkfuse's own Python API (blkfuse.client.api.Mount);
always unmounted afterwards, suspended requests resumed first."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blkfuse import ControlError, Mount, MountError, client
from blkfuse.client import mounttab

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


@pytest.fixture
def fuse_dir() -> Iterator[Path]:
    """A scratch directory every user can reach (pytest's tmp_path is 0700 root's)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    d = Path(tempfile.mkdtemp(prefix="blkfuse-test-"))
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
