"""blkfuse: QEMU blkdebug's fault-injection rule engine behind a FUSE-mounted disk image.

from blkfuse import Mount, ControlError      # see blkfuse.client.api
from blkfuse import crashtest                # see blkfuse.crash.harness
"""

from typing import TYPE_CHECKING, Any

from blkfuse.errors import BlkfuseError, ControlError, MountError

if TYPE_CHECKING:
    from blkfuse.client.api import Mount
    from blkfuse.crash.harness import crashtest

__version__ = "0.1.0"

__all__ = ["Mount", "crashtest", "BlkfuseError", "ControlError", "MountError", "__version__"]


def __getattr__(name: str) -> Any:
    # Mount is imported on first use, so the CLI (which imports this package) starts fast.
    if name == "Mount":
        from blkfuse.client.api import Mount

        return Mount
    if name == "crashtest":
        from blkfuse.crash.harness import crashtest

        return crashtest
    raise AttributeError(f"module 'blkfuse' has no attribute {name!r}")
