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
first, so a failing test never leaves a process hanging on a mount.
"""

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blkfuse.client.api import Mount, Options, StrPath, parse_size
from blkfuse.errors import MountError


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
        try:
            m.close()
        except MountError as e:
            problems.append(str(e))
    if problems:
        pytest.fail("blkfuse_mount teardown: " + "; ".join(problems), pytrace=False)
