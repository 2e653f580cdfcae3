"""The pytest plugin (registered through the `pytest11` entry point: installing blkfuse is
enough). It gives tests one fixture:

    def test_survives_enospc(blkfuse_mount):
        m = blkfuse_mount(size="16M", options={"align": 4096})
        m.inject_error(event="write_aio", errno="ENOSPC", iotype="write")
        ...

`blkfuse_mount(image=None, size="64M", config=None, options=None, **flags) -> blkfuse.Mount`
mounts `image` (a sparse file of `size` under the test's tmp_path when not given) on a fresh
directory under tmp_path; `flags` are blkfuse.Mount's (name=, read_only=True, trace=...).
Every mount is taken down when the test ends, passed or failed, suspended requests resumed
first, so a failing test never leaves a process hanging on a mount. A loop device still backed
by the image fails the teardown, naming the device and where it is mounted; the teardown then
takes it down in order (unmounts it, `losetup -d`, waits for it to go) before the mount, so
nothing is left on a dead disk.
"""

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blkfuse import client
from blkfuse.client import fsstack, holders
from blkfuse.client.api import Mount, Options, StrPath, parse_size
from blkfuse.errors import MountError


def _take_down(use: holders.LoopUse) -> list[str]:
    """Unmount a loop device's file systems and detach it, in that order (the steps of the
    one loop-device + filesystem stack, blkfuse.client.fsstack); what failed."""
    failed = []
    for where in reversed(use.mountpoints):  # the last mounted on top first
        try:
            fsstack.umount(where)
        except MountError as e:
            failed.append(str(e))
    if use.stacked:
        failed.append(f"{' '.join(use.stacked)} still on {use.device}: left alone")
    if failed:
        return failed
    try:
        fsstack.detach(use.device)
    except MountError as e:
        return [str(e)]
    return []


@pytest.fixture
def blkfuse_mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """A factory of blkfuse mounts that all come down at the end of the test."""
    made: list[Mount] = []

    def factory(
        image: StrPath | None = None,
        size: int | str = "64M",
        config: StrPath | None = None,
        options: Options | None = None,
        **flags: Any,
    ) -> Mount:
        n = len(made)
        if image is None:
            image = tmp_path / f"blkfuse{n}.img"
            with open(image, "wb") as f:
                f.truncate(parse_size(size))
        mountpoint = tmp_path / f"blkfuse{n}.mnt"
        os.makedirs(mountpoint, exist_ok=True)
        m = Mount(image, mountpoint, config, options, **flags)
        m.mount()
        made.append(m)
        return m

    yield factory
    problems = []
    for m in reversed(made):
        uses = client.loop_users(m.mountpoint) if m.mounted else []
        if uses:
            failed = [f for use in uses for f in _take_down(use)]
            done = (
                f" (the teardown failed: {'; '.join(failed)})"
                if failed
                else " (the teardown did so)"
            )
            problems.append(
                client.loop_users_message(str(m.mountpoint), uses)
                + done
                + ": take them down in the test"
            )
        try:
            m.close()
        except MountError as e:
            problems.append(str(e))
    if problems:
        pytest.fail("blkfuse_mount teardown: " + "; ".join(problems), pytrace=False)
