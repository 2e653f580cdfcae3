"""blkfuse: QEMU blkdebug's fault-injection rule engine behind a FUSE-mounted disk image.

from blkfuse import Mount, ControlError      # see blkfuse.client.api
from blkfuse import Fleet                    # several mounts at once: blkfuse.client.fleet
from blkfuse import crashtest                # see blkfuse.crash.harness
"""

from __future__ import annotations

from blkfuse.errors import BlkfuseError, ControlError, MountError

# No `typing` at run time: `blkfuse ctl`/`status` import this, and typing alone costs more
# instructions than starting Python (blkfuse.cli.fast).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from blkfuse.client.api import Mount
    from blkfuse.client.fleet import Fleet
    from blkfuse.crash.harness import crashtest

__version__ = "0.1.0"

__all__ = [
    "Mount",
    "Fleet",
    "crashtest",
    "BlkfuseError",
    "ControlError",
    "MountError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Mount is imported on first use, so the CLI (which imports this package) starts fast.
    if name == "Mount":
        from blkfuse.client.api import Mount

        return Mount
    if name == "Fleet":
        from blkfuse.client.fleet import Fleet

        return Fleet
    if name == "crashtest":
        from blkfuse.crash.harness import crashtest

        return crashtest
    raise AttributeError(f"module 'blkfuse' has no attribute {name!r}")
